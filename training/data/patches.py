"""Random patches with a foreground bias and small scale jitter, as a torch ``Dataset``.

Each item is drawn from its own generator seeded by ``(seed, epoch, index)``, so an epoch is
reproducible whatever the number of workers and whether training was resumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.data.augment import AugmentConfig, augment
from training.data.sample import IGNORE, Sample


@dataclass(frozen=True)
class PatchConfig:
    """How patches are drawn."""

    size: int = 256
    per_epoch: int = 1000
    foreground_bias: float = 0.5
    scale_jitter: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``per_epoch`` random patches from ``samples``, picked with per-sample ``weights``."""

    def __init__(self, samples: Sequence[Sample], cfg: PatchConfig, *, seed: int = 0,
                 weights: Sequence[float] | None = None, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        if not samples:
            raise ValueError("PatchDataset needs at least one sample, got none")
        self.samples = list(samples)
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        w = np.ones(len(samples)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(samples),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(samples)} non-negative numbers, got {w.tolist()[:8]}")
        self.p = w / w.sum()
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.std = np.asarray(std, dtype=np.float32) * 255.0
        self._fg = [np.flatnonzero(s.ternary.ravel() > 0) for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Draw a different, reproducible set of patches next epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cfg.per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        i = int(rng.choice(len(self.samples), p=self.p))
        image, sem, ter = self.crop(i, rng)
        image, sem, ter = augment(image, sem, ter, rng, self.cfg.augment)
        x = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(sem), torch.from_numpy(ter)

    def crop(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A crop of sample ``i`` (scale-jittered, then resized to ``size``)."""
        s = self.samples[i]
        size = self.cfg.size
        side = round(size * rng.uniform(1 - self.cfg.scale_jitter, 1 + self.cfg.scale_jitter))
        image, sem, ter = _pad_to(s, side)
        h, w = sem.shape
        y0, x0 = self._corner(i, rng, side, (h, w), s.semantic.shape[1])
        crop = (slice(y0, y0 + side), slice(x0, x0 + side))
        image, sem, ter = image[crop], sem[crop], ter[crop]
        if side != size:
            image, sem, ter = _resize(image, size, Image.Resampling.BILINEAR), _resize(
                sem, size, Image.Resampling.NEAREST), _resize(ter, size, Image.Resampling.NEAREST)
        return image, sem, ter

    def _corner(self, i: int, rng: np.random.Generator, side: int, shape: tuple[int, int],
                src_w: int) -> tuple[int, int]:
        h, w = shape
        fg = self._fg[i]
        if fg.size and rng.random() < self.cfg.foreground_bias:
            cy, cx = divmod(int(fg[rng.integers(fg.size)]), src_w)
            y0 = int(np.clip(cy - side // 2 + rng.integers(-side // 4, side // 4 + 1), 0, h - side))
            x0 = int(np.clip(cx - side // 2 + rng.integers(-side // 4, side // 4 + 1), 0, w - side))
            return y0, x0
        return int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))


def _pad_to(s: Sample, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad (image reflected, labels IGNORE) at the bottom/right so both sides are >= ``side``."""
    h, w = s.semantic.shape
    ph, pw = max(0, side - h), max(0, side - w)
    if not ph and not pw:
        return s.image, s.semantic, s.ternary
    image = np.pad(s.image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    sem = np.pad(s.semantic, ((0, ph), (0, pw)), constant_values=IGNORE)
    ter = np.pad(s.ternary, ((0, ph), (0, pw)), constant_values=IGNORE)
    return image, sem, ter


def _resize(arr: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    if arr.ndim == 3:
        return np.asarray(Image.fromarray(arr).resize((size, size), resample))
    out = Image.fromarray(arr.astype(np.int32)).resize((size, size), resample)
    return np.asarray(out).astype(np.int64)
