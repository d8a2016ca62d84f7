"""``/v1/jobs/{id}/results/{name}``: result files, with their content types and HTTP Range support."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from api.deps import JobIdPath, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError
from api.routes.jobs import require_job
from api.schemas import error_responses
from model.options import CONTENT_TYPES, FALLBACK_CONTENT_TYPE

router = APIRouter(prefix="/v1/jobs", tags=["results"])


_FILE_TYPES = (*dict.fromkeys(CONTENT_TYPES.values()), FALLBACK_CONTENT_TYPE)  # what results are served as


@router.api_route("/{job_id}/results/{name}", methods=["GET", "HEAD"], response_class=FileResponse,
                  responses={200: {"content": {t: {} for t in _FILE_TYPES}},
                             206: {"description": "partial content (Range); several ranges come as "
                                                  "multipart/byteranges",
                                   "content": {t: {} for t in (*_FILE_TYPES, "multipart/byteranges")}},
                             **error_responses(400, 401, 404, 409, 416, 422, 503)})
def get_result(job_id: JobIdPath, name: str, request: Request, store: StoreDep,
               settings: SettingsDep, tenant: TenantDep) -> FileResponse:
    """One result file of a succeeded job; ``Range: bytes=a-b`` gives 206 with that slice."""
    record = require_job(store, job_id, tenant)
    if record.status != "succeeded":
        raise ApiError(409, "results_not_ready",
                       f"job {job_id} is {record.status}; results exist only once it has succeeded")
    files = {r["name"]: r for r in record.results or []}
    if name not in files:
        raise ApiError(404, "result_not_found",
                       f"job {job_id} has no result {name!r}; valid names: {', '.join(files)}",
                       extra={"valid_names": list(files)})
    path = settings.results_dir / job_id / name
    if not path.is_file():
        raise ApiError(404, "result_not_found", f"result {name!r} of job {job_id} is missing on disk")
    check_range(request.headers.get("range"), path.stat().st_size)
    return FileResponse(path, media_type=files[name]["content_type"])


def check_range(header: str | None, size: int) -> None:
    """Refuse a bad Range header with our JSON error (Starlette would answer in plain text)."""
    if header is None:
        return
    try:
        FileResponse._parse_range_header(header, size)
    except MalformedRangeHeader as exc:
        raise ApiError(400, "invalid_range", f"Range header {header!r} is malformed: {exc.content}") from exc
    except RangeNotSatisfiable as exc:
        raise ApiError(416, "range_not_satisfiable", f"Range {header!r} is outside the file of {size} bytes",
                       headers={"Content-Range": f"bytes */{size}"}) from exc
