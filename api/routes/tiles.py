"""``/v1/jobs/{id}/dzi``: Deep Zoom images of the slide and of the semantic and ternary masks."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response

from api.deepzoom import MaskPyramid, SlideTiles, l0_per_analysis_px, mask_pyramid, rgba_png, slide_tiles
from api.deps import JobIdPath, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError
from api.routes.jobs import require_job
from api.schemas import error_responses
from core.records import JobRecord
from core.settings import Settings
from core.storage import ObjectInfo, ObjectMissing, Storage, open_storage
from core.storage.slides import local_slide, slide_object
from model.options import MASK_HEADS, STATS_FILE, Stats, head_stats, parse_stats

router = APIRouter(prefix="/v1/jobs", tags=["tiles"])

IMAGES = ("slide", *MASK_HEADS)
CACHE_CONTROL = "private, max-age=86400"
_TILE = re.compile(r"^(\d{1,6})_(\d{1,6})\.(jpeg|png)$")
_TILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/jpeg": {}, "image/png": {}}}, 304: {"description": "not modified (ETag)"},
    **error_responses(401, 404, 409, 422, 503)}


@router.get("/{job_id}/dzi", responses=error_responses(401, 404, 422, 503))
def viewer_info(job_id: JobIdPath, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    """What a viewer needs: the slide DZI, and (once succeeded) each overlay's DZI, width and colours."""
    record = require_job(store, job_id, tenant)
    slide = _slide(record, settings)
    width, height = slide.dz.level_dimensions[-1]
    base = f"/v1/jobs/{job_id}/dzi"
    info: dict[str, Any] = {"slide": {"dzi": f"{base}/slide.dzi", "width": width, "height": height},
                            "overlays": []}
    if record.status != "succeeded":
        return info
    storage = open_storage(settings)
    stats = _stats(storage, record)
    scale = l0_per_analysis_px(stats) if stats else 1.0
    for name in MASK_HEADS:
        key = f"{record.results_prefix}/{name}.tiff"
        try:
            mask = mask_pyramid(storage, key, storage.head(key).etag)
        except ObjectMissing:
            continue
        head = head_stats(stats, name) if stats else None
        classes = zip(head["classes"], head["colours"], strict=False) if head else ()
        info["overlays"].append({
            "name": name, "dzi": f"{base}/{name}.dzi", "width": mask.width, "height": mask.height,
            "viewport_width": mask.width * scale / width,
            "classes": [{"index": i, "name": c, "colour": _hex(col)} for i, (c, col) in enumerate(classes)],
        })
    return info


@router.get("/{job_id}/dzi/{image}.dzi", response_class=Response,
            responses={200: {"content": {"application/xml": {}}}, **error_responses(401, 404, 409, 422, 503)})
