"""The training images' colours, for the engine's stain normalisation option (``model.stain``).

``python -m training.stain --config training/configs/v8.yaml --out runs/stain-reference.json`` writes
the reference of a run's training images for both methods: for Reinhard the mean of the images' LAB
means and stds over tissue pixels, for Macenko the stain vectors and 99th-percentile concentrations
of a pixel sample of all of them. ``training.export --set stain_reference=...`` puts it in the card.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.card import ReinhardReference, StainReference
from model.stain import lab_stats, macenko_fit

MACENKO_SAMPLE = 100_000  # pixels drawn from each training image for the Macenko reference


def reference(images: Sequence[np.ndarray], seed: int = 0) -> StainReference:
    """The training images' reference for both methods."""
    rng = np.random.default_rng(seed)
    pixels = np.concatenate([_sample(im.reshape(-1, 3), rng) for im in images])
    stats = [lab_stats(im) for im in images]
    reinhard = ReinhardReference(mean=tuple(np.mean([m for m, _ in stats], axis=0).tolist()),
                                 std=tuple(np.mean([s for _, s in stats], axis=0).tolist()))
    return StainReference(reinhard=reinhard, macenko=macenko_fit(pixels))


def _sample(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return pixels if len(pixels) <= MACENKO_SAMPLE else pixels[rng.choice(len(pixels), MACENKO_SAMPLE, replace=False)]


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
    args.out.write_text(json.dumps(reference([s.image for s in train]).model_dump(mode="json"), indent=1))
    print(f"{args.out}: stain reference of {len(train)} training images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
