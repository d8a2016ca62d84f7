"""Parts of a region its neighbours also hold: blended and mapped once, by the block before.

A block's region is its inner box plus the margin the nuclei need, so two neighbours share a strip
``2 x margin`` wide: with the block to the left, its first columns; with the block above, its first
rows. Every pixel's maps are the same whichever block makes them (the same tiles, added in the same
order), so a block takes those maps from its neighbours and blends only the rest of its region (its
"own part"): at 2,048 px blocks with the nuclei's 135 px margin, a fifth fewer pixels blended and
mapped. The left block's columns are held for one block; the rows above, for a block row (a strip
as wide as the slide, which the engine shares only while it fits a budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.tiling import Box


@dataclass(frozen=True)
class Share:
    """What a block takes from its neighbours: its leading ``cols`` from the block to the left, the
    rest of its leading ``rows`` from the block above."""

    cols: int = 0
    rows: int = 0

    def own_part(self, region: Box) -> Box:
        """What the block blends of ``region``."""
        return Box(region.x0 + self.cols, region.y0 + self.rows, region.x1, region.y1)


def shared_columns(left: Box, right: Box) -> int:
    """Leading columns of ``right`` that ``left``, the region before it in the same block row, holds."""
    same_rows = left.y0 == right.y0 and left.y1 == right.y1
    return min(left.x1, right.x1) - right.x0 if same_rows and left.x0 < right.x0 < left.x1 else 0


def shared_rows(above: Box, below: Box) -> int:
    """Leading rows of ``below`` that ``above``, the region above it in the same block column, holds."""
    same_cols = above.x0 == below.x0 and above.x1 == below.x1
    return min(above.y1, below.y1) - below.y0 if same_cols and above.y0 < below.y0 < above.y1 else 0


class SharedMaps:
    """The maps a block lends its neighbours: its last columns (until the next block) and its last
    rows (until the block below), each ``(..., h, w)`` tensors as the block's maps are."""

    def __init__(self) -> None:
        self._left: tuple[Box, list[torch.Tensor]] | None = None
        self._above: dict[tuple[int, int], tuple[Box, list[torch.Tensor]]] = {}  # by the region's columns

    def fill(self, region: Box, share: Share, maps: Sequence[torch.Tensor]) -> None:
        """Copy into ``maps`` (over ``region``) what ``share`` says its neighbours lent."""
        if share.cols:
            parts = self._take(self._left, Box(region.x0, region.y0, region.x0 + share.cols, region.y1))
            for target, part in zip(maps, parts, strict=True):
                target[..., : share.cols] = part
        if share.rows:
            needed = Box(region.x0, region.y0, region.x1, region.y0 + share.rows)
            parts = self._take(self._above.pop((region.x0, region.x1), None), needed)
            for target, part in zip(maps, parts, strict=True):
                target[..., : share.rows, share.cols :] = part[..., share.cols :]

    @staticmethod
    def _take(held: tuple[Box, list[torch.Tensor]] | None, needed: Box) -> list[torch.Tensor]:
        """The maps held, which must be those of ``needed``."""
        if held is None or held[0] != needed:
            raise RuntimeError(f"maps of {needed} needed, held {None if held is None else held[0]}")
        return held[1]

    def keep(self, region: Box, cols: int, rows: int, maps: Sequence[torch.Tensor]) -> None:
        """Hold the last ``cols`` columns of ``maps`` (over ``region``) for the next block, and the
        last ``rows`` rows for the block below."""
        self._left = (Box(region.x1 - cols, region.y0, region.x1, region.y1),
                      [m[..., -cols:].clone() for m in maps]) if cols else None
        if rows:
            self._above[region.x0, region.x1] = (Box(region.x0, region.y1 - rows, region.x1, region.y1),
                                                  [m[..., -rows:, :].clone() for m in maps])