def get_dzi(job_id: JobIdPath, image: str, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """The Deep Zoom descriptor of ``slide``, ``semantic`` or ``ternary``."""
    record = require_job(store, job_id, tenant)
    _check_image(image)
    xml = _slide(record, settings).dzi() if image == "slide" else _mask(record, settings, image).dzi()
    return Response(xml, media_type="application/xml", headers={"Cache-Control": CACHE_CONTROL})


@router.get("/{job_id}/dzi/{image}_files/{level}/{tile}", response_class=Response, responses=_TILE_RESPONSES)
def get_tile(job_id: JobIdPath, image: str, level: str, tile: str, request: Request, store: StoreDep,
             settings: SettingsDep, tenant: TenantDep) -> Response:
    """One tile: ``slide_files/{level}/{col}_{row}.jpeg`` or ``{semantic,ternary}_files/.../{col}_{row}.png``."""
    record = require_job(store, job_id, tenant)
    _check_image(image)
    lvl, col, row = _parse_tile(image, level, tile)
    version = _slide_version(record, settings) if image == "slide" else _mask_info(record, settings, image).etag
    etag = '"' + hashlib.sha1(f"{job_id}:{image}:{version}:{lvl}:{col}:{row}".encode(),
                               usedforsecurity=False).hexdigest()[:24] + '"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    if image == "slide":
        tiles = _slide(record, settings)
        _check_tile(tiles.valid(lvl, col, row), image, lvl, col, row)
        return Response(tiles.jpeg(lvl, col, row), media_type="image/jpeg", headers=headers)
    mask = _mask(record, settings, image)
    _check_tile(mask.valid(lvl, col, row), image, lvl, col, row)
    colours = _colours(open_storage(settings), record, image)
    return Response(rgba_png(mask.tile(lvl, col, row), colours), media_type="image/png", headers=headers)


def _check_image(image: str) -> None:
    if image not in IMAGES:
        raise ApiError(404, "image_not_found", f"no Deep Zoom image {image!r}; valid: {', '.join(IMAGES)}")


def _parse_tile(image: str, level: str, tile: str) -> tuple[int, int, int]:
    match = _TILE.match(tile)
    ext = "jpeg" if image == "slide" else "png"
    if not level.isdigit() or match is None or match.group(3) != ext:
        raise ApiError(404, "tile_not_found",
                       f"tile {level}/{tile!r} of {image!r} is not '<level>/<col>_<row>.{ext}'")
    return int(level), int(match.group(1)), int(match.group(2))


def _check_tile(ok: bool, image: str, level: int, col: int, row: int) -> None:
    if not ok:
        raise ApiError(404, "tile_not_found", f"{image!r} has no tile at level {level}, column {col}, row {row}")


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


def _slide_file(record: JobRecord, settings: Settings) -> Path:
    """A local file with the job's slide (fetched into the slide cache when a store holds it)."""
    missing = ApiError(404, "slide_not_available", f"the slide of job {record.id} is no longer on the server")
    if not record.slide_file:
        raise missing
    if slide_object(settings, record.slide_file) is None:
        path = Path(record.slide_file)
        if not path.is_file():
            raise missing
        return path
    try:
        return local_slide(settings, record.slide_file, record.slide.get("sha256"))[0]
    except ObjectMissing as exc:
        raise missing from exc


def _slide(record: JobRecord, settings: Settings) -> SlideTiles:
    return slide_tiles(_slide_file(record, settings))


def _slide_version(record: JobRecord, settings: Settings) -> str:
    st = _slide_file(record, settings).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _mask_info(record: JobRecord, settings: Settings, image: str) -> ObjectInfo:
    if record.status != "succeeded":
        raise ApiError(409, "results_not_ready",
                       f"job {record.id} is {record.status}; overlays exist only once it has succeeded")
    try:
        return open_storage(settings).head(f"{record.results_prefix}/{image}.tiff")
    except ObjectMissing as exc:
        raise ApiError(404, "result_not_found",
                       f"job {record.id} has no {image}.tiff (run without 'masks'?)") from exc


def _mask(record: JobRecord, settings: Settings, image: str) -> MaskPyramid:
    info = _mask_info(record, settings, image)
    return mask_pyramid(open_storage(settings), info.key, info.etag)


def _stats(storage: Storage, record: JobRecord) -> Stats | None:
    try:
        return parse_stats(storage.read(f"{record.results_prefix}/{STATS_FILE}"))
    except (OSError, ValueError):
        return None


def _colours(storage: Storage, record: JobRecord, image: str) -> list[list[int]]:
    """The head's class colours from ``stats.json`` (cached per object version)."""
    key = f"{record.results_prefix}/{STATS_FILE}"
    try:
        etag = storage.head(key).etag
    except ObjectMissing as exc:
        raise ApiError(404, "colours_not_found", f"job {record.id} has no {STATS_FILE}") from exc
    return _cached_colours(storage.read, key, etag, image)


@lru_cache(maxsize=64)
def _cached_colours(read: Callable[[str], bytes], key: str, etag: str, image: str) -> list[list[int]]:
    head = head_stats(parse_stats(read(key)), image)
    colours = head.get("colours") if head else None
    if not colours:
        raise ApiError(404, "colours_not_found", f"stats.json has no colours for {image!r} (an older result)")
    return [list(c) for c in colours]


def _hex(colour: Any) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in list(colour)[:3])
