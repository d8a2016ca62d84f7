"""The job task and the worker's recovery sweep.

``run_job`` is thin: it takes ``{"job_id": ...}``, claims the job in the store (a job already
finished, cancelled, or owned by a live process is dropped, so duplicate messages are harmless),
keeps a lease alive while it runs, and hands the slide to ``model.pipeline.run_prediction``. Results
go into ``results/.partial/<id>.<token>`` and are renamed to ``results/<id>`` only when complete,
with ``job.json`` (the durable record) inside.

Failures are permanent (a bad slide, bad options, a broken checkpoint, a bug: the job fails at once
with the error's code) or transient (I/O, memory, Redis: retried with exponential backoff up to
``max_retries`` times).

A worker that dies mid-job leaves its message unacked in Redis and its lease expiring. Every worker
runs ``recover_orphans`` at start and then every ``sweep_interval_s``: each running job without a
lease is put back to ``queued`` and its original message is restored to the front of its queue (or a
fresh one is sent if that message is gone), at most ``max_redeliveries`` times, then it fails with
``worker_lost``.

torch and the engine are imported lazily, inside the functions that run jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, Task, shared_task, signals
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ConfigDict

from core.celery_app import TASK_RUN_JOB, send_job
from core.jobs import (
    JobError,
    JobRecord,
    JobStore,
    LeaseKeeper,
    Orphan,
    Progress,
    Status,
    Throttle,
    dead_local_owner,
    new_token,
)
from core.retention import discard_upload
from core.retention import sweep as sweep_retention
from core.settings import Settings, get_settings
from model.errors import CancelledError, NucsegError
from worker.webhooks import dispatch_forever

if TYPE_CHECKING:
    from model.checkpoint import LoadedModel

log = logging.getLogger(__name__)

CONTENT_TYPES = {".png": "image/png", ".json": "application/json", ".geojson": "application/geo+json",
                 ".tiff": "image/tiff"}
MAX_BACKOFF_S = 600.0


class JobMessage(BaseModel):
    """What travels through the broker: the job id only."""

    model_config = ConfigDict(extra="forbid")

    job_id: str


class RetryableError(Exception):
    """A transient failure; the job goes back to the queue after a delay."""

    def __init__(self, error: JobError, delay_s: float) -> None:
        super().__init__(error.message)
        self.error, self.delay_s = error, delay_s


# ---------------------------------------------------------------- per-process resources

_stores: dict[int, JobStore] = {}


def process_store(settings: Settings | None = None) -> JobStore:
    """One store (and Redis connection pool) per process; rebuilt after a fork."""
    pid = os.getpid()
    if pid not in _stores:
        url = (settings or get_settings()).broker_url
        _stores.clear()
        _stores[pid] = JobStore(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30))
    return _stores[pid]


_model_lock = threading.Lock()


def get_model(path: str, sha256: str | None) -> LoadedModel:
    """The checkpoint, loaded once per process, and announced in the store for ``/v1/models``."""
    with _model_lock:
        return _load_model(path, sha256)


@lru_cache(maxsize=2)
def _load_model(path: str, sha256: str | None) -> LoadedModel:
    from model.checkpoint import load_model

    started = time.perf_counter()
    model = load_model(path, expected_sha256=sha256)
    seconds = time.perf_counter() - started
    log.info("loaded model %s (%s) in %.1f s", Path(path).name, model.sha256[:12], seconds)
    info = {"sha256": model.sha256, "file": model.path.name, "format": model.format,
            "card": model.card.public(), "loaded_at": time.time(), "worker": os.uname().nodename}
    try:
        process_store().publish_model(model.sha256, info)
    except redis.RedisError as exc:
        log.warning("could not publish the model card: %s", exc)
    return model


@signals.worker_process_init.connect
def _preload_model(**_: Any) -> None:
    """Load the model as the pool process starts, so the first job does not wait for it."""
    settings = get_settings()
    try:
        get_model(settings.model, settings.model_sha256)
    except NucsegError as exc:  # jobs will fail with the error's code; the worker stays up
        log.error("model not loaded at start: %s", exc)


@signals.worker_ready.connect
def _start_sweeper(sender: Any, **_: Any) -> None:
    """Recover orphaned jobs now and every ``sweep_interval_s``, from the worker's main process."""
    app: Celery = sender.app
    threading.Thread(target=_sweep_forever, args=(app,), name="nucseg-sweeper", daemon=True).start()
    settings = get_settings()
    threading.Thread(target=dispatch_forever, args=(process_store(settings), settings), name="nucseg-webhooks",
                     daemon=True).start()


# ---------------------------------------------------------------- the task


