"""The job record and its codec: how a job is stored in its Redis hash, and how it reads back.

The record in Redis is the truth about a job; Celery's ``AsyncResult`` is never asked.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


def new_job_id() -> str:
    """A random 32-hex-digit job id."""
    return uuid.uuid4().hex


class Progress(BaseModel):
    """Where a job is: ``stage`` and ``done`` of ``total`` units (blocks)."""

    stage: str = "queued"
    done: int = 0
    total: int = 0


class JobError(BaseModel):
    """Why a job failed: a stable ``code`` and a message naming the bad value."""

    code: str
    message: str


ShardStatus = Literal["pending", "queued", "running", "done", "failed", "cancelled"]


class ShardState(BaseModel):
    """One shard of a sharded job: block indexes ``[start, stop)`` (whole block rows of the analysis
    level), where it is, which worker ran it, and where its parts are in the store (``key``)."""

    index: int
    blocks: tuple[int, int]
    status: ShardStatus = "pending"
    worker: str | None = None
    done: int = 0
    attempts: int = 0
    retries: int = 0
    redeliveries: int = 0
    completions: int = 0
    key: str | None = None
    sent_at: float = 0.0  # when its message was last sent (the sweep resends one lost before it ran)

    @property
    def size(self) -> int:
        return self.blocks[1] - self.blocks[0]


class JobRecord(BaseModel):
    """One job as stored. ``slide_file``, ``upload_dir`` and ``result_key`` are server paths or store keys,
    never shown to clients."""

    id: str
    status: Status = "queued"
    tenant: str = "default"
    queue: str = "cpu"
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    progress: Progress = Field(default_factory=Progress)
    slide: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    error: JobError | None = None
    results: list[dict[str, Any]] | None = None
    model: dict[str, Any] | None = None
    attempts: int = 0
    retries: int = 0
    redeliveries: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    slide_file: str = ""
    upload_dir: str | None = None
    result_key: str | None = None  # where the results are in the store (unset: results/<id>)
    shards: list[ShardState] | None = None  # a sharded job's shards, in order (from their own hash)
    delivery_tag: str | None = None
    callback_url: str | None = None
    webhook_status: str | None = None  # pending | retrying | delivered | failed
    webhook_attempt_count: int = 0
    webhook_attempts: list[dict[str, Any]] | None = None  # the latest few, oldest first
    webhook_next_at: float | None = None

    @property
    def results_prefix(self) -> str:
        """The store key under which this job's result files are."""
        return self.result_key or f"results/{self.id}"

    @property
    def index_member(self) -> str:
        return f"{round(self.created_at * 1e6):016d}:{self.id}"


_JSON_FIELDS = frozenset({"progress", "slide", "options", "metadata", "error", "results", "model",
                          "webhook_attempts"})
_INTERNAL = frozenset({"owner", "ix", "retry_at", "shards_total", "shards_done", "shards_done_at",
                       "blocks_total"})


def encode_fields(values: Mapping[str, Any]) -> dict[str, str]:
    """Hash values: JSON for nested fields, ``1``/``0`` for booleans, ``str`` for the rest."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in _JSON_FIELDS:
            out[key] = json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        else:
            out[key] = str(value)
    return out


def decode_record(raw: Mapping[str, str]) -> JobRecord:
    """The inverse of ``encode_fields`` for a whole hash."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _INTERNAL:
            continue
        if key in _JSON_FIELDS:
            data[key] = json.loads(value)
        elif key == "cancel_requested":
            data[key] = value == "1"
        else:
            data[key] = value
    return JobRecord.model_validate(data)


def now() -> float:
    return time.time()


def decode(value: Any) -> Any:
    """bytes -> str, recursively through lists and dicts (clients may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        return {decode(k): decode(v) for k, v in value.items()}
    return value
