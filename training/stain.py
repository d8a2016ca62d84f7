"""Reinhard stain normalisation (LAB mean and std matched to a reference), to measure whether it helps.

``python -m training.stain --config training/configs/v2.yaml --out runs/v2/stain_reference.json``
writes the reference: the LAB mean and std of the tissue pixels of a run's training images.
``training.evaluate --stain runs/v2/stain_reference.json`` normalises every image to it first.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.color import lab2rgb, rgb2lab

WHITE_L = 90.0
"""LAB lightness above which a pixel is glass or fat, not tissue (excluded from the statistics)."""


def lab_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the LAB channels over the tissue pixels of an RGB uint8 image."""
    lab = rgb2lab(image).reshape(-1, 3)
    tissue = lab[lab[:, 0] < WHITE_L]
    if len(tissue) < 100:
        tissue = lab
    return tissue.mean(axis=0), np.maximum(tissue.std(axis=0), 1e-3)


def reference(images: Sequence[np.ndarray]) -> dict[str, list[float]]:
    """The mean of the images' LAB means and stds."""
    stats = [lab_stats(im) for im in images]
    return {"mean": np.mean([m for m, _ in stats], axis=0).tolist(),
            "std": np.mean([s for _, s in stats], axis=0).tolist()}


def normalise(image: np.ndarray, ref: dict[str, list[float]]) -> np.ndarray:
    """The image with its tissue LAB statistics matched to ``ref`` (uint8 RGB)."""
    mean, std = lab_stats(image)
    lab = rgb2lab(image)
    lab = (lab - mean) / std * np.asarray(ref["std"]) + np.asarray(ref["mean"])
    rgb = lab2rgb(lab)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    """Write the reference of a training config's training images."""
    from training.config import load_config
    from training.train import load_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    train, _, _ = load_data(load_config(args.config))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(reference([s.image for s in train]), indent=1))
    print(f"{args.out}: reference of {len(train)} training images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
