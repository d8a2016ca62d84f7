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
