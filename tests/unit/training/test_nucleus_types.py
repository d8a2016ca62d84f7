"""The semantic head's types for nuclei whose class the data does not give (MoNuSeg)."""

from __future__ import annotations

import math

import numpy as np

from training.data.sample import IGNORE, Sample
from training.nucleus_types import NucleusTypes, unknown_class_nuclei


def _sample() -> Sample:
    """Three unknown-class nuclei (ids 1-3; 3 a merged clump), one epithelial nucleus (id 4)."""
    instances = np.zeros((20, 40), dtype=np.int32)
    instances[2:8, 2:8], instances[2:8, 12:18], instances[2:8, 22:28], instances[12:18, 2:8] = 1, 2, 3, 4
    semantic = np.where(instances > 0, IGNORE, 0).astype(np.int64)
    semantic[instances == 4] = 1
    ternary = (instances > 0).astype(np.int64)
    ternary[instances == 3] = IGNORE
    return Sample("s", "s", "monuseg", np.zeros((20, 40, 3), np.uint8), semantic, ternary, instances)


def test_each_nucleus_takes_its_highest_mean_probability() -> None:
    s = _sample()
    logits = np.zeros((5, 20, 40), dtype=np.float32)
    logits[0] = 1.0  # background leads everywhere...
    logits[1, 2:8, 12:16] = 5.0  # ...except on two thirds of nucleus 2, where epithelial does
    logits[1, 2:8, 16:18] = -5.0
    types = NucleusTypes()
    types.update(s, logits)
    result = types.result()
    assert result["nuclei"] == 2  # the clump and the labelled epithelial nucleus are not counted
    assert result["counts"]["background"] == 1 and result["counts"]["epithelial"] == 1
    assert math.isclose(result["other_share"], 0.5)


def test_clumps_and_known_classes_are_not_regions() -> None:
    ids = np.unique(unknown_class_nuclei(_sample()))
    assert ids.tolist() == [0, 1, 2]


def test_binary_masks_without_instances_use_components() -> None:
    s = _sample()
    s = Sample(s.name, s.group, s.dataset, s.image, s.semantic, s.ternary, None)
    regions = unknown_class_nuclei(s)
    assert len(np.unique(regions)) == 3  # background and two nuclei: the clump is left out
