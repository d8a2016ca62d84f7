"""A worker SIGKILLed mid-job: the job is redelivered to a new worker and finishes; nothing is lost."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import redis
from PIL import Image

from tests.helpers.service_stack import FAST, Stack, png_bytes, wait_until

pytestmark = [pytest.mark.service, pytest.mark.slow]

LONG = {"tile_size": 64, "overlap": 16, "block_size": 64, "batch_size": 4, "outputs": ["masks"]}


def _broker(stack: Stack) -> redis.Redis:
    return redis.Redis(port=stack.redis_port, decode_responses=True)


def test_sigkill_worker_mid_job_then_new_worker_finishes_it(stack: Stack) -> None:
    victim = stack.submit_upload(png_bytes(256, 256, seed=31), options=LONG).json()
    others = [stack.submit_upload(png_bytes(64, 64, seed=32 + i), options=FAST).json() for i in range(2)]
    stack.wait(victim["id"], until=["running"], min_done=2)
    broker = _broker(stack)
    assert broker.hlen("unacked") == 1  # prefetch 1: only the running job's message is out

    stack.kill_worker()
    before = stack.job(victim["id"])
    assert before["status"] == "running" and before["attempts"] == 1
    assert before["progress"]["done"] < before["progress"]["total"]
    assert broker.hlen("unacked") == 1 and broker.llen("cpu") == 2  # unacked, not lost, not redelivered

    stack.wait_lease_expired(victim["id"])  # recovery must not need Redis' visibility timeout
    stack.start_worker()
    stack.wait_ready()
    done = stack.wait(victim["id"], timeout_s=180)
    assert done["status"] == "succeeded", done
    assert (done["attempts"], done["redeliveries"]) == (2, 1)
    _check_complete(stack, done, (256, 256))
    for job in others:
        finished = stack.wait(job["id"], timeout_s=60)
        assert finished["status"] == "succeeded" and finished["redeliveries"] == 0
    partial = stack.data_dir / "results" / ".partial"
    assert [p for p in partial.iterdir() if p.name.startswith(victim["id"])] == []
    wait_until(lambda: broker.hlen("unacked") == 0, what="the ack that follows the job's last store update")
    assert broker.llen("cpu") == 0


def test_sigkill_pool_process_then_a_new_pool_process_finishes_the_job(stack: Stack) -> None:
    """Only the pool child dies (an OOM kill): the worker requeues the message and a new child runs it.

    The new child claims the job by taking over the dead child's lease (same worker, pid gone) or,
    when it starts after that lease expired, after the sweep has requeued it.
    """
    import psutil

    job = stack.submit_upload(png_bytes(256, 256, seed=41), options=LONG).json()
    stack.wait(job["id"], until=["running"], min_done=1)
    assert stack.worker is not None
    children = psutil.Process(stack.worker.pid).children()
    assert len(children) == 1
    children[0].kill()
    done = stack.wait(job["id"], timeout_s=180)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    _check_complete(stack, done, (256, 256))
    stack.run_good_job()


def _check_complete(stack: Stack, job: dict, size: tuple[int, int]) -> None:
    names = {r["name"] for r in job["results"]}
    assert names == {"job.json", "stats.json", "semantic.png", "ternary.png", "semantic.tiff", "ternary.tiff"}
    stats = json.loads(stack.client.get(f"{job['href']}/results/stats.json").content)
    png = Image.open(io.BytesIO(stack.client.get(f"{job['href']}/results/semantic.png").content))
    assert png.size == size
    counts = np.bincount(np.asarray(png).ravel(), minlength=5)
    assert [c["pixels"] for c in stats["semantic"]["classes"].values()] == counts[:5].tolist()
    record = json.loads(stack.client.get(f"{job['href']}/results/job.json").content)
    assert record["attempts"] == job["attempts"]
