"""The shipped default model: loads, matches its recorded sha256, and finds nuclei on real H&E.

The real image is the public CMU sample (``python scripts/fetch_samples.py``), never ../shared.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[3]
WEIGHTS = ROOT / "model" / "weights" / "nucseg-default.safetensors"
SAMPLE = ROOT / ".cache" / "samples" / "cmu_small_region.svs"
# An epidermis region of the CMU sample (level 0, 20x): dense nuclei.
REGION = (950, 1800, 384, 384)


def recorded_sha256() -> str:
    sidecar = WEIGHTS.with_name(WEIGHTS.name + ".sha256").read_text().split()[0]
    card = (ROOT / "model" / "weights" / "MODEL_CARD.md").read_text()
    assert sidecar in card, "MODEL_CARD.md does not state the file's sha256"
    return sidecar


def test_shipped_file_loads_and_matches_card() -> None:
    loaded = load_model(WEIGHTS, expected_sha256=recorded_sha256())
    assert WEIGHTS.stat().st_size < 30 * 2**20
    card = loaded.card
    assert card.mpp == 0.25 and "NC" in card.licence and card.encoder
    assert set(card.model_dump()) >= {"training", "test_metrics"}
    held = card.recipe_validation  # what stats.json repeats beside every result
    assert held is not None and set(held.classes) == set(card.semantic_classes[1:])
    assert all(c.gt_cells > 0 and c.iou is not None for c in held.classes.values())


def sample_path() -> Path:
    if not SAMPLE.is_file():
        script = ROOT / "scripts" / "fetch_samples.py"
        done = subprocess.run([sys.executable, str(script)], capture_output=True)
        if done.returncode != 0 or not SAMPLE.is_file():
            pytest.skip(f"cannot fetch {SAMPLE.name}: {done.stderr.decode()[-300:]}")
    return SAMPLE


@pytest.mark.slow
def test_finds_nuclei_on_real_he() -> None:
    from model.engine import Engine, EngineOptions
    from model.readers import open_slide

    reader = open_slide(sample_path())
    try:
        image = reader.read_region(0, *REGION)
        mpp = reader.mpp
    finally:
        reader.close()
    loaded = load_model(WEIGHTS)
    engine = Engine(loaded, EngineOptions(tile_size=256, overlap=64, batch_size=8, precision="fp32",
                                          device="cpu", tissue=False))
    sem, ter = engine.predict_array(image, mpp=mpp)
    nucleus = ter.argmax(0) > 0
    assert nucleus.shape[0] > REGION[3]  # resampled from 20x to the model's 0.25 µm/px
    assert 0.05 < nucleus.mean() < 0.7, f"nucleus fraction {nucleus.mean():.3f}"
    assert re.fullmatch(r"[0-9a-f]{64}", recorded_sha256())
    assert np.isfinite(sem).all()
