"""A class map's PNG and TIFF, written on a thread while the engine fills the map.

The engine hands blocks over in row-major order, so once the last block of a block row is stored,
those rows are final: ``rows_done(y)`` tells the writer thread, which compresses the PNG rows and
the TIFF's full-resolution tiles up to ``y`` meanwhile (the deflate releases the GIL), and the reduced
pages' tiles whose rows are final (``model.writers.ReducedPages``). ``close`` copies those in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from model.rowwriter import RowWriter
from model.writers import ClassMapStore, PngWriter, band_rows, write_tiff_from_store


class MaskWriter(RowWriter):
    """Writes ``png`` and ``tiff`` from ``store`` on its own thread, as rows become final."""

    def __init__(self, store: ClassMapStore, png: Path, tiff: Path, palette: Sequence[tuple[int, int, int]]) -> None:
        self.store, self.png, self.tiff, self.palette = store, png, tiff, palette
        self._rows = 0  # rows known final (writer thread's view)
        self._band = band_rows(store.width)
        super().__init__(f"nucseg-writer-{png.stem}", [png, tiff])

    def write(self) -> None:
        with PngWriter(self.png, self.store.width, self.store.height, self.palette) as png:
            self._png = png
            write_tiff_from_store(self.store, self.tiff, self.palette, wait_rows=self._wait_rows)

    def _wait_rows(self, y: int) -> None:
        """Block until rows ``[0, y)`` are final, writing the new ones to the PNG as they come."""
        while self._rows < y:
            ready = self.next_rows()
            for y0 in range(self._rows, ready, self._band):
                self._png.write_rows(self.store.read_rows(y0, min(y0 + self._band, ready)))
            self._rows = ready
