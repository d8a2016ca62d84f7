"""Streamed writers: PNGs row band by row band, and a raw class-map store on disk.

``PngWriter`` writes an indexed (palette) or RGB PNG without ever holding the image: rows are
filtered, deflated and emitted as IDAT chunks as they arrive.
``write_tiff_from_store`` copies a class map into a tiled pyramidal TIFF (for tile servers, QuPath).
``ClassMapStore`` is a raw ``uint8`` file of ``height x width`` that blocks are written into with
``pwrite`` (unwritten areas stay sparse holes of zeros = background) and read back in row bands.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import tifffile
from isal import isal_zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IDAT_CHUNK = 1 << 18
# Deflate of the mask PNGs and TIFFs (and the overlays' PNGs): ISA-L's (``isal_zlib``, standard zlib
# streams) at level 1, chosen by measurement (benchmarks/RESULTS.md, "Mask compression"): on class
# maps 5-9x the speed of Python's zlib at level 3, for files 14-36 % larger.
MASK_DEFLATE_LEVEL = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


class PngWriter:
    """A PNG written row band by row band; use as a context manager.

    With ``palette``: indexed colour, one byte per pixel, rows unfiltered (class maps deflate best
    so). Without: RGB, rows filtered "Up" (each byte minus the one above it): on H&E tissue as small
    as Pillow's adaptive filtering at level 6 within about 10 %, at 2.5x its speed
    (benchmarks/RESULTS.md, "Host ceiling").
    """

    def __init__(self, path: Path, width: int, height: int,
                 palette: Sequence[tuple[int, int, int]] | None = None) -> None:
        if palette is not None and not 1 <= len(palette) <= 256:
            raise ValueError(f"palette needs 1..256 colours, got {len(palette)}")
        self.path, self.width, self.height = path, width, height
        self._shape: tuple[int, ...] = (width,) if palette is not None else (width, 3)
        self._above = None if palette is not None else np.zeros(3 * width, np.uint8)  # row 0's "above" is 0
        self._rows = 0
        self._fh = path.open("wb")
        self._deflate = isal_zlib.compressobj(MASK_DEFLATE_LEVEL)
        self._pending = bytearray()
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if palette is None else 3, 0, 0, 0)
        plte = b"" if palette is None else _chunk(b"PLTE", b"".join(bytes(c) for c in palette))
        self._fh.write(PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + plte)

    def write_rows(self, rows: np.ndarray) -> None:
        """Append ``(n, width)`` uint8 rows (palette) or ``(n, width, 3)`` (RGB)."""
        if rows.shape[1:] != self._shape or rows.dtype != np.uint8:
            raise ValueError(f"rows must be uint8 (n, {', '.join(map(str, self._shape))}), got {rows.dtype} "
                             f"{rows.shape}")
        if self._rows + rows.shape[0] > self.height:
            raise ValueError(f"{self._rows + rows.shape[0]} rows written, image has {self.height}")
        flat = rows.reshape(rows.shape[0], self.width * (3 if self._above is not None else 1))
        filtered = np.empty((rows.shape[0], flat.shape[1] + 1), dtype=np.uint8)
        filtered[:, 1:] = flat
        if self._above is None:
            filtered[:, 0] = 0  # None
        elif len(flat):
            filtered[:, 0] = 2  # Up
            filtered[0, 1:] -= self._above
            filtered[1:, 1:] -= flat[:-1]
            self._above = flat[-1].copy()
        self._pending += self._deflate.compress(filtered)  # a contiguous buffer: no copy to bytes
        self._rows += rows.shape[0]
        self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        while len(self._pending) >= IDAT_CHUNK or (final and self._pending):
            part = bytes(self._pending[:IDAT_CHUNK])
            del self._pending[:IDAT_CHUNK]
            self._fh.write(_chunk(b"IDAT", part))

    def close(self) -> None:
        """Finish the stream; raises if fewer rows than the height were written."""
        if self._fh.closed:
            return
        try:
            if self._rows != self.height:
                raise ValueError(f"PNG {self.path.name!r}: {self._rows} rows written, expected {self.height}")
            self._pending += self._deflate.flush()
            self._flush(final=True)
            self._fh.write(_chunk(b"IEND", b""))
        finally:
            self._fh.close()

    def abort(self) -> None:
        """Close the file unfinished (whoever asked for it removes it)."""
        self._fh.close()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ClassMapStore:
    """A ``height x width`` uint8 map on disk, written by blocks and read by row bands."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path, self.width, self.height = path, width, height
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, width * height)  # sparse: unwritten pixels read as 0

    def write_block(self, x0: int, y0: int, values: np.ndarray) -> None:
        """Store ``values`` (``(h, w)`` uint8) with its top-left corner at ``(x0, y0)``."""
        values = np.ascontiguousarray(values, dtype=np.uint8)
        for row in range(values.shape[0]):  # each row as it is (a buffer): a copy to bytes doubled the time
            os.pwrite(self._fd, values[row], (y0 + row) * self.width + x0)

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``[y0, y1)`` as ``(y1 - y0, width)`` uint8."""
        data = os.pread(self._fd, (y1 - y0) * self.width, y0 * self.width)
        return np.frombuffer(data, dtype=np.uint8).reshape(y1 - y0, self.width)

    def bands(self, rows: int) -> list[tuple[int, int]]:
        """``[y0, y1)`` row bands of at most ``rows`` rows."""
        return [(y, min(y + rows, self.height)) for y in range(0, self.height, rows)]

    def close(self, *, delete: bool = True) -> None:
        os.close(self._fd)
        if delete:
            self.path.unlink(missing_ok=True)


def band_rows(width: int, budget_bytes: int = 32 << 20) -> int:
    """Rows per band so that one band stays within ``budget_bytes``."""
    return max(1, min(4096, budget_bytes // max(width, 1)))


def overlay(base: np.ndarray, classes: np.ndarray, colours: Sequence[tuple[int, int, int]],
            alpha: float = 0.45) -> np.ndarray:
    """Blend class colours (all but class 0) over an RGB image of the same size: each pixel
    ``round((1 - alpha) * rgb + alpha * colour)`` in float32, looked up in a table of every class and
    byte value: per class, OpenCV's table lookup over the image, copied where the class is (twice the
    speed of one gather of every pixel's entry)."""
    out = base.copy()
    if not out.size:
        return out
    table = _blend_table(colours, alpha)
    for k in range(1, len(colours)):
        where = np.equal(classes, k).view(np.uint8)
        if where.any():
            cv2.copyTo(cv2.LUT(base, table[k].reshape(256, 1, 3)), where, out)
    return out


