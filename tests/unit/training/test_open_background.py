"""Sources that label nuclei only can train their non-nuclear pixels as "background or macrophage"."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tests.helpers.training_sources import two_source_config
from training.data.patches import PatchConfig, PatchDataset, class_shares
from training.data.sample import BACKGROUND_OR_MACROPHAGE
from training.losses import semantic_loss
from training.train import load_data


def test_only_the_training_background_of_the_named_source_opens(tmp_path: Path) -> None:
    plain_train, _, plain_val = load_data(two_source_config(tmp_path / "a", open_background=False))
    train, _, val = load_data(two_source_config(tmp_path / "b", open_background=True))
    for before, after in zip(plain_train, train, strict=True):
        opened = after.semantic == BACKGROUND_OR_MACROPHAGE
        if before.dataset != "consep":
            assert not opened.any() and np.array_equal(before.semantic, after.semantic)
            continue
        expected = (before.semantic == 0) & (before.ternary == 0)
        assert expected.any() and np.array_equal(opened, expected)
        # nuclei keep their labels, those of nuclei labelled background too
        assert np.array_equal(after.semantic[~opened], before.semantic[~opened])
        assert ((before.semantic == 0) & (before.ternary > 0)).any()
    assert all(not (s.semantic == BACKGROUND_OR_MACROPHAGE).any() for s in val)
    assert [s.name for s in val] == [s.name for s in plain_val]


def test_open_background_is_minus_log_of_background_plus_macrophage() -> None:
    logits = torch.randn(1, 5, 1, 3)
    target = torch.full((1, 1, 3), BACKGROUND_OR_MACROPHAGE)
    p = F.softmax(logits, 1)[0]
    expected = -torch.log(p[0] + p[4]).mean()
    assert math.isclose(float(semantic_loss(logits, target, None)), float(expected), rel_tol=1e-5)
    # all mass on macrophage costs nothing there; all on epithelial costs a lot
    sure_mac = torch.full((1, 5, 1, 3), -20.0)
    sure_mac[:, 4] = 20.0
    sure_epi = sure_mac.roll(-3, dims=1)
    assert float(semantic_loss(sure_mac, target, None)) < 1e-6 < 10 < float(semantic_loss(sure_epi, target, None))


def test_opened_pixels_are_not_counted_as_nuclei_by_the_sampler(tmp_path: Path) -> None:
    train, weights, _ = load_data(two_source_config(tmp_path, open_background=True))
    shares = class_shares(PatchDataset(train, PatchConfig(size=32, per_epoch=4), seed=0, weights=weights), n=60)
    assert str(BACKGROUND_OR_MACROPHAGE) in shares["labelled_share"]
    assert str(BACKGROUND_OR_MACROPHAGE) not in shares["nuclear_share"]
    assert math.isclose(sum(shares["nuclear_share"].values()), 1.0)
