"""A bounded local cache of slides fetched from a store (OpenSlide reads local files only).

Entries are named by the slide's content sha256 (``<sha256><suffix>``), so later jobs and shards
of the same slide reuse one file, whichever store key or ``s3://`` URL named it. A download is
hashed on the way, compared with the sha256 the job was submitted with, and renamed into place
only when it matches. ``objects/`` maps an object version (URL + ETag) to its sha256, so a
``slide_path`` object already cached is not downloaded again to learn its hash. Least recently
used entries (by mtime, refreshed on every use) go first once the cache is over its byte cap.
Several processes may share one cache folder: every write is a rename, and a file that is
evicted while open stays readable to whoever has it open.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from core.storage.base import Storage
from model.errors import CancelledError, UnreadableSlideError


class SlideCache:
    """Slides by sha256 under ``root``, at most ``max_bytes`` (the entry in use is always kept)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes

    def path(self, sha256: str, suffix: str) -> Path:
        return self.root / f"{sha256}{suffix}"

    def fetch(self, storage: Storage, key: str, *, sha256: str | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[Path, str]:
        """The local copy of ``key`` and its sha256, downloading it unless cached."""
        suffix = Path(key).suffix.lower()
        alias = None
        if sha256 is None:
            info = storage.head(key)
            alias = self.root / "objects" / hashlib.sha256(f"{storage.url}/{key}#{info.etag}".encode()).hexdigest()
            sha256 = _read_text(alias)
        if sha256 is not None and (hit := self._hit(sha256, suffix)) is not None:
            return hit, sha256
        path, digest = self._download(storage, key, sha256, suffix, should_stop)
        if alias is not None:
            _write_atomic(alias, digest.encode())
        return path, digest

    def adopt(self, local: Path, sha256: str, suffix: str) -> Path:
        """Move a file whose sha256 is known (an upload just received) into the cache."""
        target = self.path(sha256, suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        local.replace(target)
        self.evict(keep=target)
        return target

    def _hit(self, sha256: str, suffix: str) -> Path | None:
        path = self.path(sha256, suffix)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def _download(self, storage: Storage, key: str, expected: str | None, suffix: str,
                  should_stop: Callable[[], bool] | None) -> tuple[Path, str]:
        tmp = self.root / ".partial" / f"{secrets.token_hex(8)}{suffix}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        try:
            with tmp.open("wb") as out:
                for block in storage.stream(key):
                    out.write(block)
                    digest.update(block)
                    if should_stop is not None and should_stop():
                        raise CancelledError(f"stopped while fetching {Path(key).name!r}")
            got = digest.hexdigest()
            if expected is not None and got != expected:
                raise UnreadableSlideError(f"slide {Path(key).name!r} changed after it was submitted "
                                           f"(sha256 {got[:12]}..., expected {expected[:12]}...)")
            return self.adopt(tmp, got, suffix), got
        finally:
            tmp.unlink(missing_ok=True)

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used slides until the cache is within ``max_bytes``."""
        entries = []
        for path in self.root.glob("*"):
            try:
                if path.is_file():
                    st = path.stat()
                    entries.append((st.st_mtime, st.st_size, path))
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                return
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    tmp.replace(path)
