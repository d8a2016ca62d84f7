"""Generated H&E-like images with known nuclei, for tests and smoke runs (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_tile(size: int, n_nuclei: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray]:
    """(image uint8 HxWx3, instances uint16, classes uint8 in CoNSeP values 1..4) of one tile.

    Pink stroma with noise; nuclei are dark purple discs, epithelial (3) large, inflammatory (2)
    small and darker.
    """
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = (235, 170, 200)
    image += rng.normal(0, 8, image.shape)
    instances = np.zeros((size, size), dtype=np.uint16)
    classes = np.zeros((size, size), dtype=np.uint8)
    for k in range(1, n_nuclei + 1):
        cls = int(rng.choice([2, 3]))
        r = rng.uniform(4, 6) if cls == 2 else rng.uniform(7, 11)
        cy, cx = rng.uniform(0, size, 2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (instances == 0)
        instances[disc] = k
        classes[disc] = cls
        image[disc] = (60, 30, 120) if cls == 2 else (110, 70, 160)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), instances, classes


def write_instance_folder(root: Path, n_images: int, size: int = 128, n_nuclei: int = 25,
                          seed: int = 0) -> Path:
    """Write ``images/ instances/ classes/`` (CoNSeP layout) with names ``img<i>_<j>``."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "instances", "classes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        image, instances, classes = synthetic_tile(size, n_nuclei, rng)
        stem = f"img{i // 2}_{i % 2:03d}"
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(instances).save(root / "instances" / f"{stem}.png")
        Image.fromarray(classes).save(root / "classes" / f"{stem}.png")
    return root


def write_class_mask_folder(root: Path, patients: int, images_each: int = 2, size: int = 96,
                            n_nuclei: int = 12, seed: int = 0) -> Path:
    """Write ``images/ masks/`` (MoNuSAC class-mask layout, values 0..4) named ``TCGA-XX-P00<p>-..._<j>``.

    Nuclei get the four cell types in turn; every second image also holds an unlabelled dark nucleus
    (as MoNuSAC leaves fibroblasts unlabelled) in its top-left corner.
    """
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for p in range(patients):
        for j in range(images_each):
            image, instances, _ = synthetic_tile(size, n_nuclei, rng)
            mask = np.zeros(instances.shape, dtype=np.uint8)
            for k in range(1, int(instances.max()) + 1):
                mask[instances == k] = 1 + (k - 1) % 4
            if j % 2:
                yy, xx = np.mgrid[:size, :size]
                disc = (yy - 6) ** 2 + (xx - 6) ** 2 <= 16
                image[disc] = (60, 30, 120)
                mask[disc] = 0
            stem = f"TCGA-XX-P{p:03d}-01Z-00-DX1_{j + 1}"
            Image.fromarray(image).save(root / "images" / f"{stem}.png")
            Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root
