"""Turning a ``POST /v1/jobs`` request into a validated submission (before anything is enqueued).

Two inputs: a multipart upload (``file`` plus optional JSON fields ``options`` and ``metadata``) or
a JSON body ``{"slide_path", "options", "metadata"}``. Either way the slide is opened here (format
sniff, then OpenSlide or Pillow, then a probe read) so a bad file is refused at once.

With an object store, an upload streams into the store as it arrives (``uploads/<id>/slide<ext>``)
and the API keeps its local copy in the slide cache; a ``slide_path`` may also be an ``s3://``
object under one of the tenant's allowed prefixes, fetched into the cache to be opened.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from api.errors import ApiError, validation_error
from api.schemas import JobCreate, JobOptions
from api.uploads import Mirror, receive_multipart
from core.netguard import CallbackUrlError, check_url
from core.records import JobRecord, Progress, now
from core.settings import Settings
from core.storage import ObjectMissing, is_s3_url, open_storage
from core.storage.slides import allowed_slide_url, local_slide, slide_cache
from model.errors import SlideError
from model.readers import open_slide


@dataclass
class Submission:
    """A slide with its options and metadata, not yet a job.

    ``slide_file`` is what the job record keeps (a path, a store key or an ``s3://`` URL);
    ``local_file`` is a local copy the API opens to check it.
    """

    job_id: str
    source: Literal["upload", "path"]
    slide_file: str
    local_file: Path
    slide: dict[str, Any]
    options: JobOptions
    metadata: dict[str, Any]
    settings: Settings
    upload_dir: str | None = None
    callback_url: str | None = None

    def fingerprint(self) -> str:
        """Same request body -> same fingerprint (for idempotency keys)."""
        what = self.slide.get("sha256") if self.source == "upload" else self.slide.get("path")
        doc = {"source": self.source, "slide": what, "options": self.options.model_dump(mode="json"),
               "metadata": self.metadata, "callback_url": self.callback_url}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def discard(self) -> None:
        """Remove the uploaded file (the job was not created)."""
        if self.upload_dir is not None:
            open_storage(self.settings).delete_prefix(self.upload_dir)

    def to_record(self, queue: str, tenant: str) -> JobRecord:
        return JobRecord(id=self.job_id, tenant=tenant, queue=queue, created_at=now(),
                         progress=Progress(stage="queued"), slide=self.slide,
                         options=self.options.model_dump(mode="json"), metadata=self.metadata,
                         slide_file=self.slide_file, callback_url=self.callback_url, upload_dir=self.upload_dir)


async def receive(request: Request, settings: Settings, job_id: str, tenant: str) -> Submission:
    """Read the body (either kind) into a ``Submission``; raises ``ApiError`` for a bad request."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await _from_upload(request, settings, job_id)
    if media == "application/json":
        body = await _read_limited(request, settings.max_json_body_bytes)
        return await run_in_threadpool(partial(_from_json, body, settings, job_id, tenant))
    raise ApiError(415, "unsupported_content_type",
                   f"Content-Type {media or '(none)'!r} is not accepted; send multipart/form-data "
                   "with a 'file' part, or application/json with 'slide_path'")


async def _from_upload(request: Request, settings: Settings, job_id: str) -> Submission:
    upload_dir = settings.uploads_dir / job_id
    storage = open_storage(settings)
    remote = storage.local_path(_upload_prefix(job_id)) is None
    mirror: Mirror | None = (lambda name: storage.writer(f"{_upload_prefix(job_id)}/{name}")) if remote else None
    stored, fields = await receive_multipart(
        request, partial=settings.uploads_dir / ".partial" / f"{job_id}.part", final_dir=upload_dir,
        max_file_bytes=settings.max_upload_bytes, max_field_bytes=settings.max_form_field_bytes, mirror=mirror)
    try:
        if stored is None:
            raise ApiError(422, "validation_error", "file: Field required (a multipart 'file' part)")
        options = _parse_options(fields.get("options"))
        metadata = parse_metadata(_json_field("metadata", fields.get("metadata")), settings)
        callback = (fields.get("callback_url") or "").strip() or None
    except BaseException:
        shutil.rmtree(upload_dir, ignore_errors=True)
        if remote:
            await run_in_threadpool(storage.delete_prefix, _upload_prefix(job_id))
        raise
    slide = {"name": stored.filename, "source": "upload", "path": None, "size_bytes": stored.size,
             "sha256": stored.sha256}
    if not remote:
        return Submission(job_id, "upload", str(stored.path), stored.path, slide, options, metadata, settings,
                          str(upload_dir), callback)
    local = slide_cache(settings).adopt(stored.path, stored.sha256, stored.path.suffix)
    shutil.rmtree(upload_dir, ignore_errors=True)
    key = f"{_upload_prefix(job_id)}/{stored.path.name}"
    return Submission(job_id, "upload", key, local, slide, options, metadata, settings, _upload_prefix(job_id),
                      callback)


def _upload_prefix(job_id: str) -> str:
    return f"uploads/{job_id}"


def _from_json(body: bytes, settings: Settings, job_id: str, tenant: str) -> Submission:
    data = _json_field("body", body.decode("utf-8", "replace"))
    req = JobCreate.model_validate(data if data is not None else {})
    metadata = parse_metadata(req.metadata, settings)
    if is_s3_url(req.slide_path):
        path, sha256 = fetch_slide_object(req.slide_path, settings.slide_prefixes_for(tenant), settings)
        slide_file, name = req.slide_path, PurePosixPath(req.slide_path).name
    else:
        path, sha256 = resolve_slide_path(settings.slide_root, req.slide_path), None
        slide_file, name = str(path), path.name
    slide = {"name": name, "source": "path", "path": req.slide_path, "size_bytes": path.stat().st_size,
             "sha256": sha256}
    return Submission(job_id, "path", slide_file, path, slide, options=req.options, metadata=metadata,
                      settings=settings, callback_url=req.callback_url)


def fetch_slide_object(url: str, prefixes: list[str], settings: Settings) -> tuple[Path, str]:
    """The local copy and sha256 of the ``s3://`` object ``url``, if it is under one of ``prefixes``."""
    if not allowed_slide_url(url, prefixes):
        allowed = ", ".join(prefixes) or "none configured (NUCSEG_SLIDE_PREFIXES)"
        raise ApiError(422, "invalid_slide_path", f"slide_path {url[:300]!r} is not under an allowed prefix; "
                                                  f"allowed: {allowed}")
    try:
        path, sha256 = local_slide(settings, url, None)
    except ObjectMissing as exc:
        raise ApiError(422, "slide_not_found", f"slide_path {url[:300]!r}: no such object") from exc
    assert sha256 is not None
    return path, sha256


def _parse_options(raw: str | None) -> JobOptions:
    data = _json_field("options", raw)
    if data is None:
        return JobOptions()
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", f"options: must be a JSON object (got {type(data).__name__})")
    try:
        return JobOptions.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("options", *e["loc"])} for e in exc.errors()]
        raise validation_error(errors) from exc


