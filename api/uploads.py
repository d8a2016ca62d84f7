"""Streamed multipart uploads: to disk in chunks, with a size cap, a sha256, and an atomic rename.

The body is parsed as it arrives (``python_multipart``), never spooled whole in memory or in a temp
file. The ``file`` part goes to ``uploads/.partial/<job_id>.part`` and is renamed to
``uploads/<job_id>/slide<ext>`` only when the body ended cleanly; any failure (over the cap, a
malformed body, a client that went away) removes the partial file. The client's filename is kept
as a display name only; the stored name is ours, with the extension taken from an allowlist
(OpenSlide needs it for some vendors).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError
from core.storage.base import Writer

FORM_FIELDS = ("file", "options", "metadata", "callback_url")
SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".vms",
                            ".png", ".jpg", ".jpeg", ".bmp"})
Mirror = Callable[[str], AbstractContextManager[Writer]]  # stored file name -> a store upload
BATCH_BYTES = 1 << 20  # parse (and write) in batches of this size, off the event loop
FIELD_OVERHEAD_BYTES = 1 << 20  # body bytes allowed beyond the file cap (headers, fields)


@dataclass
class StoredUpload:
    """The uploaded file, complete and renamed into place."""

    path: Path
    filename: str
    size: int
    sha256: str


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Receiver:
    """``python_multipart`` callbacks: the file part streams to disk, other fields to memory."""

    def __init__(self, partial: Path, max_file_bytes: int, max_field_bytes: int, mirror: Mirror | None) -> None:
        self.partial, self.max_file_bytes, self.max_field_bytes = partial, max_file_bytes, max_field_bytes
        self.mirror = mirror
        self._upload: AbstractContextManager[Writer] | None = None
        self._sink: Writer | None = None
        self.fields: dict[str, str] = {}
        self.file: IO[bytes] | None = None
        self.filename: str | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}

    def callbacks(self) -> dict[str, Any]:  # a MultipartCallbacks TypedDict
        return {
            "on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
            "on_header_end": self._hend, "on_headers_finished": self._headers_done,
            "on_part_data": self._data, "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._part, self._headers = _Part(), {}

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _hend(self) -> None:
        self._headers[self._header_name.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name not in FORM_FIELDS:
            raise ApiError(422, "validation_error",
                           f"form field {name!r} is not allowed; allowed fields: {', '.join(FORM_FIELDS)}")
        if name in self.fields or (name == "file" and self.file is not None):
            raise ApiError(400, "bad_request", f"form field {name!r} was sent more than once")
        self._part.name = name
        if name == "file":
            raw = params.get(b"filename", b"slide").decode("utf-8", "replace")
            self.filename = display_name(raw)
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.partial.open("wb")
            if self.mirror is not None:
                self._upload = self.mirror(stored_name(self.filename))
                self._sink = self._upload.__enter__()

    def _data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part.name == "file":
            self.size += len(chunk)
            if self.size > self.max_file_bytes:
                raise ApiError(413, "upload_too_large",
                               f"upload is over the cap of {self.max_file_bytes} bytes")
            assert self.file is not None
            self.file.write(chunk)
            self.digest.update(chunk)
            if self._sink is not None:
                self._sink.write(chunk)
            return
        self._part.data += chunk
        if len(self._part.data) > self.max_field_bytes:
            raise ApiError(413, "field_too_large",
                           f"form field {self._part.name!r} is larger than {self.max_field_bytes} bytes")

    def _end(self) -> None:
        if self._part.name == "file":
            assert self.file is not None
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if self._upload is not None:
                upload, self._upload, self._sink = self._upload, None, None
                upload.__exit__(None, None, None)  # completes the store upload
        else:
            self.fields[self._part.name] = self._part.data.decode("utf-8", "replace")

    def close(self, exc: BaseException | None = None) -> None:
        """Close the local file; abort a store upload still open."""
        if self.file is not None and not self.file.closed:
            self.file.close()
        if self._upload is not None:
            upload, self._upload, self._sink = self._upload, None, None
            error = exc or RuntimeError("upload abandoned")
            upload.__exit__(type(error), error, None)


async def receive_multipart(request: Request, *, partial: Path, final_dir: Path, max_file_bytes: int,
                            max_field_bytes: int, mirror: Mirror | None = None,
                            ) -> tuple[StoredUpload | None, dict[str, str]]:
    """Parse a ``multipart/form-data`` body; returns the stored file (if any) and the other fields."""
    boundary = _boundary(request)
    _check_length(request, max_file_bytes + FIELD_OVERHEAD_BYTES)
    receiver = _Receiver(partial, max_file_bytes, max_field_bytes, mirror)
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    try:
        async for batch in _batches(request.stream(), max_file_bytes + FIELD_OVERHEAD_BYTES):
            await anyio.to_thread.run_sync(parser.write, batch)
        await anyio.to_thread.run_sync(parser.finalize)
        _check_complete(parser)
    except BaseException as exc:
        with suppress(Exception):
            receiver.close(exc)
        partial.unlink(missing_ok=True)
        if isinstance(exc, MultipartParseError):
            raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from exc
        raise
    if receiver.file is None:
        return None, receiver.fields
    return _commit(receiver, partial, final_dir), receiver.fields


def _commit(receiver: _Receiver, partial: Path, final_dir: Path) -> StoredUpload:
    final_dir.mkdir(parents=True, exist_ok=True)
    name = receiver.filename or "slide"
    target = final_dir / stored_name(name)
    partial.replace(target)
    return StoredUpload(target, name, receiver.size, receiver.digest.hexdigest())


def stored_name(filename: str | None) -> str:
    """Our name for an uploaded slide: ``slide`` and the client's extension if we know it, else ``.bin``."""
    suffix = Path(filename or "slide").suffix.lower()
    return "slide" + (suffix if suffix in SLIDE_SUFFIXES else ".bin")


async def _batches(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The body in batches of about ``BATCH_BYTES``; 413 once it passes ``limit`` bytes in total."""
    buf, total = bytearray(), 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "upload_too_large", f"request body is over the upload cap of {limit} bytes")
        buf += chunk
        if len(buf) >= BATCH_BYTES:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def _boundary(request: Request) -> bytes:
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data body without a boundary parameter")
    return boundary


def _check_length(request: Request, limit: int) -> None:
    """Refuse a declared Content-Length over the cap before reading (so 100-continue clients send nothing)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "upload_too_large",
                       f"request body of {declared} bytes is over the upload cap of {limit} bytes")


def _check_complete(parser: MultipartParser) -> None:
    from python_multipart.multipart import MultipartState

    if parser.state != MultipartState.END:
        raise ApiError(400, "bad_request", "multipart body ended early (no closing boundary)")


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]+")


def display_name(raw: str) -> str:
    """The client's file name reduced to a harmless display string (never used as a path)."""
    base = re.split(r"[/\\]", raw)[-1]
    cleaned = _UNSAFE.sub("_", base).strip(" .") or "slide"
    return cleaned[:200]
