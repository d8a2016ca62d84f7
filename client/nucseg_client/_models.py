"""Plain data returned by the API: ``Progress``, ``ResultFile``, ``JobError``, ``Webhook``, ``Model``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nucseg_client._http import parse_time


@dataclass(frozen=True)
class Progress:
    """Where a job is: ``done`` of ``total`` units (blocks) in ``stage``.

    Example::

        print(f"{job.progress.stage}: {job.progress.percent:.0f}%")
    """

    stage: str = "queued"
    done: int = 0
    total: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    @classmethod
    def from_dict(cls, data: Any) -> Progress:
        if not isinstance(data, dict):
            return cls()
        return cls(str(data.get("stage", "queued")), int(data.get("done", 0)), int(data.get("total", 0)))


@dataclass(frozen=True)
class ResultFile:
    """One result file of a succeeded job.

    Example::

        for f in job.results:
            print(f.name, f.size_bytes)
    """

    name: str
    href: str
    content_type: str
    size_bytes: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResultFile:
        return cls(str(data["name"]), str(data.get("href", "")), str(data.get("content_type", "")),
                   int(data.get("size_bytes", -1)))


@dataclass(frozen=True)
class JobError:
    """Why a job failed: the server's stable ``code`` and its ``message``."""

    code: str
    message: str


@dataclass(frozen=True)
class WebhookAttempt:
    """One delivery attempt of a job's webhook: the receiver's HTTP status (``None`` when no answer
    came, then ``error`` says why) and how long it took."""

    at: datetime | None
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WebhookAttempt:
        code, error, duration = data.get("status_code"), data.get("error"), data.get("duration_ms")
        return cls(parse_time(data.get("at")), code if isinstance(code, int) else None,
                   str(error) if error is not None else None,
                   float(duration) if isinstance(duration, int | float) else None)


@dataclass(frozen=True)
class Webhook:
    """Delivery of a job's terminal-state webhook (the job was submitted with a ``callback_url``).

    ``status``: ``waiting`` (the job has not ended), ``pending``, ``retrying``, ``delivered`` or
    ``failed`` (the server gave up). ``attempts`` holds the latest attempts, oldest first.

    Example::

        hook = job.refresh().webhook
        if hook is not None and hook.status == "failed":
            print(hook.url, hook.attempts[-1].status_code, hook.attempts[-1].error)
    """

    url: str
    status: str
    attempt_count: int = 0
    attempts: tuple[WebhookAttempt, ...] = ()
    next_attempt_at: datetime | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Webhook:
        count = data.get("attempt_count")
        attempts = tuple(WebhookAttempt.from_dict(a) for a in data.get("attempts") or [] if isinstance(a, dict))
        return cls(str(data.get("url", "")), str(data.get("status", "waiting")),
                   count if isinstance(count, int) else len(attempts), attempts,
                   parse_time(data.get("next_attempt_at")))


@dataclass(frozen=True)
class Model:
    """A model card that a worker has loaded (``client.models()``).

    Example::

        for m in client.models():
            print(m.name, m.sha256[:12], m.card.get("semantic_classes"))
    """

    sha256: str
    file: str
    format: str
    card: dict[str, Any] = field(default_factory=dict)
    loaded_at: datetime | None = None
    worker: str | None = None

    @property
    def name(self) -> str:
        return str(self.card.get("name") or self.file)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Model:
        card = data.get("card")
        return cls(str(data.get("sha256", "")), str(data.get("file", "")), str(data.get("format", "")),
                   card if isinstance(card, dict) else {}, parse_time(data.get("loaded_at")),
                   data.get("worker"))
