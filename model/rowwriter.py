"""A writer on a thread of its own, told as the rows of a map become final (``rows_done``).

Blocks reach the sinks in row-major order, so once a block row is stored its rows are final; a
writer encodes those meanwhile, and closing it waits only for the last ones. ``abort`` stops the
thread and removes its files.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

_ABORT = -1


class Aborted(Exception):
    """The run stopped; the writer thread gives up."""


class RowWriter:
    """Subclasses set their state, then call ``__init__`` (which starts the thread), and implement ``write``."""

    def __init__(self, name: str, paths: list[Path]) -> None:
        self.paths = paths
        self._ready: queue.Queue[int] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def rows_done(self, y: int) -> None:
        """Rows ``[0, y)`` of the map are final."""
        self._ready.put(y)

    def close(self) -> None:
        """Wait for the files (every row must have been reported); re-raise the thread's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the thread and remove what it wrote."""
        self._ready.put(_ABORT)
        self._thread.join()
        for path in self.paths:
            path.unlink(missing_ok=True)

    def write(self) -> None:
        """Write the files, calling ``next_rows`` for each further count of final rows."""
        raise NotImplementedError

    def next_rows(self) -> int:
        """The next count of final rows (waits for it); raises ``Aborted`` once the run stopped."""
        ready = self._ready.get()
        if ready == _ABORT:
            raise Aborted
        return ready

    def _main(self) -> None:
        try:
            self.write()
        except BaseException as exc:  # handed to close()
            self._error = exc
