"""Stain normalisation at inference (``model.stain``): colour maths, fitting, and the engine applying it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb, rgb2lab

from model.card import ModelCard, StainReference
from model.checkpoint import LoadedModel
from model.engine import Engine
from model.errors import OptionsError
from model.network import build_network
from model.options import EngineOptions
from model.stain import fit_stain, lab_stats, lab_to_rgb, macenko_fit, rgb_to_lab
from tests.helpers.service_stack import TEST_STAIN_REFERENCE

REFERENCE = StainReference.model_validate(TEST_STAIN_REFERENCE)


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=0)


def _stained(he: np.ndarray, conc: np.ndarray) -> np.ndarray:
    """An RGB image from stain vectors ``he`` (3, 2) and concentrations ``conc`` (2, h, w) (Beer-Lambert)."""
    od = np.einsum("cs,shw->hwc", he, conc)
    return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)


def _conc(seed: int, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.gamma(2.0, 0.35, (side, side)), rng.gamma(2.0, 0.25, (side, side))])


HE_A = _unit(np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]))
HE_B = _unit(np.array([[0.45, 0.20], [0.80, 0.75], [0.40, 0.63]]))


@pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB")  # scikit-image says it clips
def test_lab_conversions_match_scikit_image() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (4096, 3), dtype=np.uint8)
    rgb[:8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 1, 1], [10, 11, 12], [254, 3, 9]]
    lab = rgb_to_lab(torch.from_numpy(rgb)).numpy().astype(np.float64)
    np.testing.assert_allclose(lab, rgb2lab(rgb[None])[0], atol=2e-4)
    shifted = lab + np.array([5.0, -30.0, 40.0])  # out of gamut too: both clip
    np.testing.assert_allclose(lab_to_rgb(torch.from_numpy(shifted)).numpy(), lab2rgb(shifted[None])[0], atol=2e-5)


def test_reinhard_gives_the_slide_the_reference_statistics() -> None:
    rng = np.random.default_rng(5)
    blue = np.clip(rng.normal((120, 110, 200), 25, (48, 48, 3)), 0, 255).astype(np.uint8)
    transform, warning = fit_stain("reinhard", REFERENCE, blue)
    assert transform is not None and warning is None
    mean, std = lab_stats(transform(blue))
    assert np.allclose(mean, REFERENCE.reinhard.mean, atol=1.5) and np.allclose(std, REFERENCE.reinhard.std, rtol=0.1)
    assert not np.allclose(lab_stats(blue)[0], REFERENCE.reinhard.mean, atol=5)


def test_macenko_maps_a_slide_onto_the_reference_stains() -> None:
    conc = _conc(6)
    fitted = macenko_fit(_stained(HE_A, conc))
    assert (np.sum(_unit(np.asarray(fitted.he)) * HE_A, axis=0) > 0.99).all()  # both stain vectors recovered
    reference = REFERENCE.model_copy(update={"macenko": fitted})
    target, other = _stained(HE_A, conc).astype(float), _stained(HE_B, conc)
    transform, _ = fit_stain("macenko", reference, other)
    assert transform is not None
    assert np.abs(transform(other) - target).mean() < 0.4 * np.abs(other - target).mean()


def test_macenko_fitted_on_the_image_itself_is_torchstains_normalisation() -> None:
    import torchstain

    image = _stained(HE_B, _conc(7, 96))
    transform, _ = fit_stain("macenko", REFERENCE, image)
    assert transform is not None
    theirs = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    theirs.HERef, theirs.maxCRef = np.asarray(REFERENCE.macenko.he), np.asarray(REFERENCE.macenko.max_c)
    expected = theirs.normalize(image, Io=240, beta=0.15, stains=False)[0]
    diff = np.abs(transform(image).astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # float64 either way: only truncation ties differ


def test_a_transform_treats_rows_alike_wherever_a_block_is_cut() -> None:
    image = np.random.default_rng(3).integers(0, 256, (1100, 40, 3), dtype=np.uint8)
    transform, _ = fit_stain("reinhard", REFERENCE, image)
    assert transform is not None
    whole = transform(image)
    assert np.array_equal(whole[700:], transform(image[700:])) and whole.dtype == np.uint8


def test_fitting_refuses_what_it_cannot_do() -> None:
    glass = np.full((32, 32, 3), 250, np.uint8)
    assert fit_stain("none", None, glass) == (None, None)
    transform, warning = fit_stain("macenko", REFERENCE, glass)
    assert transform is None and warning is not None and "too few stained pixels" in warning
    with pytest.raises(OptionsError, match="stain_reference"):
        fit_stain("reinhard", None, glass)
    with pytest.raises(OptionsError, match="'sepia'"):
        EngineOptions(stain="sepia").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_the_engine_normalises_every_block_with_one_fit_per_image(method: str) -> None:
    torch.manual_seed(0)
    model = LoadedModel(build_network("resnet18").eval(), ModelCard(stain_reference=REFERENCE), Path("test"), "0" * 64,
                        "test")
    image = _stained(HE_B, _conc(8, 200))
    opts = {"tile_size": 64, "overlap": 16, "block_size": 96, "precision": "fp32", "device": "cpu"}
    normalised = Engine(model, EngineOptions(**opts, stain=method)).predict_array(image)  # type: ignore[arg-type]
    transform, _ = fit_stain(method, REFERENCE, image)  # the image is its own thumbnail (< 2048 px)
    assert transform is not None
    plain = Engine(model, EngineOptions(**opts))  # type: ignore[arg-type]
    for got, expected in zip(normalised, plain.predict_array(transform(image)), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(normalised[0], plain.predict_array(image)[0])
