"""Copy-paste of rare cells: what is pasted, where its labels go, and what stays as drawn."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.augment import AugmentConfig
from training.data.paste import MIN_CELL_PIXELS, CellBank, PasteConfig
from training.data.patches import PatchConfig, PatchDataset
from training.data.sample import Sample

NEUTROPHIL, MACROPHAGE = 3, 4


def _sample() -> Sample:
    """A 128² sample: a 10x12 macrophage (blue), a 6x6 neutrophil (yellow), a sliver and a too-big cell."""
    image = np.full((128, 128, 3), 200, np.uint8)
    semantic = np.zeros((128, 128), np.int64)
    ternary = np.zeros((128, 128), np.int64)
    for (y, x, h, w), cls, colour in (((10, 10, 10, 12), MACROPHAGE, (0, 0, 255)),
                                      ((40, 40, 6, 6), NEUTROPHIL, (255, 255, 0)),
                                      ((80, 5, 1, MIN_CELL_PIXELS - 1), MACROPHAGE, (0, 0, 255)),
                                      ((60, 60, 60, 40), NEUTROPHIL, (0, 255, 0))):
        semantic[y:y + h, x:x + w] = cls
        ternary[y:y + h, x:x + w] = 1
        image[y:y + h, x:x + w] = colour
    return Sample("s", "p", "monusac", image, semantic, ternary)


def test_bank_keeps_whole_cells_that_fit() -> None:
    bank = CellBank([_sample()], PasteConfig(p=1.0), size=48)
    assert {c: [cell.mask.shape for cell in cells] for c, cells in bank.cells.items()} == {
        NEUTROPHIL: [(6, 6)], MACROPHAGE: [(10, 12)]}  # the sliver and the 60x40 cell are left out


def test_pasted_cells_bring_their_pixels_and_labels() -> None:
    bank = CellBank([_sample()], PasteConfig(p=1.0, max_cells=3, classes=(MACROPHAGE,)), size=48)
    image = np.full((48, 48, 3), 100, np.uint8)
    sem, ter = np.zeros((48, 48), np.int64), np.full((48, 48), 2, np.int64)
    out_image, out_sem, out_ter = bank.paste(image, sem, ter, np.random.default_rng(3))
    pasted = out_sem == MACROPHAGE
    assert 120 <= pasted.sum() <= 3 * 120
    assert (out_image[pasted] == (0, 0, 255)).all() and (out_ter[pasted] == 1).all()
    assert (out_image[~pasted] == 100).all() and (out_ter[~pasted] == 2).all()
    assert (image == 100).all() and (sem == 0).all()  # the inputs are not written to


def test_paste_probability_zero_and_no_cells_leave_the_patch() -> None:
    patch = (np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.int64), np.zeros((32, 32), np.int64))
    rng = np.random.default_rng(0)
    assert CellBank([_sample()], PasteConfig(p=0.0), 32).paste(*patch, rng) == patch
    empty = Sample("e", "e", "d", patch[0], patch[1], patch[2])
    assert CellBank([empty], PasteConfig(p=1.0), 32).paste(*patch, rng) == patch


@pytest.mark.parametrize("index", range(6))
def test_pasting_changes_only_the_pasted_cells(index: int) -> None:
    """The patch and its augmentation are those drawn without pasting: pasting has its own generator
    (contrast off: it scales about the patch's mean, which the pasted cells move)."""
    cfg = dict(size=32, per_epoch=6, foreground_bias=0.0, scale_jitter=0.0,
               augment=AugmentConfig(contrast=0.0, hed_sigma=0.1))
    plain = PatchDataset([_sample()], PatchConfig(**cfg), seed=5)  # type: ignore[arg-type]
    paste = PatchDataset([_sample()], PatchConfig(**cfg, paste=PasteConfig(p=1.0)), seed=5)  # type: ignore[arg-type]
    (x0, s0, t0), (x1, s1, t1) = plain[index], paste[index]
    changed = (s0 != s1).numpy() | (x0 != x1).any(0).numpy()
    assert changed.any()
    assert np.isin(s1.numpy()[changed], (NEUTROPHIL, MACROPHAGE)).all()
    assert (x0[:, ~changed] == x1[:, ~changed]).all() and (t0[~changed] == t1[~changed]).all()


def test_scaled_cells_keep_their_labels_and_colour() -> None:
    bank = CellBank([_sample()], PasteConfig(p=1.0, max_cells=1, classes=(MACROPHAGE,), scale_jitter=0.4), size=48)
    areas = set()
    for seed in range(40):
        image = np.full((48, 48, 3), 100, np.uint8)
        sem, ter = np.zeros((48, 48), np.int64), np.zeros((48, 48), np.int64)
        out_image, out_sem, out_ter = bank.paste(image, sem, ter, np.random.default_rng(seed))
        pasted = out_sem == MACROPHAGE
        assert set(np.unique(out_sem)) <= {0, MACROPHAGE} and (out_ter[pasted] == 1).all()
        assert (out_image[pasted] == (0, 0, 255)).all()
        areas.add(int(pasted.sum()))
    assert min(areas) >= 0.6**2 * 120 - 12 and max(areas) <= 1.4**2 * 120 + 30 and len(areas) > 5


def test_matched_stain_moves_the_cell_by_the_images_difference() -> None:
    from training.data.paste import tissue_lab_mean

    source = _sample()
    dark = Sample("d", "q", "monusac", np.full((128, 128, 3), (150, 90, 140), np.uint8),
                  np.zeros((128, 128), np.int64), np.zeros((128, 128), np.int64))
    bank = CellBank([source, dark], PasteConfig(p=1.0, max_cells=1, classes=(NEUTROPHIL,), match_stain=True), size=48)
    shift = tissue_lab_mean(dark.image) - tissue_lab_mean(source.image)
    assert np.abs(shift).max() > 10
    patch = (np.full((48, 48, 3), (150, 90, 140), np.uint8), np.zeros((48, 48), np.int64), np.zeros((48, 48), np.int64))
    as_cut = bank.paste(*patch, np.random.default_rng(1), into=0)
    moved = bank.paste(*patch, np.random.default_rng(1), into=1)
    cell = as_cut[1] == NEUTROPHIL
    assert (moved[1] == as_cut[1]).all() and (as_cut[0][cell] == (255, 255, 0)).all()  # same place; as cut
    lab = tissue_lab_mean(moved[0][cell][None]) - tissue_lab_mean(as_cut[0][cell][None])
    np.testing.assert_allclose(lab, shift, atol=3)