def _blend_table(colours: Sequence[tuple[int, int, int]], alpha: float) -> np.ndarray:
    """``(classes, 256, 3)`` uint8: byte ``v`` of channel ``c`` under class ``k`` (class 0 unchanged)."""
    tint = np.asarray(colours, dtype=np.float32) * np.float32(alpha)
    keep = np.arange(256, dtype=np.float32) * np.float32(1 - alpha)
    table = np.clip(keep[None, :, None] + tint[:, None, :] + np.float32(0.5), 0, 255).astype(np.uint8)
    table[0] = np.arange(256, dtype=np.uint8)[:, None]
    return table


MASK_TIFF_TILE = 512


def mask_pyramid_sizes(width: int, height: int, tile: int = MASK_TIFF_TILE) -> list[tuple[int, int, int]]:
    """``(scale, width, height)`` per pyramid level: halving until the level fits in one tile."""
    levels, scale = [(1, width, height)], 1
    while max(levels[-1][1:]) > tile:
        scale *= 2
        levels.append((scale, -(-width // scale), -(-height // scale)))
    return levels


def _band(store: ClassMapStore, scale: int, width: int, height: int, tile: int, ty: int) -> np.ndarray:
    """Tile row ``ty`` of one level, zero-padded to whole tiles; pixel ``u`` samples level-0 pixel
    ``u * scale + scale // 2``."""
    ys = np.minimum(np.arange(ty, min(ty + tile, height)) * scale + scale // 2, store.height - 1)
    band = np.zeros((tile, width + (-width % tile)), np.uint8)
    if scale == 1:
        band[: len(ys), :width] = store.read_rows(ty, ty + len(ys))
        return band
    xs = np.minimum(np.arange(width) * scale + scale // 2, store.width - 1)
    for i, y in enumerate(ys.tolist()):
        band[i, :width] = store.read_rows(y, y + 1)[0, xs]
    return band


def _mask_tiles(store: ClassMapStore, scale: int, width: int, height: int, tile: int,
                wait_rows: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """Tiles of one level, row by row. ``wait_rows(y)`` returns once the store's rows ``[0, y)`` are final."""
    for ty in range(0, height, tile):
        if wait_rows is not None:
            wait_rows(min(ty + tile, height))
        band = _band(store, scale, width, height, tile, ty)
        for tx in range(0, width, tile):
            yield band[:, tx : tx + tile]


def _deflate_tile(tile: np.ndarray) -> bytes:
    """One TIFF tile, deflated here (``MASK_DEFLATE_LEVEL``) rather than by tifffile, whose encoder
    depends on whether imagecodecs is installed."""
    return isal_zlib.compress(np.ascontiguousarray(tile), MASK_DEFLATE_LEVEL)


class ReducedPages:
    """The reduced pages' tiles, deflated as soon as the full-resolution rows they sample are final.

    They are spooled to a temporary file in row-major order and handed to the TIFF writer as
    encoded bytes after the full-resolution page, so the end of a run copies bytes instead of
    compressing a third of the map's pixels.
    """

    def __init__(self, store: ClassMapStore, levels: list[tuple[int, int, int]], tile: int, folder: Path) -> None:
        self.store, self.levels, self.tile = store, levels, tile
        self._spool = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (closed by close())
        self._next = [0] * len(levels)  # next tile row of each level
        self._spans: list[list[tuple[int, int]]] = [[] for _ in levels]  # (offset, size) of each tile
        self._end = 0

    def advance(self, rows_final: int) -> None:
        """Encode every tile row whose source rows lie within ``[0, rows_final)``."""
        for k, (scale, width, height) in enumerate(self.levels):
            while self._next[k] < height:
                ty = self._next[k]
                last = min(ty + self.tile, height) - 1
                if min(last * scale + scale // 2, self.store.height - 1) >= rows_final:
                    break
                band = _band(self.store, scale, width, height, self.tile, ty)
                for tx in range(0, width, self.tile):
                    data = _deflate_tile(band[:, tx : tx + self.tile])
                    self._spool.write(data)
                    self._spans[k].append((self._end, len(data)))
                    self._end += len(data)
                self._next[k] = ty + self.tile

    def tiles(self, k: int) -> Iterator[bytes]:
        """Level ``k``'s encoded tiles (after ``advance`` has covered every row)."""
        if self._next[k] < self.levels[k][2]:
            raise RuntimeError(f"reduced page {k + 1} is not complete")
        for offset, size in self._spans[k]:
            self._spool.seek(offset)
            yield self._spool.read(size)

    def close(self) -> None:
        self._spool.close()


def write_tiff_from_store(store: ClassMapStore, path: Path, palette: Sequence[tuple[int, int, int]],
                          tile: int = MASK_TIFF_TILE, *, wait_rows: Callable[[int], None] | None = None) -> None:
    """A tiled, pyramidal uint8 class-index TIFF (palette colours), written tile by tile.

    Page ``k`` is the map downsampled by ``2**k`` (nearest). Memory: one band of ``tile`` rows.
    With ``wait_rows`` the full-resolution page is written while the store is still being filled,
    and the reduced pages are encoded meanwhile too (``ReducedPages``).
    """
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, : len(palette)] = (np.asarray(palette, np.uint16).T * 257)
    sizes = mask_pyramid_sizes(store.width, store.height, tile)
    reduced = ReducedPages(store, sizes[1:], tile, path.parent) if wait_rows is not None else None

    def wait_full(y: int) -> None:
        assert wait_rows is not None and reduced is not None
        wait_rows(y)
        reduced.advance(y)

    try:
        with tifffile.TiffWriter(path, bigtiff=store.width * store.height > 2**31) as tif:
            for k, (scale, width, height) in enumerate(sizes):
                tiles: Iterator[bytes]
                if reduced is None or k == 0:
                    waiting = wait_full if reduced and k == 0 else None
                    tiles = map(_deflate_tile, _mask_tiles(store, scale, width, height, tile, waiting))
                else:
                    tiles = reduced.tiles(k - 1)
                tif.write(tiles, shape=(height, width), dtype=np.uint8,
                          tile=(tile, tile), photometric="palette", colormap=colormap, compression="zlib",
                          subfiletype=0 if k == 0 else 1, maxworkers=1)
    finally:
        if reduced is not None:
            reduced.close()
