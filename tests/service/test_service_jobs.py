"""End to end over HTTP against the live stack: uploads, slide paths, results, listing, idempotency."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model.options import FALLBACK_CONTENT_TYPE, content_type
from tests.helpers.service_stack import FAST, REPO, Stack, png_bytes

pytestmark = pytest.mark.service

MASKS = ("semantic.png", "ternary.png")


def _download_all(stack: Stack, job: dict[str, Any]) -> dict[str, bytes]:
    files = {}
    for link in job["results"]:
        resp = stack.client.get(link["href"])
        assert resp.status_code == 200, (link, resp.text)
        assert resp.headers["content-type"].split(";")[0] == content_type(link["name"]) != FALLBACK_CONTENT_TYPE
        assert len(resp.content) == link["size_bytes"]
        files[link["name"]] = resp.content
    return files


def _check_masks_match_stats(files: dict[str, bytes], size: tuple[int, int]) -> dict[str, Any]:
    """Mask PNGs have the analysis size, and stats.json counts every class's pixels exactly."""
    stats = json.loads(files["stats.json"])
    assert (stats["analysis"]["width"], stats["analysis"]["height"]) == size
    for head in ("semantic", "ternary"):
        mask = Image.open(io.BytesIO(files[f"{head}.png"]))
        assert mask.size == size and mask.mode == "P"
        counts = np.bincount(np.asarray(mask).ravel(), minlength=8)
        classes = stats[head]["classes"]
        assert [c["pixels"] for c in classes.values()] == counts[: len(classes)].tolist()
        assert counts[len(classes):].sum() == 0
        assert stats[head]["total_pixels"] == size[0] * size[1]
    return stats


def _check_progress(history: list[dict[str, Any]], total: int) -> None:
    """queued -> running -> succeeded in order, and progress.done never goes down and ends at total."""
    order = {"queued": 0, "running": 1, "succeeded": 2}
    ranks = [order[j["status"]] for j in history]
    assert ranks == sorted(ranks) and 1 in ranks and ranks[-1] == 2, [j["status"] for j in history]
    inference = [j["progress"]["done"] for j in history if j["progress"]["stage"] == "inference"]
    assert inference == sorted(inference)
    assert history[-1]["progress"] == {"stage": "done", "done": total, "total": total}


