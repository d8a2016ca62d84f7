"""The service on an S3 object store (SeaweedFS): the API and two workers each have a private data
folder, and share nothing but Redis and the store.

Uploads land in the store, workers fetch slides into their own caches and publish results to the
store, the API serves results (with Range) and overlay tiles from it, ``s3://`` slide paths obey
the allow-list, and a store that is down is a JSON 503 at the API and a retried job at the worker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import obstore
import pytest

from tests.helpers.s3_server import BUCKET, S3Server
from tests.helpers.service_stack import FAST, Stack, png_bytes, wait_until

PREFIX = "jobs"
WORKERS = ("s3-a@hostA", "s3-b@hostB")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A store of this module's own: the fault test stops and restarts it."""
    with S3Server.running(tmp_path_factory.mktemp("s3-own")) as server:
        yield server


@pytest.fixture(scope="module")
def hosts(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("hosts")
    env = {**s3.env(PREFIX), "NUCSEG_SLIDE_PREFIXES": json.dumps([f"s3://{BUCKET}/lab-slides/"]),
           "NUCSEG_STORAGE_TIMEOUT_S": "5", "NUCSEG_STORAGE_RETRIES": "0"}
    worker_env = {"NUCSEG_DATA_DIR": str(root / "host-a")}
    with Stack.running(root, env, worker_env) as stack:
        stack.start_extra_worker(WORKERS[1], {"NUCSEG_DATA_DIR": str(root / "host-b")})
        wait_until(lambda: WORKERS[1] in stack.client.get("/readyz").json().get("workers", []), 180,
                   f"{WORKERS[1]} answers the readiness ping")
        yield stack


def _objects(s3: S3Server, prefix: str) -> dict[str, int]:
    return {m["path"]: m["size"] for batch in obstore.list(s3.client(), prefix) for m in batch}


def _job_json(stack: Stack, job: dict[str, Any]) -> dict[str, Any]:
    return dict(stack.client.get(f"/v1/jobs/{job['id']}/results/job.json").json())


def test_jobs_run_on_workers_that_share_only_redis_and_the_store(hosts: Stack, s3: S3Server) -> None:
    uploads = [png_bytes(256, 256, seed=s) for s in range(6)]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda b: hosts.submit_upload(b, options=FAST), uploads))
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    jobs = [hosts.wait(r.json()["id"], timeout_s=240) for r in responses]
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    ran_on = {_job_json(hosts, j)["worker"] for j in jobs}
    assert ran_on == {"test-1@localhost", WORKERS[1]}  # both hosts took jobs

    job, body = jobs[0], uploads[0]
    stored = _objects(s3, f"{PREFIX}/uploads/{job['id']}/")
    assert stored == {f"{PREFIX}/uploads/{job['id']}/slide.png": len(body)}
    assert job["slide"]["sha256"] == hashlib.sha256(body).hexdigest()
    results = _objects(s3, f"{PREFIX}/results/{job['id']}/")
    assert {Path(k).name for k in results} == {r["name"] for r in job["results"]}
    # nothing is written to the shared data folder the API would once have shared with the workers
    assert not (hosts.data_dir / "uploads" / job["id"]).exists() and not (hosts.data_dir / "results").exists()
    for host in ("host-a", "host-b"):
        assert not (hosts.root / host / "results" / job["id"]).exists()
    cached = [p for host in ("host-a", "host-b") for p in (hosts.root / host / "cache" / "slides").glob("*.png")]
    assert {p.name for p in cached} >= {f"{j['slide']['sha256']}.png" for j in jobs[:1]}


