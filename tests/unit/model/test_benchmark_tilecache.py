"""The tile-cache benchmark counts what the engine runs: the same tiles as an engine run, every tile
once given room, more without."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.tilecache import simulate
from model.engine import CollectSink, Engine, EngineOptions
from model.readers import ArrayReader
from tests.helpers.stubs import TrivialNet, loaded


@pytest.mark.parametrize(("budget_mb", "precision"), [(0, "fp32"), (1, "fp32"), (1, "bf16"), (512, "fp32")])
def test_simulated_runs_equal_the_engines(budget_mb: int, precision: str) -> None:
    options = EngineOptions(tile_size=64, overlap=24, block_size=70, margin=9, precision=precision, device="cpu",
                            tissue=False, tile_cache_mb=budget_mb)
    image = np.random.default_rng(4).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    report = Engine(loaded(TrivialNet(lambda x: x * 3 - 1)), options).run(ArrayReader(image, mpp=0.25),
                                                                       [CollectSink(logits=False)])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    run, tiles, _ = simulate(410, 300, budget_mb << 20, dtype, options, margin=9)
    assert (run, tiles) == (report.tiles_run, report.grid_tiles)


def test_simulated_runs_follow_the_budget() -> None:
    run, tiles, held = simulate(6000, 4500, 512 << 20, torch.float32)
    assert run == tiles and 0 < held <= 512 << 20
    assert simulate(6000, 4500, 0, torch.float32)[0] > 1.2 * tiles  # no cache: every shared tile again
    tight, _, held = simulate(6000, 4500, 20 << 20, torch.float32)  # ten float32 tiles
    assert tight > tiles and held <= 20 << 20
    assert simulate(6000, 4500, 20 << 20, torch.bfloat16)[0] < tight  # twenty bf16 tiles
