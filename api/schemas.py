"""Request and response models of the HTTP API (the OpenAPI schema at ``/docs`` comes from these)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.records import JobRecord, ShardState, ShardStatus, Status
from model.errors import OptionsError
from model.options import (
    BATCH_HELP,
    DEFAULTS,
    OUTPUT_GROUPS,
    TILE_MULTIPLE,
    OutputGroup,
    StainMethod,
    engine_options,
)


class JobOptions(BaseModel):
    """Engine options of one job; they mirror ``nucseg predict``. Unknown options are an error.

    The bounds here are the service's limits; ``EngineOptions.validate`` adds the engine's own rules."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int = Field(DEFAULTS.tile_size, ge=TILE_MULTIPLE, le=2048, multiple_of=TILE_MULTIPLE,
                           description=f"tile side in px (x{TILE_MULTIPLE})")
    overlap: int = Field(DEFAULTS.overlap, ge=0, le=1024,
                         description="overlap of neighbouring tiles in px (< tile_size)")
    block_size: int = Field(DEFAULTS.block_size, ge=64, le=16384, description="output block side in px (progress unit)")
    batch_size: int | None = Field(DEFAULTS.batch_size, ge=1, le=256, description=BATCH_HELP)
    tissue: bool | None = Field(DEFAULTS.tissue, description="skip tiles without tissue (default: on for WSIs)")
    mpp: float | None = Field(DEFAULTS.mpp, gt=0, le=1000, description="µm/px of level 0, overriding the slide's")
    tta: bool = Field(DEFAULTS.tta, description="average each tile over its four flips: a little more accurate, "
                                                "about 4x the network's time")
    stain: StainMethod = Field(DEFAULTS.stain, description="normalise the slide's colours to the training images' "
                               "first (reinhard, macenko); measured to hurt the shipped model, see its card")
    outputs: list[OutputGroup] = Field(default_factory=lambda: list(OUTPUT_GROUPS), min_length=1,
                                       description="result groups to produce")

    @model_validator(mode="after")
    def _check(self) -> JobOptions:
        try:
            engine_options(self.model_dump()).validate()
        except OptionsError as exc:
            raise ValueError(str(exc)) from None
        self.outputs = [g for g in OUTPUT_GROUPS if g in self.outputs]
        return self


# slide_path limits: a file name (NAME_MAX) and the whole relative path, in bytes, well inside PATH_MAX
NAME_MAX_BYTES = 255
SLIDE_PATH_MAX_BYTES = 1024
CALLBACK_HELP = ("http(s) URL called once the job ends (Standard Webhooks, signed with the tenant's secret); "
                 "private and loopback addresses are refused unless allowlisted")


class JobCreate(BaseModel):
    """JSON body of ``POST /v1/jobs`` for a slide already under ``NUCSEG_SLIDE_ROOT``."""

    model_config = ConfigDict(extra="forbid")

    slide_path: str = Field(..., min_length=1, max_length=SLIDE_PATH_MAX_BYTES,
                            description="path relative to the slide root (no '..'; must stay inside it); "
                                        f"at most {SLIDE_PATH_MAX_BYTES} bytes as UTF-8, each '/'-separated "
                                        f"name at most {NAME_MAX_BYTES}")
    options: JobOptions = Field(default_factory=JobOptions)
    metadata: dict[str, Any] = Field(default_factory=dict, description="free-form, at most 16 KiB as JSON")
    callback_url: str | None = Field(None, min_length=1, max_length=2048, description=CALLBACK_HELP)

    @field_validator("slide_path")
    @classmethod
    def _fits_a_filesystem(cls, value: str) -> str:
        """Refuse names no filesystem holds: stat() would fail with ENAMETOOLONG (a 500) instead of a 422."""
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > SLIDE_PATH_MAX_BYTES:
            raise ValueError(f"slide_path is {size} bytes as UTF-8, over the limit of {SLIDE_PATH_MAX_BYTES}")
        longest = max(len(part.encode("utf-8", "surrogatepass")) for part in value.split("/"))
        if longest > NAME_MAX_BYTES:
            raise ValueError(f"slide_path has a name of {longest} bytes; file names are at most {NAME_MAX_BYTES}")
        return value


