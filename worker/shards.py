"""One shard of a sharded job: the ``run_shard`` task, and what the job task needs to cut and merge.

A job whose slide has at least ``shard_min_blocks`` blocks is cut into ranges of whole block rows
(``shard_blocks`` each; ``model.shards.shard_plan``). Every shard is a task on the job's queue that
any worker may run: it claims its shard (``core.shards``), fetches the slide into its own cache,
runs the engine over its blocks (``model.shards.run_shard``) and uploads the parts to
``shards/<job>/<index>/<attempt>/`` in the store, its marker (which names the files) last. Shards recompute the tiles
on their borders rather than share them: a shard needs nothing from another, so any worker on any
host runs any shard, at the cost of about one tile row per border. The merge is the job task again
(``worker.tasks``): it fetches every shard's parts and replays them through the sinks
(``model.shards.merge_shards``), so the results equal a single run's.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Task, shared_task
from pydantic import BaseModel, ConfigDict

from core.celery_app import TASK_RUN_SHARD, send_job, send_shard
from core.leases import LeaseKeeper, new_token
from core.records import JobRecord, ShardState
from core.retention import discard_ended, shard_prefix
from core.settings import Settings, get_settings
from core.shards import ShardStore
from core.storage import Storage, open_storage
from model.errors import CancelledError, NucsegError
from model.options import engine_options
from worker.failures import RetryableError, classify_failure, redact, retry_delay
from worker.resources import get_model, process_store
from worker.slides import job_slide

if TYPE_CHECKING:
    from model.checkpoint import LoadedModel
    from model.options import EngineOptions
    from model.readers import SlideReader

log = logging.getLogger(__name__)


class ShardMessage(BaseModel):
    """What travels through the broker for a shard: the job id and the shard's index."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    index: int


