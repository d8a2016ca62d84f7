"""A class map's PNG and TIFF, written on a thread while the engine fills the map.

The engine hands blocks over in row-major order, so once the last block of a block row is stored,
those rows are final: ``rows_done(y)`` tells the writer thread, which compresses the PNG rows and
the TIFF's full-resolution tiles up to ``y`` meanwhile (zlib releases the GIL), and the reduced
pages' tiles whose rows are final (``model.writers.ReducedPages``). ``close`` copies those in.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from pathlib import Path

from model.writers import ClassMapStore, PalettePngWriter, band_rows, write_tiff_from_store

_ABORT = -1


class MaskWriter:
    """Writes ``png`` and ``tiff`` from ``store`` on its own thread, as rows become final."""

    def __init__(self, store: ClassMapStore, png: Path, tiff: Path, palette: Sequence[tuple[int, int, int]]) -> None:
        self.store, self.png, self.tiff, self.palette = store, png, tiff, palette
        self._ready: queue.Queue[int] = queue.Queue()
        self._rows = 0  # rows known final (writer thread's view)
        self._band = band_rows(store.width)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"nucseg-writer-{png.stem}", daemon=True)
        self._thread.start()

    def rows_done(self, y: int) -> None:
        """Rows ``[0, y)`` of the store are final."""
        self._ready.put(y)

    def close(self) -> None:
        """Wait for both files (all rows must have been reported); re-raise the thread's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the thread and remove what it wrote."""
        self._ready.put(_ABORT)
        self._thread.join()
        for path in (self.png, self.tiff):
            path.unlink(missing_ok=True)

    def _main(self) -> None:
        try:
            with PalettePngWriter(self.png, self.store.width, self.store.height, self.palette) as png:
                self._png = png
                write_tiff_from_store(self.store, self.tiff, self.palette, wait_rows=self._wait_rows)
        except BaseException as exc:  # handed to close()
            self._error = exc

    def _wait_rows(self, y: int) -> None:
        """Block until rows ``[0, y)`` are final, writing the new ones to the PNG as they come."""
        while self._rows < y:
            ready = self._ready.get()
            if ready == _ABORT:
                raise _Aborted
            for y0 in range(self._rows, ready, self._band):
                self._png.write_rows(self.store.read_rows(y0, min(y0 + self._band, ready)))
            self._rows = ready


class _Aborted(Exception):
    """The run stopped; the writer thread gives up."""
