"""The local backend: keys are paths under the data folder (the default, one machine or a shared disk)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from core.storage.base import ObjectInfo, Writer
from core.storage.errors import ObjectMissing, StorageUnavailable

CHUNK = 1 << 20


class LocalStorage:
    """Objects as files under ``root``; a write lands by rename, so it appears whole."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def head(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"no object {key!r} in {self.url}") from exc
        return ObjectInfo(key, st.st_size, st.st_mtime, f"{st.st_size}-{st.st_mtime_ns}")

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"no object {key!r} in {self.url}") from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with self._path(key).open("rb") as fh:
            fh.seek(start)
            left = (end if end is not None else self.head(key).size) - start
            while left > 0 and (block := fh.read(min(CHUNK, left))):
                left -= len(block)
                yield block

    def open_reader(self, key: str) -> IO[bytes]:
        return self._path(key).open("rb")

    @contextmanager
    def writer(self, key: str) -> Iterator[Writer]:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            with partial.open("wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> None:
        with self.writer(key) as out, path.open("rb") as src:
            shutil.copyfileobj(src, out, CHUNK)

    def download(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._path(key), dest)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def folders(self, prefix: str) -> dict[str, float]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return {}
        return {p.name: p.stat().st_mtime for p in folder.iterdir() if p.is_dir()}

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"the data folder {self.root} cannot be created: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"the data folder {self.root} is not writable")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)
