"""A run's plan, made before the first tile runs: each block's tiles, what it takes of its
neighbours' maps (``model.seams``), which blocks add each tile, and which pixels each block reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from model.seams import Share, shared_columns, shared_rows
from model.tiling import Box, TileGrid, TileKey


@dataclass
class BlockJob:
    """One block of a run: its tiles (those its own part needs), and the pixels to read ahead for them."""

    index: int
    inner: Box
    region: Box
    tiles: list[TileKey]
    source: Box | None = None  # the pixels read ahead: those of the tiles no earlier block adds (None: none)
    share: Share = field(default_factory=Share)  # what its neighbours lend it
    lent_cols: int = 0  # trailing region columns whose maps the next block takes
    lent_rows: int = 0  # trailing region rows whose maps the block below takes


class TileUses:
    """The blocks of a run that add each tile, in run order: what the tile cache keeps a tile for."""

    def __init__(self, jobs: Iterable[BlockJob]) -> None:
        self._uses: dict[TileKey, list[int]] = {}
        for job in jobs:
            for tile in job.tiles:
                self._uses.setdefault(tile, []).append(job.index)

    def of(self, tile: TileKey) -> list[int]:
        return self._uses.get(tile, [])


def share_maps(jobs: Sequence[BlockJob], grid: TileGrid, per_row: int, *, rows: bool) -> int:
    """Let each block take from the blocks before it (to the left, and with ``rows`` above) the maps
    of the parts of its region they hold, where both have tiles and it has tiles of its own part
    left; its tiles become those of its own part. Returns the region pixels so shared."""
    by_index, total = {job.index: job for job in jobs}, 0
    for job in jobs:
        left, above = by_index.get(job.index - 1), by_index.get(job.index - per_row) if rows else None
        share = Share(shared_columns(left.region, job.region) if left is not None and left.tiles else 0,
                      shared_rows(above.region, job.region) if above is not None and above.tiles else 0)
        own = share.own_part(job.region)
        tiles = [t for t in job.tiles if grid.tile_box(*t).intersect(own) is not None]
        if share == Share() or not tiles:
            continue
        job.tiles, job.share = tiles, share
        if share.cols and left is not None:
            left.lent_cols = share.cols
        if share.rows and above is not None:
            above.lent_rows = share.rows
        total += job.region.area - own.area
    return total


def strip_bytes(width: int, margin: int, per_row: int, bytes_per_px: int) -> int:
    """The bytes of the maps a block row lends the next: its regions' last ``2 x margin`` rows."""
    return 2 * margin * (width + 2 * margin * per_row) * bytes_per_px


def add_sources(jobs: Sequence[BlockJob], grid: TileGrid) -> None:
    """Set each block's ``source``: around the tiles no earlier block of the run adds (the others'
    logits are normally in the tile cache by then)."""
    seen: set[TileKey] = set()
    for job in jobs:
        new = [t for t in job.tiles if t not in seen]
        seen.update(new)
        job.source = grid.union_box(new) if new else None
