"""A bounded cache of tile logits, so a tile shared by neighbouring blocks runs once.

Blocks are processed in row-major order and each block's region is known in advance, so for every
tile we know which later blocks need it. The cache keeps a tile only while some later block needs
it, and when full it drops the entry whose next use is farthest away (Belady's rule), so with a
small budget it still keeps the left-right neighbours and with a larger one also the row below.
The logits stay on the device the network runs on.
"""

from __future__ import annotations

import torch

from model.tiling import Box, TileKey


class BlockIndex:
    """The row-major block grid of a run starting at block ``start`` (a shard of the slide):
    ``needed_before`` tells a tile that blocks before ``start`` need too."""

    def __init__(self, width: int, block: int, margin: int, *, start: int = 0) -> None:
        self.block, self.margin, self.start = block, margin, start
        self.n_x = -(-width // block)

    def needed_before(self, box: Box) -> bool:
        """Whether a block before ``start`` touches the tile."""
        return self.start > 0 and self._first(box) < self.start

    def _first(self, box: Box) -> int:
        b, m = self.block, self.margin
        return max(0, (box.y0 - m) // b) * self.n_x + max(0, (box.x0 - m) // b)


class TileCache:
    """Tile logits kept for later blocks, within ``budget_bytes``.

    ``offer`` takes the float32 logits with a dtype that holds them exactly (bf16 when the network
    ran in bf16: its outputs, widened): they are kept in it, in half the bytes, and widened back to
    the same float32 values where they are added (``Accumulator.add``).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._items: dict[TileKey, tuple[torch.Tensor, list[int]]] = {}  # key -> (logits, later blocks needing it)
        self.hits = 0

    def get(self, key: TileKey) -> torch.Tensor | None:
        """The logits kept for ``key``, if any, in the dtype they were kept in."""
        item = self._items.get(key)
        if item is None:
            return None
        self.hits += 1
        return item[0]

    def offer(self, key: TileKey, logits: torch.Tensor, uses: list[int], current: int,
              exact: torch.dtype = torch.float32) -> None:
        """Keep ``logits`` (in ``exact``, a dtype that holds their values) if a block after ``current``
        needs it and it fits (evicting farther uses)."""
        later = sorted(u for u in uses if u > current)
        self._drop(key)
        size = logits.numel() * exact.itemsize
        if not later or size > self.budget:
            return
        while self.used + size > self.budget:
            far_key, (_, far_uses) = max(self._items.items(), key=lambda kv: kv[1][1][0])
            if far_uses[0] <= later[0]:
                return
            self._drop(far_key)
        self._items[key] = (logits.to(exact, copy=True), later)
        self.used += size

    def retire(self, current: int) -> None:
        """After block ``current``: forget tiles no later block needs, advance the others' next use."""
        for key, (logits, uses) in list(self._items.items()):
            later = [u for u in uses if u > current]
            if later:
                self._items[key] = (logits, later)
            else:
                self._drop(key)

    def _drop(self, key: TileKey) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.used -= item[0].nbytes
