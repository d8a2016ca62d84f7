"""Deep Zoom tiles: the slide through OpenSlide's ``DeepZoomGenerator``, the masks from their TIFFs.

Slide tiles are JPEG (254 px + 1 px overlap, ``limit_bounds=False``, so Deep Zoom pixel 0 is level-0
pixel 0). Overlay tiles are RGBA PNG (256 px, no overlap) cut from ``semantic.tiff`` /
``ternary.tiff``, one TIFF tile at a time by a range read from the store (never the whole mask): class 0 is
transparent, the others take the model card's colours. An overlay's Deep Zoom image has the
analysis size; ``viewport_width`` tells the viewer how wide to draw it so that it covers the same
level-0 extent as the slide (``analysis px * l0_per_px / level-0 width``).
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from core.storage import Storage
from model.options import Stats

SLIDE_TILE, SLIDE_OVERLAP = 254, 1
MASK_TILE = 256
DZI_NS = "http://schemas.microsoft.com/deepzoom/2008"


def dzi_xml(width: int, height: int, tile: int, overlap: int, fmt: str) -> str:
    """A Deep Zoom descriptor."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_NS}" Format="{fmt}" Overlap="{overlap}" '
            f'TileSize="{tile}"><Size Width="{width}" Height="{height}"/></Image>\n')


# ---------------------------------------------------------------- slide


@dataclass
class SlideTiles:
    """A Deep Zoom generator over one slide file (a lock for Pillow-backed images)."""

    dz: DeepZoomGenerator
    lock: threading.Lock | None

    def dzi(self) -> str:
        width, height = self.dz.level_dimensions[-1]
        return dzi_xml(width, height, SLIDE_TILE, SLIDE_OVERLAP, "jpeg")

    def valid(self, level: int, col: int, row: int) -> bool:
        if not 0 <= level < self.dz.level_count:
            return False
        cols, rows = self.dz.level_tiles[level]
        return 0 <= col < cols and 0 <= row < rows

    def jpeg(self, level: int, col: int, row: int) -> bytes:
        if self.lock is None:
            tile = self.dz.get_tile(level, (col, row))
        else:
            with self.lock:
                tile = self.dz.get_tile(level, (col, row))
        buf = io.BytesIO()
        tile.convert("RGB").save(buf, format="JPEG", quality=85)
        return buf.getvalue()


