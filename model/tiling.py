"""Geometry of the global tile grid and of output blocks (pure functions, no I/O).

Coordinates are pixels of the analysis level; a ``Box`` is half-open ``[x0, x1) x [y0, y1)``.
Tiles sit at multiples of the stride ``tile - overlap`` from (0, 0), and the grid extends just far
enough to cover the image, so it does not depend on how the output is cut into blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from model.errors import OptionsError

TileKey = tuple[int, int]
"""A tile of a ``TileGrid``: its column and row."""


@dataclass(frozen=True)
class Box:
    """Half-open pixel rectangle ``[x0, x1) x [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    @staticmethod
    def around(boxes: list[Box]) -> Box:
        """The smallest box holding all ``boxes`` (at least one)."""
        return Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes),
                   max(b.x1 for b in boxes), max(b.y1 for b in boxes))

    def contains(self, other: Box) -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and other.x1 <= self.x1 and other.y1 <= self.y1

    def intersect(self, other: Box) -> Box | None:
        """The overlap of two boxes, or None when they do not overlap."""
        box = Box(max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1))
        return box if box.width > 0 and box.height > 0 else None

    def expand(self, margin: int, bounds: Box) -> Box:
        """Grow by ``margin`` on every side, clipped to ``bounds``."""
        return Box(
            max(self.x0 - margin, bounds.x0),
            max(self.y0 - margin, bounds.y0),
            min(self.x1 + margin, bounds.x1),
            min(self.y1 + margin, bounds.y1),
        )

    def shift(self, dx: int, dy: int) -> Box:
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of side ``tile`` at stride ``tile - overlap`` covering a ``width x height`` image."""

    tile: int
    overlap: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.tile <= 0 or not 0 <= self.overlap < self.tile:
            raise OptionsError(
                f"tile grid needs tile > 0 and 0 <= overlap < tile, got tile={self.tile}, overlap={self.overlap}"
            )
        if self.width <= 0 or self.height <= 0:
            raise OptionsError(f"image size must be positive, got {self.width}x{self.height}")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def count(self, extent: int) -> int:
        """Number of tiles along an axis of ``extent`` pixels (the last one may overhang)."""
        return max(0, math.ceil((extent - self.tile) / self.stride)) + 1

    @property
    def n_x(self) -> int:
        return self.count(self.width)

    @property
    def n_y(self) -> int:
        return self.count(self.height)

    @property
    def bounds(self) -> Box:
        return Box(0, 0, self.width, self.height)

    def tile_box(self, t_x: int, t_y: int) -> Box:
        """Pixel box of tile ``(t_x, t_y)``; it may extend past the image (padded by the engine)."""
        s = self.stride
        return Box(t_x * s, t_y * s, t_x * s + self.tile, t_y * s + self.tile)

    def _axis_range(self, lo: int, hi: int, n: int) -> range:
        first = max(0, (lo - self.tile) // self.stride + 1)
        last = min(n - 1, (hi - 1) // self.stride)
        return range(first, last + 1)

    def tiles_touching(self, box: Box) -> list[TileKey]:
        """Tile indices ``(t_x, t_y)`` whose box overlaps ``box``, row-major."""
        xs = self._axis_range(box.x0, box.x1, self.n_x)
        ys = self._axis_range(box.y0, box.y1, self.n_y)
        return [(t_x, t_y) for t_y in ys for t_x in xs]

    def union_box(self, tiles: list[TileKey]) -> Box:
        """The smallest box holding all ``tiles``."""
        return Box.around([self.tile_box(tx, ty) for tx, ty in tiles])


def plan_blocks(width: int, height: int, block: int) -> list[Box]:
    """Row-major blocks of side ``block`` covering the image (edge blocks are smaller)."""
    if block <= 0:
        raise OptionsError(f"block size must be positive, got {block}")
    return [
        Box(x, y, min(x + block, width), min(y + block, height))
        for y in range(0, height, block)
        for x in range(0, width, block)
    ]


def iter_batches(items: list[TileKey], size: int) -> Iterator[list[TileKey]]:
    """Consecutive chunks of at most ``size`` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
