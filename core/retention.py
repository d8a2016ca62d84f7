"""Retention: finished jobs expire ``NUCSEG_RESULT_TTL`` after they finished; failed uploads go at once.

``sweep`` runs in a worker's main process every ``retention_interval_s`` (one worker at a time,
under a Redis lock). It deletes each expired job's record first (through the same script as
``DELETE``, which refuses queued and running jobs, so a live job is never touched), then its result
and upload folders. Folders left without a record (a sweep cut short, or an upload whose job was
never created) are removed once they are older than ``ORPHAN_GRACE_S``.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import time
from pathlib import Path

from core.keys import Keys
from core.records import JobRecord
from core.settings import Settings
from core.store import JobStore

log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 3600.0
_JOB_DIR = re.compile(r"^[0-9a-f]{32}$")


def discard_upload(settings: Settings, record: JobRecord) -> None:
    """Remove the upload of a failed or cancelled job, unless ``keep_failed_uploads`` is set."""
    if record.upload_dir and not settings.keep_failed_uploads:
        shutil.rmtree(record.upload_dir, ignore_errors=True)


def remove_job_files(settings: Settings, record: JobRecord) -> None:
    shutil.rmtree(settings.results_dir / record.id, ignore_errors=True)
    if record.upload_dir:
        shutil.rmtree(record.upload_dir, ignore_errors=True)


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
    for folder in (settings.results_dir, settings.uploads_dir):
        for path in _job_dirs(folder):
            if path.stat().st_mtime < older_than and not store.exists(path.name):
                log.warning("retention: removing %s (no job record)", path)
                shutil.rmtree(path, ignore_errors=True)


def _job_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and _JOB_DIR.match(p.name)]
