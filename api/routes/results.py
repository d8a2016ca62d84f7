"""``/v1/jobs/{id}/results/{name}``: result files, with their content types and HTTP Range support.

From the local data folder they are sent as files (several ranges as ``multipart/byteranges``);
from an object store they are streamed by range requests, and a request for several ranges gets
the whole file (``200``), which HTTP allows.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from api.deps import JobIdPath, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError
from api.routes.jobs import require_job
from api.schemas import error_responses
from core.storage import ObjectInfo, ObjectMissing, Storage, open_storage
from model.options import CONTENT_TYPES, FALLBACK_CONTENT_TYPE

router = APIRouter(prefix="/v1/jobs", tags=["results"])


_FILE_TYPES = (*dict.fromkeys(CONTENT_TYPES.values()), FALLBACK_CONTENT_TYPE)  # what results are served as


@router.api_route("/{job_id}/results/{name}", methods=["GET", "HEAD"], response_class=FileResponse,
                  responses={200: {"content": {t: {} for t in _FILE_TYPES}},
                             206: {"description": "partial content (Range); several ranges come as "
                                                  "multipart/byteranges from a local data folder",
                                   "content": {t: {} for t in (*_FILE_TYPES, "multipart/byteranges")}},
                             **error_responses(400, 401, 404, 409, 416, 422, 503)})
def get_result(job_id: JobIdPath, name: str, request: Request, store: StoreDep,
               settings: SettingsDep, tenant: TenantDep) -> Response:
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
    storage, key = open_storage(settings), f"{record.results_prefix}/{name}"
    try:
        info = storage.head(key)
    except ObjectMissing as exc:
        raise ApiError(404, "result_not_found", f"result {name!r} of job {job_id} is missing from the store") from exc
    header, media = request.headers.get("range"), files[name]["content_type"]
    ranges = check_range(header, info.size)
    path = storage.local_path(key)
    if path is not None:
        return FileResponse(path, media_type=media)
    return _object_response(storage, info, media, ranges, head=request.method == "HEAD")


def check_range(header: str | None, size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of a Range header; a bad one is our JSON error (Starlette's is text)."""
    if header is None:
        return []
    try:
        return FileResponse._parse_range_header(header, size)
    except MalformedRangeHeader as exc:
        raise ApiError(400, "invalid_range", f"Range header {header!r} is malformed: {exc.content}") from exc
    except RangeNotSatisfiable as exc:
        raise ApiError(416, "range_not_satisfiable", f"Range {header!r} is outside the file of {size} bytes",
                       headers={"Content-Range": f"bytes */{size}"}) from exc


def _object_response(storage: Storage, info: ObjectInfo, media: str, ranges: list[tuple[int, int]],
                     *, head: bool) -> Response:
    start, end, status = 0, info.size, 200
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{info.etag.strip(chr(34))}"'}
    if len(ranges) == 1:
        (start, end), status = ranges[0], 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{info.size}"
    headers["Content-Length"] = str(end - start)
    if head:
        return Response(status_code=status, headers=headers, media_type=media)
    return StreamingResponse(storage.stream(info.key, start, end), status_code=status, headers=headers,
                             media_type=media)
