"""Retention: finished jobs expire ``NUCSEG_RESULT_TTL`` after they finished; failed uploads go at once.

``sweep`` runs in a worker's main process every ``retention_interval_s`` (one worker at a time,
under a Redis lock). It deletes each expired job's record first (through the same script as
``DELETE``, which refuses queued and running jobs, so a live job is never touched), then its result
and upload folders (objects, in an object store). Folders left without a record (a sweep cut
short, or an upload whose job was never created) are removed once older than ``ORPHAN_GRACE_S``.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from core.keys import Keys
from core.records import JobRecord
from core.settings import Settings
from core.storage import open_storage
from core.store import JobStore

log = logging.getLogger(__name__)
SHARDS_FOLDER = "shards"

ORPHAN_GRACE_S = 3600.0
_JOB_DIR = re.compile(r"^[0-9a-f]{32}$")


def shard_prefix(job_id: str) -> str:
    """Where a sharded job's shards leave their parts in the store, until the merge."""
    return f"{SHARDS_FOLDER}/{job_id}"


def discard_ended(settings: Settings, record: JobRecord) -> None:
    """Remove what a failed or cancelled job no longer needs: its upload (unless
    ``keep_failed_uploads`` is set) and, for a sharded job, its shards' parts."""
    if record.upload_dir and not settings.keep_failed_uploads:
        open_storage(settings).delete_prefix(record.upload_dir)
    if record.shards:
        discard_shard_parts(settings, record.id)


def discard_shard_parts(settings: Settings, job_id: str) -> None:
    """Remove a sharded job's shard parts (merged, or of a job that ended)."""
    open_storage(settings).delete_prefix(shard_prefix(job_id))


def remove_job_files(settings: Settings, record: JobRecord) -> None:
    storage = open_storage(settings)
    storage.delete_prefix(f"results/{record.id}")
    storage.delete_prefix(shard_prefix(record.id))
    if record.upload_dir:
        storage.delete_prefix(record.upload_dir)


def sweep(store: JobStore, settings: Settings, now: float | None = None) -> int:
    """Delete expired jobs and orphaned folders (if this process gets the lock); returns jobs deleted."""
    ttl = settings.result_ttl.total_seconds()
    if ttl <= 0:
        return 0
    token = secrets.token_hex(8)
    if not store.r.set(Keys.RETENTION_LOCK, token, nx=True, px=int(settings.retention_interval_s * 1000)):
        return 0
    now = time.time() if now is None else now
    deleted = _expire_jobs(store, settings, now - ttl)
    _remove_orphans(store, settings, now - max(ttl, ORPHAN_GRACE_S))
    if deleted:
        log.info("retention: deleted %d jobs that finished over %s ago", deleted, settings.result_ttl)
    return deleted


def _expire_jobs(store: JobStore, settings: Settings, before: float) -> int:
    deleted = 0
    while batch := store.expired(before):
        for job_id in batch:
            record = store.get(job_id)
            outcome = store.delete(job_id) if record is not None else "missing"
            if outcome == "deleted" and record is not None:
                remove_job_files(settings, record)
                deleted += 1
            else:  # gone already, or (never expected) not finished: stop tracking it
                store.forget_expiry(job_id)
    return deleted


def _remove_orphans(store: JobStore, settings: Settings, older_than: float) -> None:
    storage = open_storage(settings)
    for folder in ("results", "uploads", SHARDS_FOLDER):
        for name, changed in storage.folders(folder).items():
            if _JOB_DIR.match(name) and changed < older_than and not store.exists(name):
                log.warning("retention: removing %s/%s in %s (no job record)", folder, name, storage.url)
                storage.delete_prefix(f"{folder}/{name}")
