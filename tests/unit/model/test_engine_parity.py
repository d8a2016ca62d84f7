"""Parity with the original algorithm, and the bf16 quality guard, on a real H&E region."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.reference import band_start, original_loop
from core.settings import DEFAULT_MODEL
from model.analysis import make_view
from model.card import ModelCard
from model.checkpoint import LoadedModel, load_model
from model.engine import Engine, EngineOptions
from model.network import build_network
from model.readers import open_slide
from model.tiling import Box
from tests.helpers.samples import sample


@pytest.fixture(scope="module")
def he_region() -> np.ndarray:
    """A 448x544 region of the real Aperio sample (20x), resampled to the model's 0.25 µm/px."""
    reader = open_slide(sample("cmu_small_region.svs"))
    try:
        return make_view(reader, 0.25).read(Box(1800, 2400, 1800 + 544, 2400 + 448))
    finally:
        reader.close()


@pytest.fixture(scope="module")
def seeded_model() -> LoadedModel:
    torch.manual_seed(1234)
    network = build_network("resnet18").eval()
    card = ModelCard(name="seeded", encoder="resnet18")
    return LoadedModel(network, card, path=__import__("pathlib").Path("seeded"), sha256="0" * 64, format="test")


def _argmax_agreement(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    return tuple(float((x.argmax(0) == y.argmax(0)).mean()) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def test_engine_matches_the_original_loop_outside_its_last_stride_band(he_region: np.ndarray,
                                                                        seeded_model: LoadedModel) -> None:
    """Our global grid and the original's tile placement agree exactly except where the original adds a
    tile flush with its padded edge (the last stride band at the bottom and right)."""
    engine = Engine(seeded_model, EngineOptions(precision="fp32", device="cpu", tissue=False, block_size=300))
    ours = engine.predict_array(he_region)
    reference = original_loop(seeded_model.network, he_region)
    h, w = he_region.shape[:2]
    y0, x0 = band_start(h, 256, 192), band_start(w, 256, 192)
    assert (y0, x0) == (320, 320)  # 448x544 does trigger the original's flush tile on both axes
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a[:, :y0, :x0], b[:, :y0, :x0], atol=1e-4, rtol=1e-4)
        assert (a[:, :y0, :x0].argmax(0) == b[:, :y0, :x0].argmax(0)).all()
    band = np.abs(ours[0] - reference[0])
    assert band[:, y0:, :].max() > 1e-2 and band[:, :, x0:].max() > 1e-2  # the band really differs


def test_bf16_agrees_with_fp32(he_region: np.ndarray) -> None:
    """The quality cost of bf16, measured with the shipped (trained) model.

    A random-init network is no guide here: its logits are nearly tied, so any rounding flips them.
    """
    shipped = load_model(DEFAULT_MODEL)
    fp32 = Engine(shipped, EngineOptions(precision="fp32", device="cpu", tissue=False)).predict_array(he_region)
    bf16 = Engine(shipped, EngineOptions(precision="bf16", device="cpu", tissue=False)).predict_array(he_region)
    sem_agree, ter_agree = _argmax_agreement(fp32, bf16)
    assert sem_agree >= 0.995 and ter_agree >= 0.995, (sem_agree, ter_agree)
