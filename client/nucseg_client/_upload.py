"""Streaming upload sources: a path, a binary file object or an iterable of bytes, read in chunks."""

from __future__ import annotations

import io
import mimetypes
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, cast

Source = str | os.PathLike[str] | IO[bytes] | bytes | Iterable[bytes]
"""What ``submit`` uploads: a path, a binary file object, bytes, or an iterable of bytes chunks."""


class UploadReader:
    """A read-only file-like view of an upload source that reports how many bytes were read.

    httpx's multipart encoder reads it in 64 KiB chunks, so the source is never held in memory.
    A seekable source can be sent again (retries); an iterable of bytes cannot.
    """

    def __init__(self, raw: IO[bytes] | Iterator[bytes], on_read: Callable[[int], None]) -> None:
        self._on_read = on_read
        self._file: IO[bytes] | None = cast(IO[bytes], raw) if _is_seekable(raw) else None
        self._stream: Iterator[bytes] | None = None
        if self._file is None:
            self._stream = cast(Iterator[bytes], raw) if not hasattr(raw, "read") else _chunks(cast(IO[bytes], raw))
        self._buffer = b""
        self.sent = 0
        self.size = _size(self._file) if self._file is not None else None

    @property
    def replayable(self) -> bool:
        return self._file is not None

    def read(self, n: int = -1) -> bytes:
        chunk = self._file.read(n) if self._file is not None else self._read_stream(n)
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise TypeError(f"upload source must yield bytes, got {type(chunk).__name__}")
        self.sent += len(chunk)
        self._on_read(self.sent)
        return bytes(chunk)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self._file is None:
            raise io.UnsupportedOperation("an iterable upload source cannot seek")
        pos = self._file.seek(offset, whence)
        if whence == os.SEEK_SET:
            self.sent = pos
        return pos

    def tell(self) -> int:
        if self._file is None:
            raise io.UnsupportedOperation("an iterable upload source cannot tell")
        return self._file.tell()

    def fileno(self) -> int:
        if self._file is None:
            raise io.UnsupportedOperation("an iterable upload source has no file descriptor")
        return self._file.fileno()

    def _read_stream(self, n: int) -> bytes:
        assert self._stream is not None
        while not self._buffer:
            try:
                self._buffer = bytes(next(self._stream))
            except StopIteration:
                return b""
        if n < 0:
            n = len(self._buffer)
        chunk, self._buffer = self._buffer[:n], self._buffer[n:]
        return chunk


def open_source(source: Source) -> tuple[IO[bytes] | Iterator[bytes], str | None, bool]:
    """``(readable, default filename, opened_here)`` for a path, a file object or an iterable."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"slide file {str(path)!r} does not exist or is not a file")
        return path.open("rb"), path.name, True
    if isinstance(source, io.TextIOBase):
        raise TypeError(f"upload source must be opened in binary mode ('rb'), got text file {source!r}")
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return source, Path(name).name if isinstance(name, str) else None, False  # type: ignore[return-value]
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), None, False
    if isinstance(source, Iterable):
        return iter(source), None, False
    raise TypeError(f"upload source must be a path, a binary file or an iterable of bytes, got {source!r}")


def multipart_file(name: str, reader: UploadReader) -> dict[str, Any]:
    """httpx's ``files=`` argument for the slide part of ``POST /v1/jobs``."""
    return {"file": (name, reader, mimetypes.guess_type(name)[0] or "application/octet-stream")}


def _chunks(file: IO[bytes], size: int = 1 << 16) -> Iterator[bytes]:
    """A non-seekable file object (a pipe, stdin) read as a stream of chunks."""
    while chunk := file.read(size):
        yield chunk


def _is_seekable(raw: Any) -> bool:
    try:
        return bool(raw.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _size(file: IO[bytes]) -> int | None:
    try:
        return os.fstat(file.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        pass
    try:
        here = file.tell()
        end = file.seek(0, os.SEEK_END)
        file.seek(here)
        return end
    except (AttributeError, OSError, ValueError):
        return None