@shared_task(name=TASK_RUN_SHARD, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_shard(self: Task, shard: dict[str, Any]) -> dict[str, Any]:
    """Run one shard of a sharded job."""
    message = ShardMessage.model_validate(shard)
    runner = ShardRunner(message.job_id, message.index, get_settings(), self.app,
                         worker=str(self.request.hostname or "worker"))
    try:
        return runner.run()
    except RetryableError as exc:
        raise self.retry(countdown=exc.delay_s, exc=exc) from exc


class ShardRunner:
    """One attempt at one shard: claim, run under the shard's lease, upload, hand on."""

    def __init__(self, job_id: str, index: int, settings: Settings, app: Any, *, worker: str) -> None:
        self.job_id, self.index, self.settings, self.app, self.worker = job_id, index, settings, app, worker
        self.shards = ShardStore(process_store(settings))
        self.token = new_token(worker)
        self.attempt = self.token.replace(":", "_")
        self.scratch = shard_scratch(settings) / f"{job_id}.{index}.{self.attempt}"
        self._stop = False

    def run(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"job_id": self.job_id, "shard": self.index}
        outcome = self.shards.claim(self.job_id, self.index, self.token, lease_ttl_s=self.settings.lease_ttl_s,
                                    worker=self.worker)
        record = self.shards.store.get(self.job_id)
        if outcome != "claimed" or record is None or record.shards is None:
            if outcome == "cancelled" and record is not None:
                discard_ended(self.settings, record)
            return {**summary, "skipped": outcome}
        state = record.shards[self.index]
        with LeaseKeeper(self.shards.store, self.job_id, self.token, self.settings.lease_ttl_s, self._renew) as lease:
            try:
                key = self._execute(record, state, lease)
            except CancelledError as exc:
                if not lease.lost.is_set() and self.shards.cancel(self.job_id, self.index, self.token):
                    discard_ended(self.settings, record)
                return {**summary, "status": "stopped", "note": str(exc)}
            except Exception as exc:
                return {**summary, "status": self._failed(record, state, exc)}
            finally:
                shutil.rmtree(self.scratch, ignore_errors=True)
        return {**summary, "status": self._hand_on(record, key)}

    def _renew(self) -> bool:
        return self.shards.renew(self.job_id, self.index, self.token, self.settings.lease_ttl_s)

    def _execute(self, record: JobRecord, state: ShardState, lease: LeaseKeeper) -> str:
        from model.readers import open_slide
        from model.shards import run_shard as run_blocks

        model = get_model(self.settings.model, self.settings.model_sha256)
        slide = job_slide(self.settings, record, lease.lost.is_set)
        options = engine_options(record.options, device=self.settings.device, precision=self.settings.precision)
        reader = open_slide(slide, max_image_pixels=self.settings.max_image_pixels,
                            max_slide_pixels=self.settings.max_slide_pixels)
        try:
            run_blocks(reader, self.scratch, model, options, outputs=frozenset(record.options["outputs"]),
                       blocks=range(*state.blocks), on_progress=self._on_blocks,
                       should_cancel=lambda: self._stop or lease.lost.is_set())
        finally:
            reader.close()
        key = f"{shard_prefix(self.job_id)}/{self.index}/{self.attempt}"
        upload_parts(open_storage(self.settings), self.scratch, key)
        return key

    def _on_blocks(self, done: int, total: int) -> None:
        held, stop = self.shards.progress(self.job_id, self.index, self.token, done)
        self._stop = self._stop or stop or not held

    def _hand_on(self, record: JobRecord, key: str) -> str:
        outcome = self.shards.done(self.job_id, self.index, self.token, key)
        if outcome.action == "merge":
            send_job(self.app, self.job_id, record.queue)
        elif outcome.action == "next":
            send_shard(self.app, self.job_id, outcome.index, record.queue)
        log.info("job %s: shard %d done (%s)", self.job_id, self.index, outcome.action)
        return "done" if outcome.action != "lost" else "lost"

    def _failed(self, record: JobRecord, state: ShardState, exc: Exception) -> str:
        transient, error = classify_failure(exc)
        error = error.model_copy(update={"message": redact(error.message, record, self.settings)})
        log.warning("job %s shard %d: %s error %s: %s", self.job_id, self.index,
                    "transient" if transient else "permanent", error.code, error.message,
                    exc_info=not isinstance(exc, NucsegError))
        if transient and state.retries < self.settings.max_retries:
            delay = retry_delay(self.settings, state.retries)
            if self.shards.retry(self.job_id, self.index, self.token, delay) >= 0:
                raise RetryableError(error, delay) from exc
            return "lost"
        if self.shards.fail(self.job_id, self.index, self.token, error):
            discard_ended(self.settings, record)
        return "failed"


def shard_ranges(settings: Settings, reader: SlideReader, model: LoadedModel, options: EngineOptions,
                 outputs: frozenset[str]) -> list[range] | None:
    """The block ranges to cut a job into, or None when it runs whole."""
    if settings.shard_min_blocks <= 0:
        return None
    from model.shards import shard_plan

    plan = shard_plan(reader, model, options, outputs=outputs, shard_blocks=settings.shard_blocks)
    if plan.blocks_total < settings.shard_min_blocks or len(plan.shards) < 2:
        return None
    return plan.shards


def shard_scratch(settings: Settings) -> Path:
    """This worker's local folder for shard parts: written by shards, fetched for merges."""
    return settings.cache_dir / "shards"


def upload_parts(storage: Storage, folder: Path, key: str) -> None:
    """A shard's part files under ``key/``; its marker (``model.shards.MARKER``) last."""
    from model.shards import MARKER

    for path in sorted(folder.iterdir(), key=lambda p: (p.name == MARKER, p.name)):
        storage.put_file(f"{key}/{path.name}", path)


def fetch_parts(storage: Storage, shards: Sequence[ShardState], dest: Path,
                should_stop: Callable[[], bool]) -> list[Path]:
    """Each shard's parts as a local folder, in shard order (the store's own files where it is local);
    the marker of each names its files."""
    from model.shards import MARKER, part_names

    folders = []
    for state in shards:
        if state.key is None:
            raise RuntimeError(f"shard {state.index} is {state.status}, with no parts to merge")
        local = storage.local_path(state.key)
        if local is None:
            local = dest / str(state.index)
            local.mkdir(parents=True, exist_ok=True)
            for name in part_names(storage.read(f"{state.key}/{MARKER}")):
                if should_stop():
                    raise CancelledError("stopped while fetching the shards' parts")
                storage.download(f"{state.key}/{name}", local / name)
        folders.append(local)
    return folders