def test_results_and_tiles_are_served_from_the_store(hosts: Stack, s3: S3Server) -> None:
    job = hosts.run_good_job()
    key = next(k for k in _objects(s3, f"{PREFIX}/results/{job['id']}/") if k.endswith("/semantic.png"))
    whole = bytes(obstore.get(s3.client(), key).bytes())
    href = f"/v1/jobs/{job['id']}/results/semantic.png"
    full = hosts.client.get(href)
    assert full.status_code == 200 and full.content == whole and full.headers["content-type"] == "image/png"
    part = hosts.client.get(href, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == whole[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(whole)}"
    head = hosts.client.head(href)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(whole)
    bad = hosts.client.get(href, headers={"Range": f"bytes={len(whole) + 5}-"})
    assert bad.status_code == 416 and bad.json()["error"]["code"] == "range_not_satisfiable"
    info = hosts.client.get(f"/v1/jobs/{job['id']}/dzi").json()
    assert [o["name"] for o in info["overlays"]] == ["semantic", "ternary"]
    tile = hosts.client.get(f"/v1/jobs/{job['id']}/dzi/semantic_files/6/0_0.png")
    assert tile.status_code == 200 and tile.content.startswith(b"\x89PNG")
    slide_tile = hosts.client.get(f"/v1/jobs/{job['id']}/dzi/slide_files/6/0_0.jpeg")
    assert slide_tile.status_code == 200


def test_slide_paths_may_name_allowed_objects_only(hosts: Stack, s3: S3Server) -> None:
    body = png_bytes(128, 96, seed=41)
    obstore.put(s3.client(), "lab-slides/case-1/slide.png", body)
    obstore.put(s3.client(), "private/slide.png", body)
    resp = hosts.submit_path(f"s3://{BUCKET}/lab-slides/case-1/slide.png", options=FAST)
    assert resp.status_code == 202, resp.text
    job = hosts.wait(resp.json()["id"], timeout_s=120)
    assert job["status"] == "succeeded" and job["slide"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert job["slide"]["width"] == 128
    for url, code in ((f"s3://{BUCKET}/private/slide.png", "invalid_slide_path"),
                      (f"s3://{BUCKET}/lab-slides/../private/slide.png", "invalid_slide_path"),
                      (f"s3://{BUCKET}/lab-slides/none.png", "slide_not_found")):
        refused = hosts.submit_path(url, options=FAST)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == code, refused.text
        assert url[:40] in refused.json()["error"]["message"]


def test_a_store_that_is_down_is_503_at_the_api_and_retried_at_the_worker(hosts: Stack, s3: S3Server) -> None:
    done = hosts.run_good_job()
    s3.stop()
    try:
        upload = hosts.submit_upload(png_bytes(64, 64, seed=7), options=FAST)
        assert upload.status_code == 503 and upload.json()["error"]["code"] == "storage_unavailable", upload.text
        assert "uploads/" in upload.json()["error"]["message"] and "http" not in upload.json()["error"]["message"]
        result = hosts.client.get(f"/v1/jobs/{done['id']}/results/stats.json")
        assert result.status_code == 503 and result.json()["error"]["code"] == "storage_unavailable"
        ready = hosts.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "storage_unavailable", ready.text
        assert "http" not in ready.json()["error"]["message"] and ready.headers["retry-after"] == "5"
        # a slide under the slide root needs no store to submit; its results do, so the job waits
        resp = hosts.submit_path("cases/tile.png", options=FAST)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        wait_until(lambda: hosts.job(job_id)["retries"] >= 1, 120, "the job is retried while the store is down")
        waiting = hosts.job(job_id)
        assert waiting["status"] in ("queued", "running") and waiting["results"] is None
        logs = "".join(p.read_text() for p in hosts.root.glob("*.log") if p.name.startswith(("worker", "s3-")))
        assert f"job {job_id}: transient error storage_unavailable" in logs
    finally:
        s3.start()
    wait_until(lambda: hosts.client.get("/readyz").status_code == 200, 60, "ready again once the store is back")
    job = hosts.wait(job_id, timeout_s=180)
    assert job["status"] == "succeeded" and job["retries"] >= 1
    assert hosts.client.get(f"/v1/jobs/{job_id}/results/stats.json").status_code == 200
