"""Stain normalisation to a reference of the training images, to measure whether it helps.

Two methods: Reinhard (the LAB mean and std of the tissue pixels matched to the training images')
and Macenko (the image's haematoxylin and eosin vectors and concentration range, found in optical
density, mapped onto the training images'; torchstain's implementation).
``python -m training.stain --config training/configs/v4.yaml --method macenko --out runs/v4/macenko.json``
writes the reference from a run's training images; ``training.evaluate --stain runs/v4/macenko.json``
normalises every image to it first.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torchstain
from skimage.color import lab2rgb, rgb2lab

METHODS = ("reinhard", "macenko")
MACENKO_SAMPLE = 100_000  # pixels drawn from each training image for the Macenko reference
MACENKO_IO, MACENKO_BETA = 240, 0.15  # glass intensity; optical density below which a pixel is unstained
MACENKO_MIN_STAINED = 100  # fewer stained pixels than this: no stain vectors to find
log = logging.getLogger(__name__)

WHITE_L = 90.0
"""LAB lightness above which a pixel is glass or fat, not tissue (excluded from the statistics)."""


def lab_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the LAB channels over the tissue pixels of an RGB uint8 image."""
    lab = rgb2lab(image).reshape(-1, 3)
    tissue = lab[lab[:, 0] < WHITE_L]
    if len(tissue) < 100:
        tissue = lab
    return tissue.mean(axis=0), np.maximum(tissue.std(axis=0), 1e-3)


def reference(images: Sequence[np.ndarray], method: str = "reinhard", seed: int = 0) -> dict[str, Any]:
    """The training images' reference for ``method``: for Reinhard the mean of their LAB means and
    stds; for Macenko the stain vectors and 99th-percentile concentrations of a pixel sample of all."""
    if method == "macenko":
        rng = np.random.default_rng(seed)
        pixels = np.concatenate([_sample(im.reshape(-1, 3), rng) for im in images])
        fitted = _macenko()
        fitted.fit(pixels[:, None, :], Io=MACENKO_IO, beta=MACENKO_BETA)
        return {"method": method, "he": fitted.HERef.tolist(), "max_c": fitted.maxCRef.tolist()}
    if method != "reinhard":
        raise ValueError(f"stain method must be one of {METHODS}, got {method!r}")
    stats = [lab_stats(im) for im in images]
    return {"method": method, "mean": np.mean([m for m, _ in stats], axis=0).tolist(),
            "std": np.mean([s for _, s in stats], axis=0).tolist()}


def _sample(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return pixels if len(pixels) <= MACENKO_SAMPLE else pixels[rng.choice(len(pixels), MACENKO_SAMPLE, replace=False)]


def _macenko() -> Any:
    return torchstain.normalizers.MacenkoNormalizer(backend="numpy")


def normalise(image: np.ndarray, ref: dict[str, Any]) -> np.ndarray:
    """The image normalised to ``ref`` (uint8 RGB); a reference without ``method`` is Reinhard's.

    Macenko needs stained pixels to find the stain vectors: an image with too few (glass) is
    returned unchanged, with a warning."""
    if ref.get("method", "reinhard") == "macenko":
        od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / MACENKO_IO)
        if int((od >= MACENKO_BETA).all(axis=1).sum()) < MACENKO_MIN_STAINED:
            log.warning("Macenko normalisation skipped for a %s image: too few stained pixels", image.shape)
            return image
        normaliser = _macenko()
        normaliser.HERef, normaliser.maxCRef = np.asarray(ref["he"]), np.asarray(ref["max_c"])
        return normaliser.normalize(image, Io=MACENKO_IO, beta=MACENKO_BETA, stains=False)[0]
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
    p.add_argument("--method", choices=METHODS, default="reinhard")
    args = p.parse_args(argv)
    train, _, _ = load_data(load_config(args.config))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(reference([s.image for s in train], args.method), indent=1))
    print(f"{args.out}: {args.method} reference of {len(train)} training images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
