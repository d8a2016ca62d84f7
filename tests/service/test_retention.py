"""Retention on a stack of its own (``NUCSEG_RESULT_TTL=3`` s): finished jobs expire, running ones never do,
and uploads of failed and cancelled jobs go at once.

The worker sweeps every 0.5 s under a Redis lock (one worker at a time). While a test must read a
finished job before its TTL could pass, it holds that lock itself (``retention_paused``), so no
assumption about how fast the machine is can make a job vanish before it was read.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
import redis

from core.keys import Keys
from tests.helpers.service_stack import FAST, Stack, png_bytes, wait_until

pytestmark = [pytest.mark.service, pytest.mark.slow]

TTL_S = 3.0
SLOW = {"tile_size": 64, "overlap": 16, "block_size": 64, "batch_size": 1, "outputs": ["masks"]}
SLOW_SIDE = 960  # many blocks at batch 1 (the stack caps images at 1 Mpx)


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"NUCSEG_RESULT_TTL": str(TTL_S), "NUCSEG_RETENTION_INTERVAL_S": "0.5"}
    with Stack.running(tmp_path_factory.mktemp("retention"), env=env) as running:
        yield running


@contextlib.contextmanager
def retention_paused(stack: Stack, timeout_s: float = 30.0) -> Iterator[None]:
    """Hold the retention sweep's lock, so no worker sweeps until the block ends."""
    broker = redis.Redis(port=stack.redis_port)
    lock, token = Keys.RETENTION_LOCK, b"held by the retention test"
    deadline = time.monotonic() + timeout_s
    try:
        while not broker.set(lock, token, nx=True):  # a sweep holds it for at most one interval
            assert time.monotonic() < deadline, "the retention lock was never free"
            time.sleep(0.05)
        yield
    finally:
        if broker.get(lock) == token:
            broker.delete(lock)
        broker.close()


def _gone(stack: Stack, job_id: str) -> float:
    wait_until(lambda: stack.client.get(f"/v1/jobs/{job_id}").status_code == 404, what=f"job {job_id} expires",
               interval_s=0.1)
    return time.time()


def test_finished_jobs_expire_but_a_running_job_is_never_touched(short_lived: Stack) -> None:
    stack = short_lived
    with retention_paused(stack):
        done = stack.run_good_job()
        finished = datetime.fromisoformat(done["finished_at"]).timestamp()
        assert abs(datetime.fromisoformat(done["expires_at"]).timestamp() - (finished + TTL_S)) < 0.01
        results, upload = stack.data_dir / "results" / done["id"], stack.data_dir / "uploads" / done["id"]
        assert results.is_dir() and upload.is_dir()
        slow = stack.submit_upload(png_bytes(SLOW_SIDE, SLOW_SIDE, seed=5), options=SLOW).json()["id"]
        stack.wait(slow, until=["running"], min_done=1)

    removed_at = _gone(stack, done["id"])  # the sweeps run again, while the slow job runs
    assert removed_at >= finished + TTL_S - 0.05  # not before its time
    # the sweep deletes the record first (no job is ever listed without its files), then the folders
    wait_until(lambda: not results.exists() and not upload.exists(), timeout_s=10, what="the job's folders removed")
    with retention_paused(stack):  # the slow job survived every sweep since it started
        running = stack.job(slow)
        assert running["status"] in ("running", "succeeded"), running
        if running["status"] == "running":
            assert running["expires_at"] is None
        final = stack.wait(slow, timeout_s=240)
        assert final["status"] == "succeeded" and final["expires_at"] is not None, final
    _gone(stack, slow)
    wait_until(lambda: not (stack.data_dir / "results" / slow).exists(), timeout_s=10, what="slow job's results gone")


def test_uploads_of_failed_and_cancelled_jobs_are_removed_at_once(short_lived: Stack) -> None:
    stack = short_lived
    with retention_paused(stack):  # the failed job must still be there when it is read
        blocker = stack.submit_upload(png_bytes(512, 512, seed=6), options=SLOW).json()["id"]
        stack.wait(blocker, until=["running"], min_done=1)  # the one worker is busy: the next jobs wait
        doomed = stack.submit_upload(png_bytes(64, 64, seed=7), options=FAST).json()["id"]
        cancelled = stack.submit_upload(png_bytes(64, 64, seed=8), options=FAST).json()["id"]
        uploads = stack.data_dir / "uploads"
        stored = next((uploads / doomed).iterdir())
        stored.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # breaks after it was accepted

        assert stack.client.delete(f"/v1/jobs/{cancelled}").status_code == 200
        assert not (uploads / cancelled).exists()  # cancelled while queued: removed by the API at once

        failed = stack.wait(doomed, timeout_s=240)
        assert failed["status"] == "failed" and failed["error"]["code"] == "unreadable_slide", failed
        assert not (uploads / doomed).exists()  # removed by the worker as the job failed
        assert stack.job(blocker)["status"] in ("running", "succeeded")
