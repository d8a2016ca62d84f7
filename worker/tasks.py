"""The job task: one attempt at one job.

``run_job`` is thin: it takes ``{"job_id": ...}``, claims the job in the store (a job already
finished, cancelled, or owned by a live process is dropped, so duplicate messages are harmless),
keeps a lease alive while it runs, and hands the slide to ``model.pipeline.run_prediction``. Results
go into the local ``results/.partial/<id>.<token>`` and are published to the store only when
complete, with ``job.json`` (the durable record) inside. A slide held by an object store is fetched
into the worker's slide cache first, so a worker needs no disk shared with the API.

Failures are permanent (a bad slide, bad options, a broken checkpoint, a bug: the job fails at once
with the error's code) or transient (I/O, memory, Redis: retried with exponential backoff up to
``max_retries`` times; a store that is down or refuses us, ``storage_unavailable``, is transient).

A worker that dies mid-job leaves its message unacked in Redis and its lease expiring; the
recovery sweep (``worker.recovery``), started here in each worker's main process with webhook
dispatch (``worker.webhooks``), puts such a job back on its queue. The per-process store and model
are in ``worker.resources``, the result folder and ``job.json`` in ``worker.results``.

torch and the engine are imported lazily, inside the functions that run jobs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, Task, shared_task, signals
from pydantic import BaseModel, ConfigDict

from core.celery_app import TASK_RUN_JOB, send_shard
from core.leases import LeaseKeeper, Throttle, dead_local_owner, new_token
from core.records import JobError, JobRecord, Progress, Status
from core.retention import discard_ended, discard_shard_parts
from core.settings import Settings, get_settings
from core.shards import ShardStore
from core.storage import open_storage
from model.errors import CancelledError, NucsegError
from model.options import Stats, engine_options
from worker.failures import RetryableError, classify_failure, redact, retry_delay
from worker.recovery import sweep_forever
from worker.resources import get_model, process_store
from worker.results import publish_results, remove_partials, slide_facts, write_job_json
from worker.shards import fetch_parts, shard_ranges, shard_scratch
from worker.slides import job_slide, stored_slide
from worker.webhooks import dispatch_forever

if TYPE_CHECKING:
    from model.checkpoint import LoadedModel
    from model.options import EngineOptions
    from model.readers import SlideReader

log = logging.getLogger(__name__)


class JobMessage(BaseModel):
    """What travels through the broker: the job id only."""

    model_config = ConfigDict(extra="forbid")

    job_id: str


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
    threading.Thread(target=sweep_forever, args=(app,), name="nucseg-sweeper", daemon=True).start()
    settings = get_settings()
    threading.Thread(target=dispatch_forever, args=(process_store(settings), settings), name="nucseg-webhooks",
                     daemon=True).start()


@shared_task(name=TASK_RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_job(self: Task, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job by id; returns a small summary (the job store has the full record)."""
    message = JobMessage.model_validate(job)
    runner = JobRunner(message.job_id, get_settings(), self.app, worker=str(self.request.hostname or "worker"),
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

    def __init__(self, job_id: str, settings: Settings, app: Celery, *, worker: str, delivery_tag: str) -> None:
        self.job_id, self.settings, self.app, self.worker = job_id, settings, app, worker
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
                discard_ended(self.settings, cancelled)
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
            if stats is None:
                return {"job_id": self.job_id, "status": "sharded"}
            return self._succeed(record, stats, started)
        except CancelledError as exc:
            return self._end(record, "cancelled", started, stage="cancelled", lost=lease.lost.is_set(),
                             note=str(exc))
        except Exception as exc:
            transient, error = classify_failure(exc)
            error = error.model_copy(update={"message": redact(error.message, record, self.settings)})
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
    def _execute(self, record: JobRecord, lease: LeaseKeeper) -> Stats | None:
        """The job's stats; None when it was cut into shards that now run on their own."""
        from model.checkpoint import sha256_file
        from model.pipeline import predict_reader
        from model.readers import open_slide

        self._progress("loading_model")
        model = get_model(self.settings.model, self.settings.model_sha256)
        if stored_slide(self.settings, record):
            self._progress("fetching")
        slide = job_slide(self.settings, record, lease.lost.is_set)
        if not record.slide.get("sha256"):
            self._progress("hashing")
            digest = sha256_file(slide, should_stop=lease.lost.is_set)
            record.slide.update(sha256=digest, size_bytes=slide.stat().st_size)
            self._update(slide=record.slide)
        options = engine_options(record.options, device=self.settings.device, precision=self.settings.precision)
        outputs = frozenset(record.options["outputs"])
        reader = open_slide(slide, max_image_pixels=self.settings.max_image_pixels,
                            max_slide_pixels=self.settings.max_slide_pixels)
        try:
            if record.shards:
                stats = self._merge(record, reader, model, options, outputs, lease)
            elif (ranges := shard_ranges(self.settings, reader, model, options, outputs)) is not None:
                self._dispatch(record, ranges)
                return None
            else:
                self._progress("inference")
                stats = predict_reader(reader, self.partial, model, options, outputs=outputs,
                                       on_progress=self._on_blocks, should_cancel=lambda: self._should_cancel(lease))
        finally:
            reader.close()
        if self._should_cancel(lease):
            raise CancelledError("cancelled after the last block, before the results were published")
        self._progress("writing", stats["blocks"]["total"], stats["blocks"]["total"])
        return stats

    def _dispatch(self, record: JobRecord, ranges: list[range]) -> None:
        """Hand the job to its shards and send the first of them."""
        blocks = [(r.start, r.stop) for r in ranges]
        sent = ShardStore(self.store).start(self.job_id, self.token, blocks, parallel=self.settings.shard_parallel)
        if sent is None:
            raise CancelledError(f"job {self.job_id}: this worker no longer owns the job")
        for index in sent:
            send_shard(self.app, self.job_id, index, record.queue)
        log.info("job %s: cut into %d shards", self.job_id, len(blocks))

    def _merge(self, record: JobRecord, reader: SlideReader, model: LoadedModel, options: EngineOptions,
               outputs: frozenset[str], lease: LeaseKeeper) -> Stats:
        """The finished shards' parts, replayed into the job's results."""
        from model.shards import merge_shards

        assert record.shards is not None
        self._progress("merging")
        scratch = shard_scratch(self.settings)
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            parts = fetch_parts(open_storage(self.settings), record.shards, Path(tmp), lease.lost.is_set)
            return merge_shards(reader, parts, self.partial, model, options, outputs=outputs)

    def _succeed(self, record: JobRecord, stats: Stats, started: float) -> dict[str, Any]:
        finished = time.time()
        slide = {**record.slide, **slide_facts(stats)}
        model = {k: stats["model"][k] for k in ("name", "version", "encoder", "sha256", "format")}
        record = record.model_copy(update={"slide": slide, "model": model, "status": "succeeded"})
        write_job_json(self.partial, record, stats, self.worker, started, finished)
        prefix, results = publish_results(open_storage(self.settings), self.partial, self.job_id,
                                          self.partial.name.split(".", 1)[1])
        total = stats["blocks"]["total"]
        done = self.store.finish(self.job_id, self.token, "succeeded", slide=slide, model=model,
                                 results=results, result_key=prefix,
                                 progress=Progress(stage="done", done=total, total=total))
        if not done:  # the lease was lost meanwhile: another attempt owns the job now
            log.warning("job %s: finished but no longer the owner; leaving the record alone", self.job_id)
            return {"job_id": self.job_id, "status": "lost"}
        self._observe("succeeded", started, finished, stats["tiles"]["run"])
        if record.shards:
            discard_shard_parts(self.settings, self.job_id)
        return {"job_id": self.job_id, "status": "succeeded", "results": [r["name"] for r in results]}

    def _end(self, record: JobRecord, status: Status, started: float, *, stage: str,
             error: JobError | None = None, lost: bool = False, note: str = "") -> dict[str, Any]:
        shutil.rmtree(self.partial, ignore_errors=True)  # this attempt's own files, gone before the job ends
        if lost:
            log.warning("job %s: stopped because the lease was lost; another attempt owns it", self.job_id)
            return {"job_id": self.job_id, "status": "lost"}
        progress = record.progress.model_copy(update={"stage": stage})
        current = self.store.get(self.job_id)
        if current is not None:
            progress = current.progress.model_copy(update={"stage": stage})
        if self.store.finish(self.job_id, self.token, status, error=error, progress=progress):
            self._observe(status, started, time.time(), 0)
            discard_ended(self.settings, record)
        log.info("job %s: %s %s", self.job_id, status, note or (error.code if error else ""))
        return {"job_id": self.job_id, "status": status}

    def _retry(self, record: JobRecord, error: JobError) -> dict[str, Any]:
        delay = retry_delay(self.settings, record.retries)
        if not self.store.schedule_retry(self.job_id, self.token, delay, error):
            return {"job_id": self.job_id, "status": "lost"}
        raise RetryableError(error, delay)

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
        return self.store.cancel_requested(self.job_id)

    def _observe(self, status: str, started: float, finished: float, tiles: int) -> None:
        try:
            self.store.metrics.observe(status, finished - started, tiles)
        except redis.RedisError as exc:
            log.warning("metrics not recorded: %s", exc)
