"""The thumbnail and the class overlays, written on a thread of their own while the engine runs.

The thumbnail is read, and ``thumbnail.png`` written, as the run starts. An overlay is the
thumbnail with one head's class colours blended over it; its pixel ``(u, v)`` shows analysis pixel
``(floor((u + 0.5) k), floor((v + 0.5) k))``, which ``ClassMapSink`` samples into a small class map
as blocks arrive. Once a block row is done, the overlay rows that sample it are final: they are
blended and streamed into their PNGs (``PngWriter``), so a run ends with one band to write instead
of whole images to encode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.options import THUMBNAIL_FILE, overlay_file
from model.rowwriter import Aborted, RowWriter
from model.writers import PngWriter, overlay

BAND_ROWS = 256  # overlay rows blended and written at a time


def sample_positions(lo: int, hi: int, k: float, n: int) -> np.ndarray:
    """Overlay indices whose sample point ``floor((u + 0.5) k)`` lies in ``[lo, hi)``."""
    first = max(0, math.ceil(lo / k - 0.5))
    us = np.arange(first, min(n, math.ceil(hi / k - 0.5) + 1))
    src = np.floor((us + 0.5) * k)
    return us[(src >= lo) & (src < hi)]


@dataclass(frozen=True)
class OverlayHead:
    """One overlay: the head's name, its sampled class map (filled by the sink) and colours."""

    name: str
    small: np.ndarray
    colours: Sequence[tuple[int, int, int]]


class OverlayWriter(RowWriter):
    """Reads the thumbnail and writes the thumbnail and overlay PNGs, on its own thread.

    ``rows_done(y)``: analysis rows ``[0, y)`` are final in every head's small map. ``abort`` waits
    for a thumbnail read under way.
    """

    def __init__(self, out_dir: Path, read_thumbnail: Callable[[], np.ndarray], heads: Sequence[OverlayHead],
                 k: float, height: int) -> None:
        self.heads, self.k, self.height = heads, k, height
        self._read_thumbnail = read_thumbnail
        super().__init__("nucseg-overlays",
                         [out_dir / THUMBNAIL_FILE] + [out_dir / overlay_file(h.name) for h in heads])

    def _final_rows(self, y: int, total: int) -> int:
        """Overlay rows all of whose samples lie in analysis rows ``[0, y)``."""
        if y >= self.height:
            return total
        sampled = sample_positions(0, y, self.k, total)
        return int(sampled[-1]) + 1 if len(sampled) else 0

    def write(self) -> None:
        thumb = self._read_thumbnail()
        with PngWriter(self.paths[0], thumb.shape[1], thumb.shape[0]) as png:
            for v in range(0, thumb.shape[0], BAND_ROWS):
                png.write_rows(thumb[v : v + BAND_ROWS])
        total, done = thumb.shape[0], 0
        pngs = [PngWriter(path, thumb.shape[1], total) for path in self.paths[1:]]
        try:
            while done < total:
                final = self._final_rows(self.next_rows(), total)
                for v in range(done, final, BAND_ROWS):
                    rows = slice(v, min(v + BAND_ROWS, final))
                    for head, png in zip(self.heads, pngs, strict=True):
                        png.write_rows(overlay(thumb[rows], head.small[rows], head.colours))
                done = max(done, final)
        except Aborted:
            pass
        finally:
            for png in pngs:
                if done == total:
                    png.close()
                else:
                    png.abort()
