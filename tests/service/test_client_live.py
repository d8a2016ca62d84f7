"""nucseg_client against the live service (real Redis, Celery worker and uvicorn from ``stack``)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nucseg_client import ApiError, AsyncClient, Client, Job, JobFailed, verify_webhook
from nucseg_client.cli import main as cli_main

from tests.helpers.service_stack import FAST, WEBHOOK_SECRETS, Stack, png_bytes
from tests.helpers.webhook_receiver import Receiver, receiving

pytestmark = pytest.mark.service

# 64 px blocks of 64 px tiles with overlap: a 128x128 image keeps the worker busy for a few seconds.
LONG = {"tile_size": 64, "overlap": 16, "block_size": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.base_url) as c:
        yield c


def server_files(stack: Stack, job_id: str) -> dict[str, bytes]:
    folder = stack.data_dir / "results" / job_id
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_files(stack: Stack, job_id: str, paths: list[Path]) -> None:
    served = server_files(stack, job_id)
    assert sorted(p.name for p in paths) == sorted(served)
    for path in paths:
        assert path.read_bytes() == served[path.name], f"{path.name} differs from the server's file"


def slide(tmp_path: Path, seed: int, name: str = "slide.png") -> Path:
    path = tmp_path / name
    path.write_bytes(png_bytes(64, 64, seed=seed))
    return path


def test_upload_wait_download_all(stack: Stack, client: Client, tmp_path: Path) -> None:
    path = slide(tmp_path, 101, "S-101.png")
    sent: list[tuple[int, int | None]] = []
    job = client.submit(path, options=FAST, metadata={"case": "S-101"},
                        progress=lambda done, total: sent.append((done, total)))
    assert job.status == "queued" and job.metadata == {"case": "S-101"}
    assert job.slide["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sent[-1] == (path.stat().st_size, path.stat().st_size)

    assert job.wait(timeout=120, progress=False) is job and job.status == "succeeded"
    paths = job.download_all(tmp_path / "out")
    assert_same_files(stack, job.id, paths)
    assert {"semantic.png", "stats.json", "job.json"} <= {p.name for p in paths}
    stats = job.stats()
    assert stats == json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["analysis"]["width"] == 64


def test_slide_path_job_with_every_output(stack: Stack, client: Client, tmp_path: Path) -> None:
    options = {**FAST, "outputs": ["masks", "overlays", "nuclei"]}
    job = client.submit_path("cases/tile.png", options=options, metadata={"case": "path"})
    assert job.slide["source"] == "path" and job.slide["path"] == "cases/tile.png"
    job.wait(timeout=120, progress=False)
    paths = job.download_all(tmp_path / "out")
    assert_same_files(stack, job.id, paths)
    assert "nuclei.geojson" in {p.name for p in paths}


def test_download_resumes_with_range_against_the_server(stack: Stack, client: Client, tmp_path: Path) -> None:
    job = client.submit(slide(tmp_path, 102), options={**FAST, "outputs": ["masks", "nuclei"]}).wait(progress=False)
    name = max(job.results, key=lambda f: f.size_bytes).name
    full = server_files(stack, job.id)[name]
    (tmp_path / f"{name}.part").write_bytes(full[: len(full) // 2])
    assert job.download(name, tmp_path).read_bytes() == full
    (tmp_path / f"{name}.part").write_bytes(full)  # complete already: nothing to fetch
    assert job.download(name, tmp_path / "again").read_bytes() == full


def test_idempotency_key_returns_the_same_job(client: Client, tmp_path: Path) -> None:
    key = f"lims-{uuid.uuid4().hex}"
    path = slide(tmp_path, 103)
    first = client.submit(path, options=FAST, metadata={"case": "idem"}, idempotency_key=key)
    again = client.submit(path, options=FAST, metadata={"case": "idem"}, idempotency_key=key)
    assert again.id == first.id
    by_path = client.submit_path("cases/tile.png", options=FAST, idempotency_key=key + "-p")
    assert client.submit_path("cases/tile.png", options=FAST, idempotency_key=key + "-p").id == by_path.id
    with pytest.raises(ApiError) as info:
        client.submit_path("cases/tile.png", options={**FAST, "overlap": 8}, idempotency_key=key + "-p")
    assert (info.value.status, info.value.code) == (409, "idempotency_conflict") and key in info.value.message
    for job in (first, by_path):
        job.wait(timeout=120, progress=False)


def test_server_errors_come_through_with_code_and_message(client: Client, tmp_path: Path) -> None:
    with pytest.raises(ApiError) as info:
        client.submit(slide(tmp_path, 104), options={"tile_size": 100})
    assert (info.value.status, info.value.code) == (422, "validation_error") and "100" in info.value.message
    with pytest.raises(ApiError) as info:
        client.job("f" * 32)
    assert (info.value.status, info.value.code) == (404, "job_not_found")
    with pytest.raises(ApiError) as info:
        client.submit_path("unreadable.svs", options=FAST)
    assert info.value.code == "unreadable_slide" and "unreadable.svs" in info.value.message


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    """A loopback webhook receiver answering 204 (the stack allows 127.0.0.1 targets)."""
    with receiving(default_status=204) as running:
        yield running


def test_callback_url_webhook_verifies_with_the_sdk(
        client: Client, tmp_path: Path, hooks: Receiver) -> None:
    url = hooks.url
    job = client.submit(slide(tmp_path, 109), options=FAST, metadata={"case": "hook"}, callback_url=url,
                        progress=False)
    by_path = client.submit_path("cases/tile.png", options=FAST, callback_url=url)
    assert job.webhook is not None and (job.webhook.url, job.webhook.status) == (url, "waiting")
    assert by_path.webhook is not None and by_path.webhook.url == url
    for j in (job, by_path):
        j.wait(timeout=120, progress=False)
    deadline = time.monotonic() + 60
    while any(getattr(j.refresh().webhook, "status", None) != "delivered" for j in (job, by_path)):
        assert time.monotonic() < deadline, [j.webhook for j in (job, by_path)]
        time.sleep(0.2)
    assert job.webhook is not None and job.webhook.attempts[-1].status_code == 204
    secret = WEBHOOK_SECRETS["lab-a"]
    events = {e["data"]["id"]: e for e in (verify_webhook(secret, c["headers"], c["body"]) for c in hooks.calls)}
    assert events[job.id]["type"] == "job.succeeded" and events[job.id]["data"]["metadata"] == {"case": "hook"}
    assert set(events[job.id]["data"]["results"]) == {f.name for f in job.results}
    assert by_path.id in events


def test_a_wrong_api_key_is_a_clear_401(stack: Stack) -> None:
    with Client(stack.base_url, api_key="nsk_not_a_key") as c, pytest.raises(ApiError) as info:
        c.models()
    assert (info.value.status, info.value.code) == (401, "invalid_api_key")
    assert "NUCSEG_API_KEY" in str(info.value)


def test_cancel_makes_wait_raise_job_failed(client: Client, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(128, 128, seed=105))
    busy = client.submit(big, options=LONG)  # a few seconds of work for the one worker
    queued = client.submit(slide(tmp_path, 108), options=FAST)
    assert queued.cancel().status == "cancelled"
    with pytest.raises(JobFailed) as info:
        queued.wait(timeout=60, progress=False)
    assert info.value.code == "cancelled" and info.value.job is queued
    assert cli_main(["download", queued.id, "--url", str(client.base_url), "--out", str(tmp_path / "x")]) == 1
    assert busy.wait(timeout=120, max_poll=0.5, progress=False).status == "succeeded"


def test_jobs_pages_and_models(client: Client) -> None:
    ids = [job.id for job in client.jobs(page_size=2)]
    assert len(ids) == len(set(ids)) >= 3  # more than one page
    succeeded = list(client.jobs(status="succeeded", page_size=100))
    assert succeeded and all(isinstance(j, Job) and j.status == "succeeded" for j in succeeded)
    models = client.models()
    assert models and models[0].name == "tiny-test" and len(models[0].sha256) == 64


def test_async_client(stack: Stack, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.base_url) as c:
            job = await c.submit(slide(tmp_path, 106), options=FAST, idempotency_key=uuid.uuid4().hex)
            await job.wait(timeout=120, progress=False)
            paths = await job.download_all(tmp_path / "out")
            assert_same_files(stack, job.id, paths)
            assert (await c.job(job.id)).status == "succeeded"
            ids = [j.id async for j in c.jobs(page_size=1)]  # one job a page
            assert job.id in ids and len(ids) >= 2
            assert (await job.stats())["analysis"]["height"] == 64

    asyncio.run(scenario())


def test_cli_against_the_server(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--url", stack.base_url]
    path = slide(tmp_path, 107)
    out = tmp_path / "res"
    assert cli_main(["submit", str(path), "--tile", "64", "--overlap", "0", "--outputs", "masks",
                     "--wait", "--out", str(out), "--json", *url]) == 0
    done = json.loads(capsys.readouterr().out)
    job_id = done["job"]["id"]
    assert done["job"]["status"] == "succeeded"
    assert_same_files(stack, job_id, [Path(f["path"]) for f in done["files"]])

    assert cli_main(["status", job_id, *url]) == 0
    assert f"{job_id}" in capsys.readouterr().out
    assert cli_main(["list", "--limit", "3", "--status", "succeeded", *url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "STATUS", "PROGRESS", "CREATED", "SLIDE"] and len(table) == 4
    assert cli_main(["download", job_id, "--out", str(tmp_path / "again"), *url]) == 0
    assert "semantic.png" in capsys.readouterr().out
    assert (tmp_path / "again" / "semantic.png").read_bytes() == (out / "semantic.png").read_bytes()
    assert cli_main(["cancel", job_id, *url]) == 0  # finished: left alone, not deleted
    assert "already finished (succeeded)" in capsys.readouterr().out
    assert cli_main(["status", "f" * 32, *url]) == 2
    assert "job_not_found" in capsys.readouterr().err

    # the console entry point, as a separate process
    proc = subprocess.run([sys.executable, "-m", "nucseg_client", "status", job_id, "--json", *url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded"