def slide_tiles(path: Path) -> SlideTiles:
    """Cached per file (path, size, mtime): opening a slide costs more than a tile."""
    st = path.stat()
    return _slide_tiles(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _slide_tiles(path: str, size: int, mtime_ns: int) -> SlideTiles:
    slide = openslide.open_slide(path)  # OpenSlide formats, else Pillow via ImageSlide
    lock = threading.Lock() if isinstance(slide, openslide.ImageSlide) else None
    return SlideTiles(DeepZoomGenerator(slide, tile_size=SLIDE_TILE, overlap=SLIDE_OVERLAP, limit_bounds=False), lock)


# ---------------------------------------------------------------- masks


def dz_levels(width: int, height: int) -> int:
    """Deep Zoom level count: level ``L`` is the image shrunk by ``2**(count - 1 - L)``."""
    return math.ceil(math.log2(max(width, height, 1))) + 1


def dz_level_size(width: int, height: int, level: int) -> tuple[int, int]:
    f = 2 ** (dz_levels(width, height) - 1 - level)
    return -(-width // f), -(-height // f)


class MaskPyramid:
    """A pyramidal class-index TIFF in a store, read tile by tile (page ``k`` = ``2**k`` downsample)."""

    def __init__(self, storage: Storage, key: str) -> None:
        with storage.open_reader(key) as fh, tifffile.TiffFile(fh) as tif:
            self.pages: list[Any] = [tif.pages[i] for i in range(len(tif.pages))]
            for page in self.pages:
                page.dataoffsets  # noqa: B018  (load the tag values before the file closes)
        self.storage, self.key = storage, key
        first = self.pages[0]
        self.width, self.height = int(first.imagewidth), int(first.imagelength)

    def dzi(self) -> str:
        return dzi_xml(self.width, self.height, MASK_TILE, 0, "png")

    def valid(self, level: int, col: int, row: int) -> bool:
        if not 0 <= level < dz_levels(self.width, self.height):
            return False
        w, h = dz_level_size(self.width, self.height, level)
        return 0 <= col < -(-w // MASK_TILE) and 0 <= row < -(-h // MASK_TILE)

    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """Class indices of Deep Zoom tile ``(col, row)`` at ``level`` (nearest sampling)."""
        w, h = dz_level_size(self.width, self.height, level)
        f = 2 ** (dz_levels(self.width, self.height) - 1 - level)
        k = min(int(math.log2(f)), len(self.pages) - 1)
        r = f // 2**k  # page pixels per tile pixel (1 except past the top page)
        x0, y0 = col * MASK_TILE, row * MASK_TILE
        tw, th = min(MASK_TILE, w - x0), min(MASK_TILE, h - y0)
        page = self.pages[k]
        pw, ph = int(page.imagewidth), int(page.imagelength)
        xs = np.minimum(np.arange(x0, x0 + tw) * r + r // 2, pw - 1)
        ys = np.minimum(np.arange(y0, y0 + th) * r + r // 2, ph - 1)
        region = self._region(page, int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        return region[np.ix_(ys - ys[0], xs - xs[0])]

    def _region(self, page: Any, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Page pixels ``[y0, y1) x [x0, x1)``, decoding only the TIFF tiles that touch them."""
        tw, tl = int(page.tilewidth), int(page.tilelength)
        across = -(-int(page.imagewidth) // tw)
        out = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for ty in range(y0 // tl, (y1 - 1) // tl + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                block = self._decode(page, ty * across + tx, tl, tw)
                bx, by = tx * tw, ty * tl
                sx0, sy0 = max(x0, bx), max(y0, by)
                sx1, sy1 = min(x1, bx + tw), min(y1, by + tl)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = block[sy0 - by : sy1 - by, sx0 - bx : sx1 - bx]
        return out

    def _decode(self, page: Any, index: int, tl: int, tw: int) -> np.ndarray:
        count = int(page.databytecounts[index])
        if count == 0:
            return np.zeros((tl, tw), np.uint8)
        data = self.storage.read_range(self.key, int(page.dataoffsets[index]), count)
        segment, _, _ = page.decode(data, index)
        return np.asarray(segment, np.uint8).reshape(tl, tw)


_pyramids: OrderedDict[tuple[str, str, str], MaskPyramid] = OrderedDict()
_pyramids_lock = threading.Lock()
PYRAMIDS_CACHED = 16


def mask_pyramid(storage: Storage, key: str, etag: str) -> MaskPyramid:
    """Cached per object version (store, key, ETag): the TIFF's directory is parsed once."""
    ident = (storage.url, key, etag)
    with _pyramids_lock:
        if ident in _pyramids:
            _pyramids.move_to_end(ident)
            return _pyramids[ident]
    pyramid = MaskPyramid(storage, key)
    with _pyramids_lock:
        _pyramids[ident] = pyramid
        while len(_pyramids) > PYRAMIDS_CACHED:
            _pyramids.popitem(last=False)
    return pyramid


def rgba_png(classes: np.ndarray, colours: Sequence[Sequence[int]]) -> bytes:
    """Class indices as an RGBA PNG: class 0 transparent, class ``c`` opaque ``colours[c]``."""
    lut = np.zeros((256, 4), np.uint8)
    for index, colour in enumerate(colours[:256]):
        if index > 0:
            lut[index] = (*colour[:3], 255)
    buf = io.BytesIO()
    Image.fromarray(lut[classes], "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def l0_per_analysis_px(stats: Stats) -> float:
    """Level-0 slide pixels per analysis pixel, from ``stats.json``."""
    analysis, slide = stats["analysis"], stats["slide"]
    slide_mpp = stats["parameters"].get("mpp") or slide["mpp"] or analysis["mpp"]
    if not analysis["mpp"] or not slide_mpp:
        width = slide["dimensions"][0]
        return float(width) / float(analysis["width"] or width or 1)
    return float(analysis["mpp"]) / float(slide_mpp)
