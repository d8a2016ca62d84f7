"""Generated slides: pyramidal tiled TIFFs written tile by tile (never whole in memory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

TILE = 512


def _tissue_tile(rng: np.random.Generator) -> np.ndarray:
    """A pinkish H&E-like texture with dark purple blobs."""
    tile = np.empty((TILE, TILE, 3), dtype=np.uint8)
    tile[...] = (225, 160, 200)
    tile[::2, ::3] = (205, 140, 185)  # a cheap-to-compress texture
    for _ in range(40):
        y, x = rng.integers(8, TILE - 8, 2)
        tile[y - 6 : y + 6, x - 6 : x + 6] = (90, 50, 140)
    return tile


def _tiles(width: int, height: int, is_tissue: np.ndarray, scale: int, seed: int,
           cell: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    white = np.full((TILE, TILE, 3), 255, dtype=np.uint8)
    pattern = _tissue_tile(rng)
    for ty in range(-(-height // TILE)):
        for tx in range(-(-width // TILE)):
            gy, gx = (ty * TILE * scale) // cell, (tx * TILE * scale) // cell
            inside = is_tissue[min(gy, is_tissue.shape[0] - 1), min(gx, is_tissue.shape[1] - 1)]
            yield pattern if inside else white


def write_pyramid(path: Path, width: int, height: int, *, mpp: float = 0.25, levels: int = 4,
                  tissue_fraction: float = 0.05, cell: int = TILE * 8, seed: int = 0) -> Path:
    """A tiled, pyramidal RGB TIFF of mostly glass with a few tissue patches (deflate-compressed).

    Tissue is decided on a coarse grid of ``cell``-px cells (a multiple of the tile, level-0 px) so
    every level agrees on where it is; the top-left cell always holds tissue.
    """
    rng = np.random.default_rng(seed)
    grid = (max(1, -(-height // cell)), max(1, -(-width // cell)))
    is_tissue = rng.random(grid) < tissue_fraction
    is_tissue.flat[0] = True
    res = 1e4 / mpp  # pixels per cm
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            scale = 2**level
            w, h = max(1, width // scale), max(1, height // scale)
            tif.write(
                _tiles(w, h, is_tissue, scale, seed, cell), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                photometric="rgb", compression="zlib", compressionargs={"level": 1},
                resolution=(res / scale, res / scale),
                resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1, maxworkers=1,
            )
    return path
