"""Operations on the compose stack: a worker restarted mid-job, ``down``/``up`` and ``down -v``."""

from __future__ import annotations

from pathlib import Path

from nucseg_client import Client

from tests.compose.conftest import OPTIONS, SLIDE, SlideJob
from tests.helpers.compose_stack import ComposeStack
from tests.helpers.samples import sample
from tests.helpers.service_stack import wait_until


def _running_inference(client: Client, job_id: str) -> bool:
    job = client.job(job_id)
    assert job.status in ("queued", "running"), job.status
    return job.status == "running" and job.progress.stage == "inference"


def test_worker_restart_mid_job_redelivers_it(compose: ComposeStack, client: Client, cmu_job: SlideJob,
                                              tmp_path: Path) -> None:
    """Killed 2 s into its stop (the 60 s grace would let this short job finish first), the worker's
    job is taken back after its lease expires and run again to success, with the same masks."""
    job = client.submit(sample(SLIDE), options=OPTIONS, progress=False)
    wait_until(lambda: _running_inference(client, job.id), 300, "job running inference", interval_s=0.5)
    compose.run("restart", "-t", "2", "worker")
    job.wait(timeout=900)
    assert job.status == "succeeded" and job.data["redeliveries"] >= 1, job.data
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