class ErrorInfo(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    """Every error response."""

    error: ErrorInfo


class ProgressOut(BaseModel):
    stage: str
    done: int
    total: int


class SlideOut(BaseModel):
    name: str
    source: Literal["upload", "path"]
    path: str | None = Field(None, description="the slide_path given, for path jobs")
    size_bytes: int | None = None
    sha256: str | None = Field(None, description="known at once for uploads; after hashing for path jobs")
    width: int | None = None
    height: int | None = None
    levels: int | None = None
    mpp: float | None = None
    format: str | None = None
    analysis: dict[str, Any] | None = Field(None, description="size and mpp the model saw (when finished)")


class ResultLink(BaseModel):
    name: str
    href: str
    content_type: str
    size_bytes: int


class ModelRef(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    sha256: str
    encoder: str | None = None
    format: str | None = None


class WebhookAttemptOut(BaseModel):
    at: datetime
    status_code: int | None = Field(None, description="the receiver's HTTP status; null when none came")
    error: str | None = None
    duration_ms: float | None = None


class WebhookOut(BaseModel):
    """Delivery of the terminal-state webhook: retried with back-off for about an hour."""

    url: str
    status: Literal["waiting", "pending", "retrying", "delivered", "failed"] = Field(
        ..., description="waiting: the job has not ended yet")
    attempt_count: int
    attempts: list[WebhookAttemptOut] = Field(description="the latest attempts, oldest first")
    next_attempt_at: datetime | None = None


class ShardOut(BaseModel):
    """One shard of a sharded job: a range of whole block rows that one worker runs."""

    index: int
    blocks: int = Field(description="blocks in this shard")
    first_block: int = Field(description="row-major index of its first block")
    status: ShardStatus
    worker: str | None = Field(None, description="the worker that runs or ran it (the latest attempt)")
    done: int = Field(description="blocks done")
    attempts: int

    @classmethod
    def from_state(cls, state: ShardState) -> ShardOut:
        return cls(index=state.index, blocks=state.size, first_block=state.blocks[0], status=state.status,
                   worker=state.worker, done=state.done, attempts=state.attempts)


class JobOut(BaseModel):
    """A job resource."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: Status
    progress: ProgressOut
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    slide: SlideOut
    options: JobOptions
    metadata: dict[str, Any]
    error: ErrorInfo | None = None
    results: list[ResultLink] | None = None
    model: ModelRef | None = None
    attempts: int
    retries: int
    redeliveries: int
    cancel_requested: bool
    href: str
    webhook: WebhookOut | None = None
    expires_at: datetime | None = Field(None, description="when a finished job and its files are deleted")
    shards: list[ShardOut] | None = Field(None, description="a large slide's shards, each run by any worker")

    @classmethod
    def from_record(cls, rec: JobRecord, result_ttl_s: float = 0.0) -> JobOut:
        href = f"/v1/jobs/{rec.id}"
        results = None
        if rec.status == "succeeded" and rec.results is not None:
            results = [ResultLink(href=f"{href}/results/{r['name']}", **r) for r in rec.results]
        return cls(
            id=rec.id, status=rec.status, progress=ProgressOut(**rec.progress.model_dump()),
            created_at=_dt(rec.created_at), started_at=_dt(rec.started_at), finished_at=_dt(rec.finished_at),
            slide=SlideOut(**rec.slide), options=JobOptions(**rec.options), metadata=rec.metadata,
            error=ErrorInfo(**rec.error.model_dump()) if rec.error and rec.status == "failed" else None,
            results=results, model=ModelRef(**rec.model) if rec.model else None,
            attempts=rec.attempts, retries=rec.retries, redeliveries=rec.redeliveries,
            cancel_requested=rec.cancel_requested, href=href, webhook=_webhook(rec),
            expires_at=_dt(rec.finished_at + result_ttl_s) if rec.finished_at and result_ttl_s > 0 else None,
            shards=[ShardOut.from_state(s) for s in rec.shards] if rec.shards else None,
        )


def _webhook(rec: JobRecord) -> WebhookOut | None:
    if not rec.callback_url:
        return None
    attempts = [WebhookAttemptOut(**a) for a in rec.webhook_attempts or []]
    return WebhookOut(url=rec.callback_url, status=rec.webhook_status or "waiting",
                      attempt_count=rec.webhook_attempt_count, attempts=attempts,
                      next_attempt_at=_dt(rec.webhook_next_at))


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")


class ModelOut(BaseModel):
    """A model card that a worker has loaded."""

    sha256: str
    file: str
    format: str
    card: dict[str, Any]
    loaded_at: datetime
    worker: str | None = None


class ModelList(BaseModel):
    models: list[ModelOut]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    redis: Literal["ok"] = "ok"
    storage: Literal["ok"] = "ok"
    workers: list[str]


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


_ERROR_TEXT = {400: "malformed request", 401: "missing or unknown API key", 404: "not found",
               409: "job state or idempotency key conflict",
               413: "too many bytes", 415: "not a slide, or the wrong Content-Type",
               416: "range not satisfiable", 422: "invalid options, path, id or slide",
               429: "over the tenant's submission rate or queued-job limit (see Retry-After)",
               503: "Redis, the broker or the workers are unavailable"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses (all share ``ErrorOut``)."""
    return {s: {"model": ErrorOut, "description": _ERROR_TEXT.get(s, "error")} for s in statuses}