def _json_field(name: str, raw: str | None) -> Any:
    if raw is None or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"{name} is not valid JSON: {exc}") from exc


def parse_metadata(value: Any, settings: Settings) -> dict[str, Any]:
    """Metadata must be a JSON object of at most ``max_metadata_bytes`` (compact JSON)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(422, "validation_error",
                       f"metadata: must be a JSON object (got {type(value).__name__})")
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > settings.max_metadata_bytes:
        raise ApiError(413, "metadata_too_large",
                       f"metadata is {size} bytes as JSON, over the limit of {settings.max_metadata_bytes}")
    return value


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"JSON body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"JSON body is over the limit of {limit} bytes")
    return bytes(body)


def check_callback(url: str | None, tenant: str, settings: Settings) -> None:
    """A callback needs a public (or allowlisted) http(s) URL and a webhook secret for the tenant."""
    if url is None:
        return
    try:
        check_url(url, settings.webhook_allow)
    except CallbackUrlError as exc:
        raise ApiError(422, exc.code, str(exc)) from exc
    if settings.webhook_secret_for(tenant) is None:
        raise ApiError(422, "webhook_secret_missing",
                       f"callback_url {url!r} cannot be signed: tenant {tenant!r} has no webhook_secret "
                       "configured (NUCSEG_TENANTS, or NUCSEG_WEBHOOK_SECRET without auth)")


def resolve_slide_path(root: Path | None, raw: str) -> Path:
    """The file ``raw`` names under ``root``; refuses ``..``, escapes (also through symlinks), non-files."""
    if root is None:
        raise ApiError(422, "slide_path_disabled",
                       f"slide_path {raw!r} cannot be used: no NUCSEG_SLIDE_ROOT is set; upload the file")
    if "\x00" in raw:
        raise ApiError(422, "invalid_slide_path", f"slide_path {raw!r} contains a NUL byte")
    rel = PurePosixPath(raw)
    if ".." in rel.parts:
        raise ApiError(422, "invalid_slide_path", f"slide_path {raw!r} must not contain '..'")
    base = root.resolve()
    try:
        resolved = (base / rel).resolve()  # an absolute ``raw`` replaces ``base``, and must still be inside
        inside, is_file = resolved.is_relative_to(base), resolved.is_file()
    except (OSError, RuntimeError) as exc:  # too long, a symlink loop: it cannot name a slide we may read
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "symlink loop"
        raise ApiError(422, "invalid_slide_path", f"slide_path {raw[:200]!r} cannot be resolved: {reason}") from exc
    if not inside:
        raise ApiError(422, "invalid_slide_path", f"slide_path {raw!r} resolves outside the slide root")
    if not is_file:
        raise ApiError(422, "slide_not_found", f"slide_path {raw!r} is not a file under the slide root")
    return resolved


def inspect_slide(path: Path, settings: Settings, *, shown_as: str | None = None) -> dict[str, Any]:
    """Open the slide as a job would (raises the model's SlideError) and return its basic facts.

    ``shown_as`` replaces the server's file path in error messages (an upload's client file name).
    """
    try:
        reader = open_slide(path, max_image_pixels=settings.max_image_pixels,
                            max_slide_pixels=settings.max_slide_pixels)
    except SlideError as exc:
        if shown_as is None:
            raise
        message = str(exc).replace(str(path), shown_as).replace(repr(path.name), repr(shown_as))
        raise type(exc)(message) from exc
    try:
        width, height = reader.level_dimensions[0]
        return {"width": int(width), "height": int(height), "levels": len(reader.level_dimensions),
                "mpp": reader.mpp, "format": reader.format}
    finally:
        reader.close()
