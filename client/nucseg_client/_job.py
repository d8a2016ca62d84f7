"""What sync and async jobs share: the job's data, the wait poller and the resumable download plan."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx

from nucseg_client._errors import ConnectError, JobFailed, TimeoutException
from nucseg_client._http import parse_time
from nucseg_client._models import JobError, Progress, ResultFile, Webhook

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class JobBase:
    """A job's last known state; ``refresh()`` (on ``Job``/``AsyncJob``) reads it again."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self._retry_after: float | None = None
        self.deleted = False

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def status(self) -> str:
        """``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``."""
        return str(self._data["status"])

    @property
    def progress(self) -> Progress:
        return Progress.from_dict(self._data.get("progress"))

    @property
    def done(self) -> bool:
        """True once the job has succeeded, failed or been cancelled."""
        return self.status in TERMINAL

    @property
    def error(self) -> JobError | None:
        err = self._data.get("error")
        return JobError(str(err.get("code")), str(err.get("message"))) if isinstance(err, dict) else None

    @property
    def results(self) -> list[ResultFile]:
        """The result files (empty until the job has succeeded)."""
        return [ResultFile.from_dict(r) for r in self._data.get("results") or [] if isinstance(r, dict)]

    @property
    def slide(self) -> dict[str, Any]:
        return dict(self._data.get("slide") or {})

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._data.get("options") or {})

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._data.get("metadata") or {})

    @property
    def created_at(self) -> datetime | None:
        return parse_time(self._data.get("created_at"))

    @property
    def finished_at(self) -> datetime | None:
        return parse_time(self._data.get("finished_at"))

    @property
    def webhook(self) -> Webhook | None:
        """Delivery state of the job's webhook; ``None`` when it was submitted without ``callback_url``."""
        hook = self._data.get("webhook")
        return Webhook.from_dict(hook) if isinstance(hook, dict) else None

    @property
    def expires_at(self) -> datetime | None:
        """When the server's retention deletes the finished job and its files (``None``: not set)."""
        return parse_time(self._data.get("expires_at"))

    @property
    def data(self) -> dict[str, Any]:
        """The job resource exactly as the server last sent it (a copy)."""
        return dict(self._data)

    def __repr__(self) -> str:
        p = self.progress
        return f"<{type(self).__name__} {self.id} {self.status} {p.stage} {p.done}/{p.total}>"

    def _set(self, data: dict[str, Any], retry_after: float | None = None) -> None:
        self._data, self._retry_after = data, retry_after

    def _failure(self) -> JobFailed | None:
        if self.status == "failed":
            err = self.error or JobError("failed", "the job failed without an error record")
            return JobFailed(err.code, err.message, job=self)
        if self.status == "cancelled":
            return JobFailed("cancelled", "the job was cancelled", job=self)
        return None

    def _expected_size(self, name: str) -> int | None:
        for f in self.results:
            if f.name == name and f.size_bytes >= 0:
                return f.size_bytes
        return None


class Poller:
    """Delays for ``wait``: ``poll`` growing x1.5 to ``max_poll``, ``Retry-After`` first, within ``timeout``."""

    def __init__(self, job_id: str, *, timeout: float | None, poll: float, max_poll: float,
                 clock: Callable[[], float]) -> None:
        if not poll > 0 or max_poll < poll:
            raise ValueError(f"need 0 < poll <= max_poll, got poll={poll!r}, max_poll={max_poll!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        self.job_id, self.timeout, self.clock = job_id, timeout, clock
        self.interval, self.max_poll = poll, max_poll
        self.deadline = None if timeout is None else clock() + timeout

    def next_delay(self, status: str, retry_after: float | None) -> float:
        """Seconds to sleep before the next poll; raises ``TimeoutException`` once the deadline has passed."""
        delay = retry_after if retry_after is not None else self.interval
        self.interval = min(self.interval * 1.5, self.max_poll)
        if self.deadline is None:
            return delay
        left = self.deadline - self.clock()
        if left <= 0:
            raise TimeoutException(f"job {self.job_id} is still {status} after waiting {self.timeout} s")
        return min(delay, left)


def destination(name: str, dest: str | os.PathLike[str] | None) -> Path:
    """Where result ``name`` goes: ``dest`` itself, or ``dest/name`` when ``dest`` is a folder."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"result name must be a plain file name, got {name!r}")
    if dest is None:
        return Path.cwd() / name
    path = Path(dest)
    return path / name if path.is_dir() else path


class DownloadPlan:
    """One result file streamed to ``<dest>.part`` and renamed into place when complete.

    A ``.part`` left by an interrupted download is continued with ``Range: bytes=<size>-``; a
    server that answers 200 instead of 206 restarts it.
    """

    def __init__(self, dest: Path, expected: int | None) -> None:
        self.dest, self.expected = dest, expected
        self.part = dest.with_name(dest.name + ".part")
        self.total: int | None = expected
        dest.parent.mkdir(parents=True, exist_ok=True)

    def offset(self) -> int:
        """Bytes already on disk (a stale or oversized ``.part`` is discarded)."""
        try:
            size = self.part.stat().st_size
        except FileNotFoundError:
            return 0
        if self.expected is not None and size > self.expected:
            self.part.unlink()
            return 0
        return size

    def complete(self, offset: int) -> bool:
        return self.expected is not None and offset == self.expected and self.part.exists()

    @staticmethod
    def headers(offset: int) -> dict[str, str]:
        """Byte-exact transfer (no gzip), from ``offset`` on."""
        plain = {"Accept": "*/*", "Accept-Encoding": "identity"}
        return {**plain, "Range": f"bytes={offset}-"} if offset > 0 else plain

    def open(self, response: httpx.Response, offset: int) -> IO[bytes]:
        """The ``.part`` file to write this response's body to (appending for a matching 206)."""
        match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if response.status_code == 206 and match and int(match.group(1)) == offset:
            self.total = int(match.group(3)) if match.group(3) != "*" else self.expected
            return self.part.open("ab")
        length = response.headers.get("content-length", "")
        encoded = response.headers.get("content-encoding", "identity") != "identity"
        self.total = int(length) if length.isdigit() and not encoded else self.expected
        return self.part.open("wb")

    def finish(self) -> Path:
        """Check the size and rename ``.part`` to the destination."""
        size = self.part.stat().st_size
        if self.total is not None and size != self.total:
            raise ConnectError(f"download of {self.dest.name} stopped at {size} of {self.total} bytes")
        os.replace(self.part, self.dest)
        return self.dest


class Interrupted(Exception):
    """A download body broke off mid-stream (``error`` is what to raise if it cannot resume)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def not_ready(job: JobBase) -> Exception:
    """Why ``job``'s results cannot be downloaded yet: ``JobFailed``, or a ``NucsegError`` if unfinished."""
    from nucseg_client._errors import NucsegError

    return job._failure() or NucsegError(
        f"job {job.id} is {job.status}; results exist only once it has succeeded (call wait() first)")