def test_upload_end_to_end(stack: Stack) -> None:
    content = png_bytes(256, 192, seed=7)
    options = {"tile_size": 64, "overlap": 16, "block_size": 64, "batch_size": 4}
    metadata = {"case": "S-24-0001", "specimen": 3, "tags": ["he", "test"]}
    resp = stack.submit_upload(content, filename="../../etc/case 1.png", options=options, metadata=metadata)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["metadata"] == metadata
    assert job["slide"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert job["slide"]["name"] == "case 1.png"  # the client's name, reduced to a display string
    assert (job["slide"]["width"], job["slide"]["height"], job["slide"]["size_bytes"]) == (256, 192, len(content))

    history = [job]
    done = stack.wait(job["id"], history=history)
    assert done["status"] == "succeeded", done
    _check_progress(history, total=12)  # 256x192 in 64 px blocks
    assert done["options"] == {**options, "tissue": None, "mpp": None, "tta": False, "stain": "none",
                               "outputs": ["masks", "overlays", "nuclei"]}
    assert done["model"]["name"] == "tiny-test" and done["model"]["sha256"] == _sha(stack.model_path)

    files = _download_all(stack, done)
    assert {"job.json", "stats.json", *MASKS, "overlay_semantic.png", "overlay_ternary.png",
            "thumbnail.png"} <= set(files)
    stats = _check_masks_match_stats(files, (256, 192))
    assert stats["blocks"]["total"] == 12
    thumb = Image.open(io.BytesIO(files["thumbnail.png"])).size
    for overlay in ("overlay_semantic.png", "overlay_ternary.png"):
        assert Image.open(io.BytesIO(files[overlay])).size == thumb
    record = json.loads(files["job.json"])
    assert record["id"] == done["id"] and record["metadata"] == metadata
    assert record["slide"]["sha256"] == job["slide"]["sha256"]
    assert record["model"]["sha256"] == done["model"]["sha256"]
    assert record["versions"]["torch"] and record["timings_s"]["run"] > 0


@pytest.mark.slow
def test_slide_path_end_to_end_on_a_real_svs(stack: Stack) -> None:
    """cmu_small_region.svs (2220x2967 Aperio); the mpp override makes the analysis level 1/4 size; with
    test-time augmentation and stain normalisation."""
    options = {"tile_size": 128, "overlap": 16, "block_size": 256, "mpp": 0.0625, "outputs": ["masks", "overlays"],
               "tta": True, "stain": "macenko"}
    resp = stack.submit_path("cmu_small_region.svs", options=options, metadata={"lims": "X1"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["slide"] | {"sha256": None} == job["slide"]  # hashed by the worker, not the API
    assert (job["slide"]["width"], job["slide"]["height"], job["slide"]["format"]) == (2220, 2967, "aperio")
    history = [job]
    done = stack.wait(job["id"], history=history, timeout_s=240)
    assert done["status"] == "succeeded", done
    size = (round(2220 / 4), round(2967 / 4))
    _check_progress(history, total=3 * 3)  # 555x742 in 256 px blocks
    assert done["slide"]["sha256"] == _sha(stack.slide_root / "cmu_small_region.svs")
    assert done["options"]["tta"] is True and done["options"]["stain"] == "macenko"
    assert done["slide"]["analysis"]["width"] == size[0] and done["slide"]["analysis"]["mpp"] == 0.25
    files = _download_all(stack, done)
    assert "nuclei.geojson" not in files  # not requested
    stats = _check_masks_match_stats(files, size)
    assert stats["timings_s"]["stain"] > 0  # the worker normalised the blocks it read
    assert json.loads(files["job.json"])["slide"]["path"] == "cmu_small_region.svs"


def test_results_support_range_and_name_unknown_results(stack: Stack) -> None:
    job = stack.run_good_job()
    href = f"/v1/jobs/{job['id']}/results/semantic.png"
    whole = stack.client.get(href).content
    part = stack.client.get(href, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == whole[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(whole)}"
    tail = stack.client.get(href, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole[-10:]
    head = stack.client.head(href)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(whole)
    assert head.headers["accept-ranges"] == "bytes"
    bad = stack.client.get(href, headers={"Range": f"bytes={len(whole) + 5}-"})
    assert bad.status_code == 416 and bad.json()["error"]["code"] == "range_not_satisfiable"
    assert bad.headers["content-range"] == f"bytes */{len(whole)}"
    malformed = stack.client.get(href, headers={"Range": "pages=1-2"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_range"
    unknown = stack.client.get(f"/v1/jobs/{job['id']}/results/secret.txt")
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "result_not_found" and "'secret.txt'" in error["message"]
    assert set(error["valid_names"]) == {"job.json", "stats.json", "semantic.png", "ternary.png",
                                        "semantic.tiff", "ternary.tiff"}
    assert "semantic.png" in error["message"]


def test_list_newest_first_with_cursor_and_status_filter(stack: Stack) -> None:
    """On a tenant of its own, so the listing holds exactly the jobs submitted here."""
    with stack.client_for("lab-e") as lab:
        ids = [_submit_as(lab, png_bytes(64, 64, seed=i)) for i in range(5)]
        for job_id in ids:
            stack.wait(job_id, client=lab)
        everything = lab.get("/v1/jobs", params={"limit": 100}).json()
        assert [j["id"] for j in everything["jobs"]] == ids[::-1] and everything["next_cursor"] is None
        created = [j["created_at"] for j in everything["jobs"]]
        assert created == sorted(created, reverse=True)
        for limit in (1, 2, 5):  # a last page that is full, short, or the only one
            assert _all_pages(lab, limit) == ids[::-1], limit
        succeeded = lab.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()["jobs"]
        assert [j["id"] for j in succeeded] == ids[::-1]
        assert lab.get("/v1/jobs", params={"status": "failed"}).json()["jobs"] == []
        bad = lab.get("/v1/jobs", params={"cursor": "bm9wZQ"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
        bad = lab.get("/v1/jobs", params={"status": "finished"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
        assert "'finished'" in bad.json()["error"]["message"]


def _submit_as(client: httpx.Client, content: bytes) -> str:
    resp = client.post("/v1/jobs", files={"file": ("slide.png", content, "application/octet-stream")},
                       data={"options": json.dumps(FAST)})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _all_pages(client: httpx.Client, limit: int) -> list[str]:
    """Every job id, following ``next_cursor`` with pages of ``limit``."""
    ids: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        assert 0 < len(page["jobs"]) <= limit, page
        ids += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


def test_idempotency_key_returns_the_original_job(stack: Stack) -> None:
    content = png_bytes(64, 64, seed=11)
    key = {"Idempotency-Key": "lims-order-0001"}
    first = stack.submit_upload(content, options=FAST, metadata={"order": 1}, headers=key)
    assert first.status_code == 202
    again = stack.submit_upload(content, options=FAST, metadata={"order": 1}, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = stack.submit_upload(content, options=FAST, metadata={"order": 2}, headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    uploads = [p.name for p in (stack.data_dir / "uploads").iterdir() if not p.name.startswith(".")]
    assert uploads.count(first.json()["id"]) == 1
    assert [u for u in uploads if not stack.job_exists(u)] == []  # replays left no files
    path_key = {"Idempotency-Key": "lims-order-0002"}
    a = stack.submit_path("cases/tile.png", options=FAST, headers=path_key)
    b = stack.submit_path("cases/tile.png", options=FAST, headers=path_key)
    assert (a.status_code, b.status_code) == (202, 200) and a.json()["id"] == b.json()["id"]
    stack.wait(first.json()["id"])
    stack.wait(a.json()["id"])


def test_health_ready_models_metrics_and_openapi(stack: Stack) -> None:
    assert stack.client.get("/healthz").json() == {"status": "ok"}
    ready = stack.client.get("/readyz").json()
    assert ready["status"] == "ready" and stack.worker_name in ready["workers"]
    models = stack.client.get("/v1/models").json()["models"]
    card = next(m for m in models if m["sha256"] == _sha(stack.model_path))
    assert card["card"]["encoder"] == "resnet18" and card["card"]["semantic_classes"][0] == "background"
    stack.run_good_job()
    metrics = stack.client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    for needle in ('nucseg_jobs{status="succeeded"}', "nucseg_job_duration_seconds_bucket",
                   'nucseg_job_duration_seconds_count{status="succeeded"}', "nucseg_tiles_processed_total",
                   'nucseg_queue_length{queue="cpu"}'):
        assert needle in text
    tiles = next(line for line in text.splitlines() if line.startswith("nucseg_tiles_processed_total "))
    assert int(tiles.split()[1]) >= 1
    schema = stack.client.get("/openapi.json").json()
    assert "JobCreate" in schema["components"]["schemas"]
    assert set(schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data", "application/json"}
    assert stack.client.get("/docs").status_code == 200


def test_compose_worker_healthcheck_command_pings_the_live_worker(stack: Stack) -> None:
    """The healthcheck in docker-compose.yml, run against a real worker."""
    cmd = [sys.executable, "-m", "celery", "-A", "core.celery_app", "inspect", "ping", "--timeout", "10",
           "-d", stack.worker_name]
    out = subprocess.run(cmd, env=stack.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pong" in out.stdout
    cmd[-1], cmd[-3] = "nobody@nowhere", "2"
    assert subprocess.run(cmd, env=stack.env, cwd=REPO, capture_output=True, timeout=60).returncode != 0


def _sha(path: Any) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
