"""The tile-cache benchmark counts what the engine runs: every tile once given room, more without."""

from __future__ import annotations

import torch

from benchmarks.tilecache import simulate


def test_simulated_runs_match_the_cache_budget() -> None:
    once, held = simulate(6000, 4500, 512, torch.float32)
    assert once == 1.0 and 0 < held <= 512 << 20
    assert simulate(6000, 4500, 0, torch.float32)[0] > 1.2  # no cache: every shared tile again
    tight, held = simulate(6000, 4500, 20, torch.float32)  # ten float32 tiles
    assert tight > 1.0 and held <= 20 << 20
    assert simulate(6000, 4500, 20, torch.bfloat16)[0] < tight  # twenty bf16 tiles
