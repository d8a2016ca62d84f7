"""The whole-slide benchmark's generated slide: a JPEG-tiled pyramid OpenSlide reads as its source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import slide as bench
from model.readers import open_slide


def test_generated_slide_is_the_mirrored_tissue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    side = 2 * bench.TILE
    path = bench.write_slide(side)
    reader = open_slide(path)
    try:
        assert reader.level_dimensions[:2] == ((side, side), (side // 2, side // 2))
        assert len(reader.level_dimensions) == bench.LEVELS and reader.mpp == pytest.approx(bench.MPP)
        pixels = reader.read_region(0, 0, 0, side, side).astype(np.float32)
    finally:
        reader.close()
    tiles = list(bench._mirrored_tiles(bench.tissue_source(), side))
    rows = [np.concatenate(tiles[r * 2 : r * 2 + 2], axis=1) for r in range(2)]
    source = np.concatenate(rows, axis=0).astype(np.float32)
    error = np.abs(pixels - source)
    assert error.mean() < 2.0 and np.percentile(error, 99) < 20  # JPEG at quality 90, colours as written
