"""Sources that label nuclei only can train their non-nuclear pixels as "background or macrophage"."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.data.patches import PatchConfig, PatchDataset, class_shares
from training.data.sample import BACKGROUND_OR_MACROPHAGE
from training.losses import semantic_loss
from training.synthetic import write_class_mask_folder, write_instance_folder
from training.train import load_data

CLASS_MAP = {0: 0, 1: 0, 2: 0, 3: 1, 4: 0}  # epithelial; the generated inflammatory nuclei as background


def _config(tmp_path: Path, open_background: bool) -> TrainConfig:
    consep = write_instance_folder(tmp_path / "consep", n_images=6, size=64, n_nuclei=8, seed=3)
    monusac = write_class_mask_folder(tmp_path / "monusac", patients=2)
    return TrainConfig.model_validate({"name": "t", "out_dir": str(tmp_path / "run"), "data": {
        "val_fraction": 0.34,
        "sources": [{"kind": "instance_folder", "name": "consep", "root": str(consep), "class_map": CLASS_MAP,
                     "open_background": open_background},
                    {"kind": "monusac", "root": str(monusac)}]}})


def test_only_the_training_background_of_the_named_source_opens(tmp_path: Path) -> None:
    plain_train, _, plain_val = load_data(_config(tmp_path / "a", False))
    train, _, val = load_data(_config(tmp_path / "b", True))
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
    train, weights, _ = load_data(_config(tmp_path, True))
    shares = class_shares(PatchDataset(train, PatchConfig(size=32, per_epoch=4), seed=0, weights=weights), n=60)
    assert str(BACKGROUND_OR_MACROPHAGE) in shares["labelled_share"]
    assert str(BACKGROUND_OR_MACROPHAGE) not in shares["nuclear_share"]
    assert math.isclose(sum(shares["nuclear_share"].values()), 1.0)
