"""Operations on the compose stack: a worker restarted mid-job, ``down``/``up`` and ``down -v``."""

from __future__ import annotations

from pathlib import Path

from nucseg_client import Client

from tests.compose.conftest import OPTIONS, SLIDE, SlideJob
from tests.helpers.compose_stack import ComposeStack
from tests.helpers.samples import sample
from tests.helpers.service_stack import wait_until


def _running_inference(client: Client, job_id: str) -> bool:
    """Inside its blocks: at least one done, not the last."""
    job = client.job(job_id)
    assert job.status in ("queued", "running"), job.status
    inside = 0 < job.progress.done < job.progress.total - 2
    return job.status == "running" and job.progress.stage == "inference" and inside


def test_worker_restart_mid_job_redelivers_it(compose: ComposeStack, client: Client, cmu_job: SlideJob,
                                              tmp_path: Path) -> None:
    """Killed at once by the restart (Celery's warm shutdown would let this short job finish first),
    the worker's job is taken back and run again to success, with the same masks. Blocks of 96 px
    (the masks do not depend on the block size) keep it inside its 48 blocks long enough to be caught
    there; that is under ``NUCSEG_SHARD_MIN_BLOCKS`` (64), so it runs as one job, not as shards."""
    job = client.submit(sample(SLIDE), options={**OPTIONS, "block_size": 96}, progress=False)
    wait_until(lambda: _running_inference(client, job.id), 300, "job running inference", interval_s=0.2)
    compose.run("restart", "-t", "0", "worker")
    job.wait(timeout=900)
    # run twice: taken back by the recovery sweep (redeliveries) or, when the restarted worker got the
    # message back first, from the dead process of its own name (attempts); either way a second claim
    assert job.status == "succeeded" and job.data["attempts"] >= 2 and job.data["shards"] is None, job.data
    mask = job.download("semantic.png", tmp_path / "semantic.png")
    assert mask.read_bytes() == (cmu_job.results / "semantic.png").read_bytes()


def test_down_up_keeps_jobs_and_down_v_removes_them(compose: ComposeStack, client: Client,
                                                    cmu_job: SlideJob, tmp_path: Path) -> None:
    compose.run("stop", "worker")
    queued = client.submit(sample(SLIDE), options=OPTIONS, progress=False)
    assert queued.status == "queued"
    compose.run("down")
    compose.up()
    kept = client.job(cmu_job.id)
    assert kept.status == "succeeded"
    mask = kept.download("semantic.png", tmp_path / "semantic.png")
    assert mask.read_bytes() == (cmu_job.results / "semantic.png").read_bytes()
    queued.wait(timeout=900)  # its message outlived the stack too: the new worker runs it
    assert queued.status == "succeeded"

    compose.run("down", "-v")
    compose.up()
    with compose.client_for("lab-a") as owner:
        for job_id in (cmu_job.id, queued.id):
            assert owner.get(f"/v1/jobs/{job_id}").status_code == 404
        assert owner.get("/v1/jobs").json()["jobs"] == []