@shared_task(name=TASK_RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_job(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job by id; returns a small summary (the job store has the full record)."""
    message = JobMessage.model_validate(job)
    runner = JobRunner(message.job_id, get_settings(), worker=str(self.request.hostname or "worker"),
                       delivery_tag=_delivery_tag(self))
    try:
        return runner.run()
    except RetryableError as exc:
        raise self.retry(countdown=exc.delay_s, exc=exc) from exc


def _delivery_tag(task: Task) -> str:
    properties = task.request.properties or {}
    return str(properties.get("delivery_tag") or "")


class JobRunner:
    """One attempt at one job: claim, run under a lease, publish or fail."""

    def __init__(self, job_id: str, settings: Settings, *, worker: str, delivery_tag: str) -> None:
        self.job_id, self.settings, self.worker = job_id, settings, worker
        self.delivery_tag = delivery_tag
        self.store = process_store(settings)
        self.token = new_token(worker)
        self.throttle = Throttle(settings.progress_interval_s)
        self.partial = settings.results_dir / ".partial" / f"{job_id}.{self.token.replace(':', '_')}"

    def run(self) -> dict[str, Any]:
        outcome = self._claim()
        if outcome != "claimed":
            log.info("job %s: not running it (%s)", self.job_id, outcome)
            if outcome == "cancelled" and (cancelled := self.store.get(self.job_id)) is not None:
                discard_upload(self.settings, cancelled)
            return {"job_id": self.job_id, "skipped": outcome}
        record = self.store.get(self.job_id)
        assert record is not None
        remove_partials(self.settings, self.job_id)
        with LeaseKeeper(self.store, self.job_id, self.token, self.settings.lease_ttl_s) as lease:
            return self._attempt(record, lease)

    def _claim(self) -> str:
        claim = partial(self.store.claim, self.job_id, self.token, lease_ttl_s=self.settings.lease_ttl_s,
                        delivery_tag=self.delivery_tag, worker=self.worker)
        outcome = claim()
        owner = self.store.lease_owner(self.job_id) if outcome == "busy" else None
        if owner and dead_local_owner(owner, self.worker):
            log.warning("job %s: taking over from dead pool process %s", self.job_id, owner)
            outcome = claim(stale_owner=owner)
        return outcome

    def _attempt(self, record: JobRecord, lease: LeaseKeeper) -> dict[str, Any]:
        started = time.time()
        try:
            stats = self._execute(record, lease)
            return self._succeed(record, stats, started)
        except CancelledError as exc:
            return self._end(record, "cancelled", started, stage="cancelled", lost=lease.lost.is_set(),
                             note=str(exc))
        except Exception as exc:
            transient, error = classify(exc)
            error = error.model_copy(update={"message": self._redact(error.message, record)})
            log.warning("job %s: %s error %s: %s", self.job_id, "transient" if transient else "permanent",
                        error.code, error.message, exc_info=not isinstance(exc, NucsegError))
            if transient and record.retries < self.settings.max_retries:
                return self._retry(record, error)
            if transient:
                error = JobError(code=error.code, message=f"{error.message} (gave up after "
                                 f"{record.retries} retries)")
            return self._end(record, "failed", started, stage="failed", error=error)
        finally:
            shutil.rmtree(self.partial, ignore_errors=True)  # already renamed away after a success

    # the work itself
    def _execute(self, record: JobRecord, lease: LeaseKeeper) -> dict[str, Any]:
        from model.engine import EngineOptions
        from model.pipeline import run_prediction

        self._progress("loading_model")
        model = get_model(self.settings.model, self.settings.model_sha256)
        slide = self._slide_path(record)
        if not record.slide.get("sha256"):
            self._progress("hashing")
            record.slide.update(sha256=sha256_file(slide, lease), size_bytes=slide.stat().st_size)
            self._update(slide=record.slide)
        opts = record.options
        options = EngineOptions(tile_size=opts["tile_size"], overlap=opts["overlap"],
                                block_size=opts["block_size"], batch_size=opts["batch_size"],
                                tissue=opts.get("tissue"), mpp=opts.get("mpp"),
                                device=self.settings.device, precision=self.settings.precision)
        self._progress("inference")
        stats = run_prediction(
            slide, self.partial, model, options, outputs=frozenset(opts["outputs"]),
            on_progress=self._on_blocks, should_cancel=lambda: self._should_cancel(lease),
            max_image_pixels=self.settings.max_image_pixels, max_slide_pixels=self.settings.max_slide_pixels,
        )
        if self._should_cancel(lease):
            raise CancelledError("cancelled after the last block, before the results were published")
        self._progress("writing", stats["blocks"]["total"], stats["blocks"]["total"])
        return stats

    def _slide_path(self, record: JobRecord) -> Path:
        """The slide file; a path job is re-checked against the slide root (symlinks may have moved)."""
        path = Path(record.slide_file)
        root = self.settings.slide_root
        if record.slide.get("source") == "path" and root is not None:
            resolved = path.resolve()
            if not resolved.is_relative_to(root.resolve()):
                from model.errors import UnsupportedSlideError

                raise UnsupportedSlideError(
                    f"slide_path {record.slide.get('path')!r} now resolves outside the slide root")
        return path

    def _succeed(self, record: JobRecord, stats: dict[str, Any], started: float) -> dict[str, Any]:
        finished = time.time()
        slide = {**record.slide, **_slide_facts(stats)}
        model = {k: stats["model"][k] for k in ("name", "version", "encoder", "sha256", "format")}
        record = record.model_copy(update={"slide": slide, "model": model, "status": "succeeded"})
        write_job_json(self.partial, record, stats, self.worker, started, finished)
        results = publish_results(self.partial, self.settings.results_dir / self.job_id)
        total = stats["blocks"]["total"]
        done = self.store.finish(self.job_id, self.token, "succeeded", slide=slide, model=model,
                                 results=results, progress=Progress(stage="done", done=total, total=total))
        if not done:  # the lease was lost meanwhile: another attempt owns the job now
            log.warning("job %s: finished but no longer the owner; leaving the record alone", self.job_id)
            return {"job_id": self.job_id, "status": "lost"}
        self._observe("succeeded", started, finished, stats["tiles"]["run"])
        return {"job_id": self.job_id, "status": "succeeded", "results": [r["name"] for r in results]}

    def _end(self, record: JobRecord, status: Status, started: float, *, stage: str,
             error: JobError | None = None, lost: bool = False, note: str = "") -> dict[str, Any]:
        if lost:
            log.warning("job %s: stopped because the lease was lost; another attempt owns it", self.job_id)
            return {"job_id": self.job_id, "status": "lost"}
        progress = record.progress.model_copy(update={"stage": stage})
        current = self.store.get(self.job_id)
        if current is not None:
            progress = current.progress.model_copy(update={"stage": stage})
        if self.store.finish(self.job_id, self.token, status, error=error, progress=progress):
            self._observe(status, started, time.time(), 0)
            discard_upload(self.settings, record)
        log.info("job %s: %s %s", self.job_id, status, note or (error.code if error else ""))
        return {"job_id": self.job_id, "status": status}

    def _retry(self, record: JobRecord, error: JobError) -> dict[str, Any]:
        delay = min(self.settings.retry_backoff_s * 2 ** record.retries, MAX_BACKOFF_S)
        if not self.store.schedule_retry(self.job_id, self.token, delay, error):
            return {"job_id": self.job_id, "status": "lost"}
        raise RetryableError(error, delay)

    def _redact(self, message: str, record: JobRecord) -> str:
        """Error messages name the slide as the client knows it, never by its server path."""
        shown = str(record.slide.get("path") or record.slide.get("name") or "slide")
        message = message.replace(record.slide_file, shown).replace(repr(Path(record.slide_file).name), repr(shown))
        return message.replace(str(self.settings.data_dir), "<data>")

    # progress and cancellation
    def _on_blocks(self, done: int, total: int) -> None:
        if self.throttle.ready(force=done == total):
            self._progress("inference", done, total, force=True)

    def _progress(self, stage: str, done: int = 0, total: int = 0, *, force: bool = True) -> None:
        if force or self.throttle.ready():
            self._update(progress=Progress(stage=stage, done=done, total=total))

    def _update(self, **fields: Any) -> None:
        owned, _ = self.store.update(self.job_id, self.token, **fields)
        if not owned:
            raise CancelledError(f"job {self.job_id}: this worker no longer owns the job")

    def _should_cancel(self, lease: LeaseKeeper) -> bool:
        if lease.lost.is_set():
            return True
        return self.store.r.hget(self.store.job_key(self.job_id), "cancel_requested") == "1"

    def _observe(self, status: str, started: float, finished: float, tiles: int) -> None:
        try:
            self.store.observe(status, finished - started, tiles)
        except redis.RedisError as exc:
            log.warning("metrics not recorded: %s", exc)


def classify(exc: BaseException) -> tuple[bool, JobError]:
    """``(transient, error)``: the code and message a failed job shows."""
    if isinstance(exc, NucsegError):
        return False, JobError(code=exc.code, message=str(exc))
    if isinstance(exc, SoftTimeLimitExceeded):
        return False, JobError(code="time_limit_exceeded", message="the job ran past NUCSEG_JOB_TIME_LIMIT_S")
    if isinstance(exc, ValueError):
        return False, JobError(code="invalid_options", message=str(exc))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True, JobError(code="out_of_memory", message=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, redis.RedisError):
        return True, JobError(code="store_unavailable", message=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return True, JobError(code="io_error", message=f"{type(exc).__name__}: {exc}")
    return False, JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- results on disk


def sha256_file(path: Path, lease: LeaseKeeper | None = None, chunk: int = 4 << 20) -> str:
    """Hex sha256 of a file; stops early (CancelledError) if the lease is lost."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            if lease is not None and lease.lost.is_set():
                raise CancelledError(f"lease lost while hashing {path.name!r}")
    return digest.hexdigest()


def _slide_facts(stats: dict[str, Any]) -> dict[str, Any]:
    s, a = stats["slide"], stats["analysis"]
    return {"width": s["dimensions"][0], "height": s["dimensions"][1], "levels": s["levels"],
            "mpp": s["mpp"], "format": s["format"],
            "analysis": {"width": a["width"], "height": a["height"], "mpp": a["mpp"], "level": a["level"]}}


def write_job_json(out_dir: Path, record: JobRecord, stats: dict[str, Any], worker: str,
                   started: float, finished: float) -> None:
    """The durable record of a finished job, next to its results."""
    doc = {
        "id": record.id, "status": record.status,
        "created_at": _iso(record.created_at), "started_at": _iso(started), "finished_at": _iso(finished),
        "options": record.options, "metadata": record.metadata,
        "slide": {k: v for k, v in record.slide.items() if k != "path"} | {"path": record.slide.get("path")},
        "model": record.model,
        "timings_s": {"queued": round(started - record.created_at, 3), "run": round(finished - started, 3),
                      "engine": stats.get("timings_s", {})},
        "versions": stats.get("versions", {}),
        "worker": worker, "attempts": record.attempts, "retries": record.retries,
        "redeliveries": record.redeliveries,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "job.json").write_text(json.dumps(doc, indent=2))


def publish_results(partial: Path, final: Path) -> list[dict[str, Any]]:
    """Rename the complete result folder into place; returns its file list."""
    if final.exists():  # an earlier attempt published, then died before recording it
        trash = partial.with_name(partial.name + ".old")
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    partial.rename(final)
    return [
        {"name": p.name, "size_bytes": p.stat().st_size,
         "content_type": CONTENT_TYPES.get(p.suffix, "application/octet-stream")}
        for p in sorted(final.iterdir()) if p.is_file()
    ]


def remove_partials(settings: Settings, job_id: str) -> None:
    """Remove half-written result folders that dead attempts at ``job_id`` left behind."""
    folder = settings.results_dir / ".partial"
    if folder.is_dir():
        for stale in folder.glob(f"{job_id}.*"):
            shutil.rmtree(stale, ignore_errors=True)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()


# ---------------------------------------------------------------- recovery


def recover_orphans(app: Celery, store: JobStore, settings: Settings) -> list[Orphan]:
    """Requeue (or fail) running jobs whose process is gone; resend lost retry messages."""
    handled: list[Orphan] = []
    for job_id in store.orphans():
        orphan = store.recover(job_id, max_redeliveries=settings.max_redeliveries)
        if orphan is None:
            continue
        if orphan.action == "requeued":
            how = redeliver(app, orphan)
            log.warning("job %s: its worker is gone; requeued (%s)", job_id, how)
        else:
            remove_partials(settings, job_id)
            if (record := store.get(job_id)) is not None:
                discard_upload(settings, record)
            log.warning("job %s: its worker is gone; %s", job_id, orphan.action)
        handled.append(orphan)
    grace = 2 * settings.lease_ttl_s + settings.sweep_interval_s
    for job_id in store.overdue_retries(grace):
        record = store.get(job_id)
        if record is not None and record.status == "queued":
            log.warning("job %s: its retry is overdue; sending it again", job_id)
            send_job(app, job_id, record.queue)
        store.touch_retry(job_id, grace)
    return handled


def redeliver(app: Celery, orphan: Orphan) -> str:
    """Put the orphan's own unacked message back at the front of its queue, else send a new one."""
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        tag = orphan.delivery_tag
        if tag and channel.client.hexists(channel.unacked_key, tag):
            channel.qos.restore_by_tag(tag, leftmost=False)  # RPUSH: the next message BRPOP takes
            return "restored"
    send_job(app, orphan.job_id, orphan.queue)
    return "resent"


def _sweep_forever(app: Celery) -> None:
    settings = get_settings()
    next_retention = 0.0
    while True:
        try:
            recover_orphans(app, process_store(settings), settings)
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + settings.retention_interval_s
                sweep_retention(process_store(settings), settings)
        except Exception:  # keep sweeping through Redis outages
            log.exception("recovery sweep failed")
        time.sleep(settings.sweep_interval_s)
