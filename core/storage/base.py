"""The storage protocol both backends serve, and what it says about one object."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size, last change (unix time) and version tag."""

    key: str
    size: int
    modified: float
    etag: str


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


class Storage(Protocol):
    """Objects under relative keys. Every method raises ``StorageUnavailable`` when the store fails."""

    url: str

    def head(self, key: str) -> ObjectInfo:
        """Size and version of ``key``; ``ObjectMissing`` when there is none."""
        ...

    def read(self, key: str) -> bytes:
        """A whole (small) object."""
        ...

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from ``start``."""
        ...

    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of ``key`` in chunks, for downloads."""
        ...

    def open_reader(self, key: str) -> IO[bytes]:
        """A seekable binary file over ``key`` that reads by range (TIFF directories)."""
        ...

    def writer(self, key: str) -> AbstractContextManager[Writer]:
        """Write ``key`` as a stream; it appears only when the block ends without an error."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Store a local file at ``key``."""
        ...

    def download(self, key: str, dest: Path) -> None:
        """Write ``key`` to the local file ``dest``."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix/``."""
        ...

    def folders(self, prefix: str) -> dict[str, float]:
        """The names just below ``prefix/``, each with its newest change (unix time)."""
        ...

    def check(self) -> None:
        """Raise ``StorageUnavailable`` unless the store answers (for readiness checks)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The file that holds ``key`` when the store is this machine's disk, else None."""
        ...
