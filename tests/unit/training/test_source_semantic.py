"""A source can train the ternary head only (``SourceConfig.semantic``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.config import TrainConfig
from training.data.sample import IGNORE
from training.synthetic import write_class_mask_folder, write_instance_folder
from training.train import load_data

CLASS_MAP = {0: 0, 1: 0, 2: 0, 3: 1, 4: 0}


def _config(tmp_path: Path, semantic: bool) -> TrainConfig:
    consep = write_instance_folder(tmp_path / "consep", n_images=6, size=64, n_nuclei=8, seed=3)
    monusac = write_class_mask_folder(tmp_path / "monusac", patients=2)
    return TrainConfig.model_validate({"name": "t", "out_dir": str(tmp_path / "run"), "data": {
        "val_fraction": 0.34,
        "sources": [{"kind": "instance_folder", "name": "consep", "root": str(consep), "class_map": CLASS_MAP,
                     "semantic": semantic},
                    {"kind": "monusac", "root": str(monusac)}]}})


def test_only_the_training_semantic_labels_of_the_named_source_go(tmp_path: Path) -> None:
    plain_train, plain_weights, plain_val = load_data(_config(tmp_path / "a", True))
    train, weights, val = load_data(_config(tmp_path / "b", False))
    assert weights == plain_weights
    for before, after in zip(plain_train, train, strict=True):
        assert np.array_equal(before.ternary, after.ternary) and np.array_equal(before.image, after.image)
        if before.dataset == "consep":
            assert (before.semantic != IGNORE).any() and (after.semantic == IGNORE).all()
        else:
            assert np.array_equal(before.semantic, after.semantic)
    for before, after in zip(plain_val, val, strict=True):
        assert np.array_equal(before.semantic, after.semantic)
    assert any(s.dataset == "consep" and (s.semantic != IGNORE).any() for s in val)
