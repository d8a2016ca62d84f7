"""Faults on a stack of its own: Redis restarted under queued jobs, workers lost K+1 times, a kill mid-write.

The stack allows one requeue after a lost worker (``NUCSEG_MAX_REDELIVERIES=1``), so the second
loss fails the job with ``worker_lost``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.processes import stop_group
from tests.helpers.service_stack import FAST, Stack, png_bytes, wait_until

pytestmark = [pytest.mark.service, pytest.mark.slow]

LONG = {"tile_size": 64, "overlap": 16, "block_size": 64, "batch_size": 4, "outputs": ["masks"]}
WRITING = {"tile_size": 64, "overlap": 16, "block_size": 128, "batch_size": 4,
           "outputs": ["masks", "overlays", "nuclei"]}


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack.running(tmp_path_factory.mktemp("faults"), env={"NUCSEG_MAX_REDELIVERIES": "1"}) as running:
        yield running


def _get(stack: Stack, path: str) -> httpx.Response:
    """GET that rides out the moment Redis comes back (the first call may see a dropped connection)."""
    for _ in range(50):
        resp = stack.client.get(path)
        if resp.status_code != 503:
            return resp
        time.sleep(0.1)
    return resp


def test_jobs_queued_when_redis_is_stopped_survive_its_restart_and_complete(faults: Stack) -> None:
    faults.kill_worker()  # nobody consumes: the jobs stay queued
    ids = [faults.submit_upload(png_bytes(64, 64, seed=70 + i), options=FAST).json()["id"] for i in range(5)]
    assert faults.redis is not None
    assert stop_group(faults.redis) == 0  # SIGTERM: redis-server writes its AOF and exits cleanly
    down = faults.client.get(f"/v1/jobs/{ids[0]}")
    assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
    assert (faults.data_dir / "redis" / "appendonlydir").is_dir() or \
        any(p.name.startswith("appendonly") for p in (faults.data_dir / "redis").iterdir())

    faults.start_redis()  # same port, same directory: the AOF is replayed
    for job_id in ids:
        job = _get(faults, f"/v1/jobs/{job_id}")
        assert job.status_code == 200 and job.json()["status"] == "queued", job.text
    faults.start_worker()
    faults.wait_ready()
    for job_id in ids:
        assert faults.wait(job_id, timeout_s=120)["status"] == "succeeded"


def test_a_job_whose_worker_is_lost_twice_fails_with_worker_lost(faults: Stack) -> None:
    job_id = faults.submit_upload(png_bytes(256, 256, seed=80), options=LONG).json()["id"]
    faults.wait(job_id, until=["running"], min_done=2)
    faults.kill_worker()
    faults.wait_lease_expired(job_id)  # no worker past the lease: nobody may touch the job meanwhile
    stuck = faults.job(job_id)
    assert stuck["status"] == "running" and stuck["attempts"] == 1

    faults.start_worker()  # its start-up sweep requeues the job (1 of 1 allowed) and runs it again
    faults.wait_ready()
    again = faults.wait(job_id, until=["running"], min_done=2, timeout_s=120)
    assert (again["attempts"], again["redeliveries"]) == (2, 1)
    faults.kill_worker()
    faults.wait_lease_expired(job_id)

    faults.start_worker()
    faults.wait_ready()
    failed = faults.wait(job_id, until=["failed"], timeout_s=60)
    assert failed["error"]["code"] == "worker_lost" and job_id in failed["error"]["message"]
    assert (failed["attempts"], failed["redeliveries"]) == (2, 1)
    assert not (faults.data_dir / "results" / job_id).exists()
    assert not list((faults.data_dir / "results" / ".partial").glob(f"{job_id}.*"))
    assert not (faults.data_dir / "uploads" / job_id).exists()  # a failed job's upload is removed
    faults.run_good_job()  # the service goes on


def test_a_kill_while_results_are_written_exposes_no_partial_files(faults: Stack) -> None:
    resp = faults.submit_upload(png_bytes(768, 768, seed=90), options=WRITING)
    job_id = resp.json()["id"]
    partial_root = faults.data_dir / "results" / ".partial"

    def writing() -> bool:
        return any(p.is_file() for d in partial_root.glob(f"{job_id}.*") for p in d.iterdir())

    wait_until(writing, timeout_s=120, what="the first result file is on disk, the rest are not")
    faults.kill_worker()
    written = [p.name for d in partial_root.glob(f"{job_id}.*") for p in d.iterdir()]
    job = faults.job(job_id)
    assert job["status"] == "running" and job["results"] is None and written
    assert not (faults.data_dir / "results" / job_id).exists()
    blocked = faults.client.get(f"/v1/jobs/{job_id}/results/{written[0]}")
    assert blocked.status_code == 409 and blocked.json()["error"]["code"] == "results_not_ready"

    faults.wait_lease_expired(job_id)
    faults.start_worker()
    faults.wait_ready()
    done = faults.wait(job_id, timeout_s=240)
    assert done["status"] == "succeeded" and done["redeliveries"] == 1
    final = faults.data_dir / "results" / job_id
    names = {r["name"] for r in done["results"]}
    assert names == {p.name for p in final.iterdir()} and {"job.json", "stats.json", "nuclei.geojson"} <= names
    for link in done["results"]:
        body = faults.client.get(link["href"]).content
        assert len(body) == link["size_bytes"] == (final / link["name"]).stat().st_size
    assert not list(partial_root.glob(f"{job_id}.*"))  # the dead attempt's half-written folder is gone
    assert _files_under(faults.data_dir / "results").count(job_id) == 1


def _files_under(root: Path) -> str:
    return "\n".join(str(p.relative_to(root)).split("/")[0] for p in root.iterdir())
