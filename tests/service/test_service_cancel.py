"""DELETE: cancel a running job (no partial results), cancel a queued job, delete a finished one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.service_stack import FAST, Stack, png_bytes

pytestmark = pytest.mark.service

# 512x512 in 64 px blocks: 64 blocks, several seconds of work on a shared CPU.
LONG = {"tile_size": 64, "overlap": 16, "block_size": 64, "batch_size": 4}


def _leftovers(stack: Stack, job_id: str) -> list[Path]:
    results = stack.data_dir / "results"
    return [*results.glob(f"{job_id}*"), *(results / ".partial").glob(f"{job_id}*")]


def test_cancel_running_and_queued_jobs(stack: Stack) -> None:
    running = stack.submit_upload(png_bytes(512, 512, seed=21), options=LONG).json()
    queued = stack.submit_upload(png_bytes(64, 64, seed=22), options=FAST).json()
    stack.wait(running["id"], until=["running"], min_done=1)

    resp = stack.client.delete(f"/v1/jobs/{queued['id']}")  # still behind the running job
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "cancelled" and resp.json()["progress"]["stage"] == "cancelled"

    resp = stack.client.delete(f"/v1/jobs/{running['id']}")
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "running" and resp.json()["cancel_requested"] is True
    done_at_cancel = resp.json()["progress"]["done"]
    ended = stack.wait(running["id"], until=["cancelled"], timeout_s=60)
    assert ended["progress"]["stage"] == "cancelled"
    assert ended["progress"]["done"] < ended["progress"]["total"] == 64
    assert ended["progress"]["done"] <= done_at_cancel + 2  # stopped within a block or so
    assert ended["results"] is None and _leftovers(stack, running["id"]) == []
    resp = stack.client.get(f"/v1/jobs/{running['id']}/results/semantic.png")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "results_not_ready"

    assert stack.job(queued["id"])["status"] == "cancelled"  # its message is dropped when it arrives
    assert stack.job(queued["id"])["attempts"] == 0
    stack.run_good_job()
    assert stack.job(queued["id"])["attempts"] == 0


def test_delete_finished_job_removes_files_and_record(stack: Stack) -> None:
    job = stack.run_good_job()
    results = stack.data_dir / "results" / job["id"]
    upload = stack.data_dir / "uploads" / job["id"]
    assert results.is_dir() and upload.is_dir()
    assert stack.client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not results.exists() and not upload.exists()
    gone = stack.client.get(f"/v1/jobs/{job['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"
    assert stack.client.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert job["id"] not in {j["id"] for j in stack.client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]}
