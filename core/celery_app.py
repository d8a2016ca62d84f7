"""The Celery app, configured from ``Settings``; light, because the API imports it to send tasks.

The API sends ``run_job`` by name (``TASK_RUN_JOB``) and never imports ``worker.tasks``; only a
worker imports it (``include``). The message carries the job id, nothing else: the job store holds
the rest.

Delivery guarantees: ``acks_late`` + ``reject_on_worker_lost`` + prefetch 1, so a message is acked
only after its job has finished, and a worker child that dies gives its message back at once. When a
whole worker dies (SIGKILL, lost node) its message stays unacked in Redis; the job's lease expires
and ``recover_orphans`` puts that same message back on the queue (see ``worker.recovery``). The Redis
``visibility_timeout`` is longer than the longest allowed job, so Redis itself never hands a live
job's message to a second worker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Queue

from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_RUN_JOB = "nucseg.run_job"
TASK_RUN_SHARD = "nucseg.run_shard"
QUEUES = ("cpu", "gpu")


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app whose broker is the configured Redis.

    No result backend: a job's state and results live in the job store (``core.store``), and
    nothing ever asks Celery for a task's result."""
    s = settings or get_settings()
    app = Celery("nucseg", broker=s.broker_url, include=["worker.tasks"])
    transport = {"visibility_timeout": s.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue=s.queue,
        task_serializer="json",
        accept_content=["json"],
        task_soft_time_limit=s.job_time_limit_s,
        task_time_limit=s.job_time_limit_s + 120,
        worker_proc_alive_timeout=300,  # a pool process loads torch and the model before it reports up
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def send_job(app: Celery, job_id: str, queue: str) -> None:
    """Enqueue ``run_job`` for ``job_id`` by name; the task id is the job id."""
    app.send_task(TASK_RUN_JOB, kwargs={"job": {"job_id": job_id}}, queue=queue, task_id=job_id)


def send_shard(app: Celery, job_id: str, index: int, queue: str) -> None:
    """Enqueue ``run_shard`` for shard ``index`` of ``job_id``."""
    app.send_task(TASK_RUN_SHARD, kwargs={"shard": {"job_id": job_id, "index": index}}, queue=queue,
                  task_id=f"{job_id}.{index}")


def ping_workers(app: Celery, timeout_s: float = 1.0) -> list[str]:
    """Names of the workers that answered a broadcast ping within ``timeout_s``."""
    replies: list[dict[str, Any]] = app.control.ping(timeout=timeout_s, limit=1) or []
    return sorted(name for reply in replies for name in reply)


_default: Celery | None = None


def default_app() -> Celery:
    """The app built from the process settings (for ``celery -A core.celery_app`` and the CLI)."""
    global _default
    if _default is None:
        _default = create_celery()
        _default.set_default()
    return _default


def __getattr__(name: str) -> Any:
    """``core.celery_app.app`` / ``.celery_app``: built lazily, so importing this module is free."""
    if name in ("app", "celery_app"):
        return default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
