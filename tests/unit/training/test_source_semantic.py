"""A source can train the ternary head only (``SourceConfig.semantic``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.training_sources import two_source_config
from training.data.sample import IGNORE
from training.train import load_data


def test_only_the_training_semantic_labels_of_the_named_source_go(tmp_path: Path) -> None:
    plain_train, plain_weights, plain_val = load_data(two_source_config(tmp_path / "a", semantic=True))
    train, weights, val = load_data(two_source_config(tmp_path / "b", semantic=False))
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
