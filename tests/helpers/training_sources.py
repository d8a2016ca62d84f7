"""A two-source training config over generated data: CoNSeP-like instances and MoNuSAC-like masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.synthetic import write_class_mask_folder, write_instance_folder

CLASS_MAP = {0: 0, 1: 0, 2: 0, 3: 1, 4: 0}  # epithelial; the generated inflammatory nuclei as background


def two_source_config(tmp_path: Path, **consep_options: Any) -> TrainConfig:
    """CoNSeP-like source (with ``consep_options``) and a MoNuSAC-like one; a third of each held out."""
    consep = write_instance_folder(tmp_path / "consep", n_images=6, size=64, n_nuclei=8, seed=3)
    monusac = write_class_mask_folder(tmp_path / "monusac", patients=2)
    return TrainConfig.model_validate({"name": "t", "out_dir": str(tmp_path / "run"), "data": {
        "val_fraction": 0.34,
        "sources": [{"kind": "instance_folder", "name": "consep", "root": str(consep), "class_map": CLASS_MAP,
                     **consep_options},
                    {"kind": "monusac", "root": str(monusac)}]}})
