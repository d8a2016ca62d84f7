"""Dataset adapters, patch sampling, augmentation and the split, on generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.augment import AugmentConfig, augment, hed_jitter
from training.data.patches import PatchConfig, PatchDataset, _int16_labels, _warp
from training.data.sample import IGNORE, Sample
from training.data.sources import CONSEP_CLASS_MAP, load_instance_folder, load_monuseg
from training.data.split import check_no_leak, split_by_group, split_record
from training.synthetic import write_instance_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_instance_folder(tmp_path_factory.mktemp("d"), n_images=6, size=64, n_nuclei=8)


def test_instance_folder_contract(folder: Path) -> None:
    samples = load_instance_folder(folder, class_map=CONSEP_CLASS_MAP)
    assert len(samples) == 6 and {s.group for s in samples} == {"img0", "img1", "img2"}
    s = samples[0]
    assert s.image.dtype == np.uint8 and s.semantic.dtype == np.int64 and s.ternary.dtype == np.int64
    assert set(np.unique(s.semantic)) <= {0, 1, 2} and set(np.unique(s.ternary)) <= {0, 1, 2}
    assert ((s.ternary > 0) == (s.instances > 0)).all()
    with pytest.raises(ValueError, match=r"class values \[2, 3\]"):
        load_instance_folder(folder, class_map={0: 0, 1: 0})


def test_monuseg_binary_mask_ignores_clumps(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "binary_masks").mkdir()
    Image.fromarray(np.full((60, 60, 3), 200, np.uint8)).save(tmp_path / "images" / "a.png")
    mask = np.zeros((60, 60), np.uint8)
    for y, x in ((5, 5), (5, 30), (30, 5)):
        mask[y:y + 8, x:x + 8] = 1  # three single nuclei (64 px)
    mask[30:50, 30:50] = 1  # one clump (400 px > 2.5 x median)
    Image.fromarray(mask).save(tmp_path / "binary_masks" / "a.png")
    (s,) = load_monuseg(tmp_path)
    assert (s.semantic == -1).sum() == mask.sum() and s.instances is None
    assert (s.ternary[30:50, 30:50] == -1).all()
    assert (s.ternary[5:13, 5:13] > 0).all() and (s.ternary == 1).sum() == 3 * 16


def test_split_by_group_no_leak(folder: Path) -> None:
    samples = load_instance_folder(folder, class_map=CONSEP_CLASS_MAP)
    train, val = split_by_group(samples, 0.3, seed=1)
    check_no_leak(train, val)
    assert len(val) == 2 and len(train) == 4
    assert split_by_group(samples, 0.3, seed=1)[1] == val  # reproducible
    record = split_record(train, val)["consep"]
    assert len(record["val_groups"]) == 1 and len(record["train"]) == 4
    with pytest.raises(ValueError, match="leaks"):
        check_no_leak(train, train)


def test_patches_shapes_and_determinism(folder: Path) -> None:
    samples = load_instance_folder(folder, class_map=CONSEP_CLASS_MAP)
    ds = PatchDataset(samples, PatchConfig(size=96, per_epoch=5, scale_jitter=0.2), seed=4)
    x, sem, ter = ds[3]
    assert x.shape == (3, 96, 96) and sem.shape == (96, 96) and ter.shape == (96, 96)
    assert (ds[3][0] == x).all()
    ds.set_epoch(1)
    assert not (ds[3][0] == x).all()
    assert (ter == -1).any()  # 64 px images padded to >= 96 with ignore labels


def test_foreground_bias_finds_nuclei(folder: Path) -> None:
    samples = load_instance_folder(folder, class_map=CONSEP_CLASS_MAP)
    ds = PatchDataset(samples, PatchConfig(size=32, per_epoch=20, foreground_bias=1.0, scale_jitter=0))
    assert all((ds[i][2] > 0).any() for i in range(20))
    with pytest.raises(ValueError, match="weights"):
        PatchDataset(samples, PatchConfig(), weights=[1.0])


def test_augment_keeps_labels_aligned() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 0] = 255
    labels = np.zeros((8, 8), np.int64)
    labels[0, 0] = 2
    for _ in range(8):
        img, sem, ter = augment(image, labels, labels.copy(), rng, AugmentConfig(hed_sigma=0, hed_bias=0,
                                                                               brightness=0, contrast=0))
        assert (img[..., 0] == 255).tolist() == (sem == 2).tolist() == (ter == 2).tolist()
    tissue = np.full((4, 4, 3), (200, 120, 170), np.uint8)
    assert np.abs(hed_jitter(tissue, rng, 0, 0).astype(int) - tissue).max() <= 1


def test_sample_validates_shapes() -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    lab = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match="semantic"):
        Sample("x", "x", "d", img, lab[:2], lab)
    with pytest.raises(ValueError, match="float64"):
        Sample("x", "x", "d", img.astype(float), lab, lab)


def _numbered(h: int, w: int) -> Sample:
    values = np.arange(h * w, dtype=np.int64).reshape(h, w) % 1000
    image = np.stack([values % 256, values // 256, np.zeros_like(values)], axis=-1).astype(np.uint8)
    return Sample("n", "n", "d", image, values, values % 3)


def test_warp_is_a_crop_turned_by_the_angle() -> None:
    s = _numbered(40, 50)
    crop = s.semantic[10:26, 20:36]
    for quarter in range(4):
        image, sem, ter = _warp(s, _int16_labels(s), (18.0, 28.0), 1.0, quarter * np.pi / 2, 16)
        turned = np.rot90(crop, quarter)
        assert (sem == turned).all() and (ter == turned % 3).all()
        assert (image[..., 0] == turned % 256).all()
    _, sem, _ = _warp(s, _int16_labels(s), (2.0, 2.0), 1.0, 0.3, 16)  # past the sample's edges: ignore, never wrapped
    assert (sem == IGNORE).any() and (sem[sem != IGNORE] >= 0).all()


def test_rotated_patches_keep_labels_aligned() -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((120, 120, 3), np.uint8)
    labels = np.zeros((120, 120), np.int64)
    for y, x in rng.integers(10, 110, size=(30, 2)):
        image[y - 3:y + 4, x - 3:x + 4] = 255
        labels[y - 3:y + 4, x - 3:x + 4] = 1
    cfg = PatchConfig(size=64, per_epoch=6, scale_jitter=0.2, rotate=True,
                      augment=AugmentConfig(flips=False, hed_sigma=0, hed_bias=0, hed_strong_p=0,
                                            brightness=0, contrast=0))
    ds = PatchDataset([Sample("a", "a", "d", image, labels, labels.copy())], cfg, seed=2)
    for i in range(6):
        x, sem, ter = ds[i]
        white = x[0].numpy() > 1.5  # normalised 255
        assert sem.shape == (64, 64) and (ter == sem).all()
        assert ((sem == 1).numpy() == white).mean() > 0.97  # edges interpolate, labels do not
