"""Split samples by group (source image or patient), reproducibly, and record the split."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.data.sample import Sample


def split_by_group(samples: Sequence[Sample], val_fraction: float,
                   seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val): a seeded ``val_fraction`` of the groups (at least one when > 0) goes to val."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = sorted({s.group for s in samples})
    n_val = 0 if val_fraction == 0 else min(len(groups) - 1, max(1, math.ceil(val_fraction * len(groups))))
    order = np.random.default_rng(seed).permutation(len(groups))
    val_groups = {groups[i] for i in order[:n_val]}
    train = [s for s in samples if s.group not in val_groups]
    val = [s for s in samples if s.group in val_groups]
    return train, val


def split_record(train: Sequence[Sample], val: Sequence[Sample]) -> dict[str, dict[str, list[str]]]:
    """``{dataset: {train_groups, val_groups, train, val}}`` with sorted names."""
    record: dict[str, dict[str, list[str]]] = {}
    for part, items in (("train", train), ("val", val)):
        for s in items:
            empty: dict[str, list[str]] = {"train_groups": [], "val_groups": [], "train": [], "val": []}
            entry = record.setdefault(s.dataset, empty)
            entry[part].append(s.name)
            if s.group not in entry[f"{part}_groups"]:
                entry[f"{part}_groups"].append(s.group)
    for entry in record.values():
        for key in entry:
            entry[key].sort()
    return record


def check_no_leak(train: Sequence[Sample], val: Sequence[Sample]) -> None:
    """Raise when a group appears on both sides."""
    shared = {s.group for s in train} & {s.group for s in val}
    if shared:
        raise ValueError(f"split leaks groups into both train and val: {sorted(shared)[:5]}")


def write_split(path: Path, record: dict[str, dict[str, list[str]]]) -> None:
    """Write the split record as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True))
