"""How often the engine runs a tile twice, by slide width and tile-cache budget.

The engine's own block plan, tile grid and tile cache (``model.blockplan``, ``model.tilecache``) over
a slide of the given widths, with logits that take no memory (torch's ``meta`` device): each block
runs the tiles its plan adds (those touching the part of its region, with the nuclei margin, that it
does not take from its neighbours' maps) unless the cache holds them, offers them to the cache, and
retires what no later block needs, as ``Engine`` does (a test checks the counts against an
engine run). A tile shared with the next block row must stay cached for a whole row of blocks, so
the budget a slide needs grows with its width.
Prints, per width, budget and logits dtype, the tiles run per grid tile (1.000: every shared tile ran
once) and the most the cache held.

Usage: ``python -m benchmarks.tilecache [--widths ...] [--budgets-mb ...]``
"""

from __future__ import annotations

import argparse

import torch

from model.blockplan import BlockJob
from model.engine import complete_plan
from model.options import DEVICE_CACHE_MB, EngineOptions
from model.postprocess import engine_margin
from model.tilecache import TileCache
from model.tiling import Box, TileGrid, plan_blocks

CHANNELS = 8  # semantic and ternary logits
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def simulate(width: int, height: int, budget_bytes: int, dtype: torch.dtype,
             options: EngineOptions = EngineOptions(), margin: int | None = None) -> tuple[int, int, int]:
    """Tiles run, grid tiles and the cache's peak bytes over a ``width`` x ``height`` slide with every
    tile on tissue (``margin``: the engine's for the nuclei at 0.25 µm/px unless given)."""
    grid = TileGrid(options.tile_size, options.overlap, width, height)
    margin = engine_margin(0.25) if margin is None else margin
    bounds = Box(0, 0, width, height)
    jobs = [BlockJob(i, inner, region, grid.tiles_touching(region))
            for i, inner in enumerate(plan_blocks(width, height, options.block_size))
            if (region := inner.expand(margin, bounds))]
    per_row = -(-width // options.block_size)
    _, uses = complete_plan(jobs, grid, per_row, width, margin, share=True)
    cache = TileCache(budget_bytes)
    logits = torch.empty((CHANNELS, options.tile_size, options.tile_size), device="meta")
    run, peak = 0, 0
    for job in jobs:
        for tile in job.tiles:
            if cache.get(tile) is None:
                run += 1
                cache.offer(tile, logits, uses.of(tile), job.index, dtype)
                peak = max(peak, cache.used)
        cache.retire(job.index)
    return run, grid.n_x * grid.n_y, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[20480, 50000, 100000, 150000])
    parser.add_argument("--height", type=int, default=8192, help="slide height, px (four block rows)")
    parser.add_argument("--budgets-mb", type=int, nargs="+",
                        default=sorted({512, 1024, *DEVICE_CACHE_MB.values()}))
    args = parser.parse_args(argv)
    print(f"tiles run per grid tile (peak cache MB); {args.height} px high, 256/64 tiles, 2048 px blocks")
    print("width".rjust(8) + "".join(f"{f'{mb} MB {name}':>20}" for mb in args.budgets_mb for name in DTYPES))
    for width in args.widths:
        cells = []
        for mb in args.budgets_mb:
            for dtype in DTYPES.values():
                run, tiles, peak = simulate(width, args.height, mb << 20, dtype)
                cells.append(f"{f'{run / tiles:.3f} ({peak >> 20})':>20}")
        print(f"{width:>8}" + "".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
