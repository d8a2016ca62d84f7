"""Tissue detection: the mask scipy's morphology gave, from OpenCV's."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from model.readers import open_slide, thumbnail
from model.tissue import MIN_OBJECT_FRACTION, SATURATION_MIN, VALUE_MAX, tissue_from_rgb
from tests.helpers.samples import sample


def _reference(rgb: np.ndarray) -> np.ndarray:
    """The thresholds, then scipy: closing by a 3x3 square twice, holes filled, small objects dropped."""
    rgbf = rgb.astype(np.float32) / 255.0
    vmax, vmin = rgbf.max(-1), rgbf.min(-1)
    saturation = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0)
    mask = (saturation > SATURATION_MIN) & (vmax < VALUE_MAX)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2))
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return np.concatenate([[False], sizes >= max(4, MIN_OBJECT_FRACTION * mask.size)])[labels]


def _blobs(seed: int) -> np.ndarray:
    """Glass with stained discs and rings (holes), specks, and tissue cut by the image's edge."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(40, 600, 2))
    image = np.full((h, w, 3), 245, np.uint8)
    for _ in range(int(rng.integers(1, 40))):
        centre = (int(rng.integers(-20, w + 20)), int(rng.integers(-20, h + 20)))
        colour = tuple(int(c) for c in rng.integers(60, 220, 3))
        cv2.circle(image, centre, int(rng.integers(1, 70)), colour, int(rng.choice([-1, 2, 5])))
    specks = rng.random((h, w)) < 0.03
    image[specks] = rng.integers(0, 256, (int(specks.sum()), 3), dtype=np.uint8)
    return image


@pytest.mark.parametrize("seed", range(12))
def test_generated_thumbnails_give_the_reference_mask(seed: int) -> None:
    image = _blobs(seed)
    expected = _reference(image)
    assert expected.any() and not expected.all(), "a case with tissue and glass"
    assert np.array_equal(tissue_from_rgb(image), expected)


def test_a_real_slides_thumbnail_gives_the_reference_mask() -> None:
    reader = open_slide(sample("cmu_small_region.svs"))
    try:
        rgb = thumbnail(reader, 2048)[0]
    finally:
        reader.close()
    expected = _reference(rgb)
    assert 0 < expected.sum() < expected.size
    assert np.array_equal(tissue_from_rgb(rgb), expected)
