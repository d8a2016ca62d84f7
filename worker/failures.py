"""How a failed attempt is told to the client: permanent or transient, its code, and a message that
names the slide as the client knows it."""

from __future__ import annotations

from pathlib import Path

import redis
from celery.exceptions import SoftTimeLimitExceeded

from core.records import JobError, JobRecord
from core.settings import Settings
from core.storage import StorageUnavailable
from model.errors import NucsegError

RETRY_MAX_BACKOFF_S = 600.0


class RetryableError(Exception):
    """A transient failure; the job goes back to the queue after a delay."""

    def __init__(self, error: JobError, delay_s: float) -> None:
        super().__init__(error.message)
        self.error, self.delay_s = error, delay_s


def retry_delay(settings: Settings, retries: int) -> float:
    """Exponential backoff before retry number ``retries + 1``."""
    return min(settings.retry_backoff_s * 2**retries, RETRY_MAX_BACKOFF_S)


def redact(message: str, record: JobRecord, settings: Settings) -> str:
    """Error messages name the slide as the client knows it, never by its server path."""
    shown = str(record.slide.get("path") or record.slide.get("name") or "slide")
    message = message.replace(record.slide_file, shown).replace(repr(Path(record.slide_file).name), repr(shown))
    return message.replace(str(settings.data_dir), "<data>")


def classify_failure(exc: BaseException) -> tuple[bool, JobError]:
    """``(transient, error)``: the code and message a failed job shows."""
    if isinstance(exc, NucsegError):
        return False, JobError(code=exc.code, message=str(exc))
    if isinstance(exc, SoftTimeLimitExceeded):
        return False, JobError(code="time_limit_exceeded", message="the job ran past NUCSEG_JOB_TIME_LIMIT_S")
    if isinstance(exc, ValueError):
        return False, JobError(code="invalid_options", message=str(exc))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True, JobError(code="out_of_memory", message=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, StorageUnavailable):
        return True, JobError(code=exc.code, message=str(exc))
    if isinstance(exc, redis.RedisError):
        return True, JobError(code="store_unavailable", message=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return True, JobError(code="io_error", message=f"{type(exc).__name__}: {exc}")
    return False, JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}")
