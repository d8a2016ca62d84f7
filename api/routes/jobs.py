"""``/v1/jobs``: submit, read, list, cancel and delete jobs."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import CeleryDep, JobIdPath, LimiterDep, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError
from api.limits import check_queue, queue_full
from api.schemas import CALLBACK_HELP, JobList, JobOut, error_responses
from api.submit import Submission, check_callback, inspect_slide, receive
from core.celery_app import send_job
from core.keys import Keys
from core.records import JobRecord, Status, new_job_id
from core.retention import discard_ended, remove_job_files
from core.settings import Settings
from core.store import JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_UPLOAD_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the slide or image"},
        "options": {"type": "string", "description": "JSON object of JobOptions"},
        "metadata": {"type": "string", "description": "JSON object, at most 16 KiB"},
        "callback_url": {"type": "string", "description": CALLBACK_HELP},
    },
}
_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _UPLOAD_FORM},
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
        },
    }
}
_CURSOR = re.compile(r"^\d{16}:[0-9a-f]{32}$")
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)]


@router.post("", status_code=202, response_model=JobOut, openapi_extra=_CREATE_BODY,
             responses={200: {"model": JobOut, "description": "idempotent replay: the original job"},
                        **error_responses(400, 401, 409, 413, 415, 422, 429, 503)})
async def create_job(request: Request, settings: SettingsDep, store: StoreDep, celery: CeleryDep,
                     tenant: TenantDep, limiter: LimiterDep,
                     idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Submit a slide (multipart upload, or JSON ``slide_path``); answers 202 with the queued job."""
    await run_in_threadpool(_admit, limiter, store, tenant, settings, idempotency_key)
    sub = await receive(request, settings, new_job_id(), tenant)
    try:
        return await run_in_threadpool(_create, sub, settings, store, celery, tenant, idempotency_key)
    except BaseException:
        sub.discard()
        raise


def _admit(limiter: Any, store: JobStore, tenant: str, settings: Settings, key: str | None) -> None:
    """Rate and queue limits, before any of the body is read.

    A retry whose Idempotency-Key already names a job skips the queue cap: it creates nothing, and
    the client must get its original job back even while the queue is full.
    """
    limiter.check(tenant, settings)
    if key is None or store.lookup_idempotency(Keys.idempotency(tenant, key)) is None:
        check_queue(store, tenant, settings)


def _create(sub: Submission, settings: Settings, store: JobStore, celery: Any, tenant: str,
            key: str | None) -> JSONResponse:
    idem = (Keys.idempotency(tenant, key), sub.fingerprint()) if key else None
    if idem and (prior := store.lookup_idempotency(idem[0])):
        sub.discard()
        return _replay(store, key or "", prior, idem[1], tenant, settings)
    check_callback(sub.callback_url, tenant, settings)
    shown_as = sub.slide["name"] if sub.source == "upload" else None
    sub.slide.update(inspect_slide(sub.local_file, settings, shown_as=shown_as))
    record = sub.to_record(settings.queue, tenant)
    outcome = store.create(record, idempotency=idem, idempotency_ttl_s=settings.idempotency_ttl_s,
                           max_queued=settings.max_queued_per_tenant)
    if outcome.queued is not None:
        raise queue_full(tenant, outcome.queued, settings)
    if not outcome.created:  # a concurrent request with the same key won the race
        sub.discard()
        return _replay(store, key or "", (outcome.job_id, outcome.fingerprint), idem[1] if idem else "", tenant,
                       settings)
    try:
        send_job(celery, record.id, record.queue)
    except Exception:
        store.discard(record.id, idem[0] if idem else None)
        raise
    return _job_response(record, 202, settings)


def _replay(store: JobStore, key: str, prior: tuple[str, str], fingerprint: str, tenant: str,
            settings: Settings) -> JSONResponse:
    job_id, known = prior
    if known != fingerprint:
        raise ApiError(409, "idempotency_conflict",
                       f"Idempotency-Key {key!r} was already used for a different request (job {job_id})")
    record = store.get(job_id)
    if record is None or record.tenant != tenant:
        raise ApiError(409, "idempotency_conflict",
                       f"Idempotency-Key {key!r} belongs to job {job_id}, which has been deleted")
    return _job_response(record, 200, settings)


def job_out(record: JobRecord, settings: Settings) -> JobOut:
    return JobOut.from_record(record, settings.result_ttl.total_seconds())


def _job_response(record: JobRecord, status: int, settings: Settings) -> JSONResponse:
    body = job_out(record, settings).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers={"Location": f"/v1/jobs/{record.id}"})


@router.get("", response_model=JobList, responses=error_responses(400, 401, 422, 503))
def list_jobs(store: StoreDep, tenant: TenantDep, settings: SettingsDep, status: Status | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              cursor: Annotated[str | None, Query(max_length=200)] = None) -> JobList:
    """The caller's jobs, newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    records, after = store.page(status=status, limit=limit, cursor=_decode_cursor(cursor) if cursor else None,
                                tenant=tenant)
    return JobList(jobs=[job_out(r, settings) for r in records],
                   next_cursor=_encode_cursor(after) if after else None)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(401, 404, 422, 503))
def get_job(job_id: JobIdPath, store: StoreDep, tenant: TenantDep, settings: SettingsDep) -> JobOut:
    """One job: status, progress, times, slide, options, metadata, error or result links, webhook."""
    return job_out(require_job(store, job_id, tenant), settings)


@router.delete("/{job_id}", status_code=204, response_class=Response, responses={
    200: {"model": JobOut, "description": "a queued job, now cancelled"},
    202: {"model": JobOut, "description": "a running job; it stops within one block"},
    204: {"description": "a finished job; its files and record are deleted"},
    **error_responses(401, 404, 422, 503)})
def delete_job(job_id: JobIdPath, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """Cancel a queued or running job, or delete a finished (or cancelled) one with its files."""
    require_job(store, job_id, tenant)
    outcome = store.cancel(job_id)
    if outcome == "missing":
        raise _not_found(job_id)
    if outcome in ("cancelled", "cancel_requested"):
        record = require_job(store, job_id, tenant)
        if outcome == "cancelled":
            discard_ended(settings, record)
        return _job_response(record, 200 if outcome == "cancelled" else 202, settings)
    finished = store.get(job_id)
    if store.delete(job_id) == "deleted" and finished is not None:
        remove_job_files(settings, finished)
    return Response(status_code=204)


def require_job(store: JobStore, job_id: str, tenant: str) -> JobRecord:
    """The job, if it exists and belongs to ``tenant``; another tenant's job is a plain 404."""
    record = store.get(job_id)
    if record is None or record.tenant != tenant:
        raise _not_found(job_id)
    return record


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job with id {job_id!r}")


def _encode_cursor(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        member = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        member = ""
    if not _CURSOR.match(member):
        raise ApiError(400, "invalid_cursor", f"cursor {cursor!r} is not one this API returned")
    return member

