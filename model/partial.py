"""Files that appear whole or not at all: written as ``<name>.partial``, renamed into place when done."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


class PartialFile:
    """An open ``<path>.partial`` (text or binary, by ``mode``); ``commit`` renames it to ``path``,
    ``abort`` removes it. Both are no-ops once either has run."""

    def __init__(self, path: str | Path, mode: str = "wb") -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.fh: IO[Any] | None = self.partial.open(mode, encoding=None if "b" in mode else "utf-8")

    def commit(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            os.replace(self.partial, self.path)

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self.partial.unlink(missing_ok=True)


def write_whole(path: Path, data: bytes) -> None:
    """``data`` into ``path``, replacing it in one step."""
    tmp = partial_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
