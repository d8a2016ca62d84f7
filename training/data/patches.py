"""Random patches with a foreground bias, class-centred draws, scale jitter and (optionally) rotation.

A ``class_bias`` share of the patches is centred on a pixel of a cell type (semantic classes 1..4)
drawn with the probabilities ``class_draw`` (pixels of all training samples, uniformly within a
class); the rest pick a sample by its weight, then a nucleus (``foreground_bias``) or any position.
With ``rotate``, a patch is one affine warp of its sample (any angle, and the scale jitter): the
image interpolated bilinearly and mirrored past the sample's edges, the labels by nearest neighbour
and ``IGNORE`` past them.
:func:`class_shares` measures what that gives, per class, in the pixels the network sees.

Each item is drawn from its own generator seeded by ``(seed, epoch, index)``, so an epoch is
reproducible whatever the number of workers and whether training was resumed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from model.options import SEMANTIC_CLASSES
from training.data.augment import AugmentConfig, augment
from training.data.paste import CellBank, PasteConfig
from training.data.sample import BACKGROUND_OR_MACROPHAGE, IGNORE, Sample

CELL_CLASSES = tuple(range(1, len(SEMANTIC_CLASSES)))
"""Semantic classes that class-centred draws aim at: epithelial, lymphocyte, neutrophil, macrophage."""


@dataclass(frozen=True)
class PatchConfig:
    """How patches are drawn."""

    size: int = 256
    per_epoch: int = 1000
    foreground_bias: float = 0.5
    scale_jitter: float = 0.1
    class_bias: float = 0.0
    class_draw: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    rotate: bool = False
    paste: PasteConfig = field(default_factory=PasteConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class ClassPixels:
    """Every pixel of each cell type over all samples, for class-centred draws."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[int], draw: Sequence[float]) -> None:
        if len(draw) != len(classes) or min(draw) < 0 or sum(draw) <= 0:
            raise ValueError(f"class_draw must be {len(classes)} non-negative numbers, got {list(draw)}")
        self.classes = list(classes)
        self.where: list[tuple[np.ndarray, np.ndarray]] = []
        for c in self.classes:
            per = [np.flatnonzero(s.semantic.ravel() == c) for s in samples]
            owner = np.concatenate([np.full(len(p), i, dtype=np.int32) for i, p in enumerate(per)])
            self.where.append((owner, np.concatenate(per)))
        self.pixels = np.array([len(w[1]) for w in self.where], dtype=np.float64)
        weights = np.where(self.pixels > 0, np.asarray(draw, dtype=np.float64), 0.0)
        if weights.sum() <= 0:
            raise ValueError(f"no training pixel of the classes {self.classes} to centre patches on")
        self.p = weights / weights.sum()

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(sample index, flat pixel index) of a random pixel of a random class."""
        k = int(rng.choice(len(self.classes), p=self.p))
        owner, flat = self.where[k]
        j = int(rng.integers(len(flat)))
        return int(owner[j]), int(flat[j])


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
        self.class_pixels = ClassPixels(self.samples, CELL_CLASSES, cfg.class_draw) if cfg.class_bias else None
        self._labels = [_int16_labels(s) for s in self.samples] if cfg.rotate else []  # converted once, not per patch
        self.cells = CellBank(self.samples, cfg.paste, cfg.size) if cfg.paste.p else None

    def set_epoch(self, epoch: int) -> None:
        """Draw a different, reproducible set of patches next epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cfg.per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        i, centre = self.pick(rng)
        image, sem, ter = self.pasted(self.crop(i, rng, centre), i, index)
        image, sem, ter = augment(image, sem, ter, rng, self.cfg.augment)
        x = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(sem), torch.from_numpy(ter)

    def pick(self, rng: np.random.Generator) -> tuple[int, int | None]:
        """(sample index, centre pixel or None): a class-centred draw or a sample by weight."""
        if self.class_pixels is not None and rng.random() < self.cfg.class_bias:
            return self.class_pixels.draw(rng)
        return int(rng.choice(len(self.samples), p=self.p)), None

    def pasted(self, patch: tuple[np.ndarray, np.ndarray, np.ndarray], sample: int,
               index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patch ``index`` of sample ``sample`` with copy-pasted cells (``PasteConfig``), drawn from a
        generator of their own so that the patch and its augmentation are those drawn without pasting."""
        if self.cells is None:
            return patch
        return self.cells.paste(*patch, np.random.default_rng((self.seed, self.epoch, index, 1)), into=sample)

    def crop(self, i: int, rng: np.random.Generator,
             centre: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A crop of sample ``i`` (scale-jittered, then resized to ``size``), around ``centre`` if given."""
        s = self.samples[i]
        size = self.cfg.size
        side = round(size * rng.uniform(1 - self.cfg.scale_jitter, 1 + self.cfg.scale_jitter))
        if self.cfg.rotate:
            cy, cx = self._centre(i, rng, side, centre)
            return _warp(s, self._labels[i], (cy, cx), side / size, rng.uniform(0, 2 * np.pi), size)
        image, sem, ter = _pad_to(s, side)
        h, w = sem.shape
        y0, x0 = self._corner(i, rng, side, (h, w), centre)
        crop = (slice(y0, y0 + side), slice(x0, x0 + side))
        image, sem, ter = image[crop], sem[crop], ter[crop]
        if side != size:
            image, sem, ter = _resize(image, size, Image.Resampling.BILINEAR), _resize(
                sem, size, Image.Resampling.NEAREST), _resize(ter, size, Image.Resampling.NEAREST)
        return image, sem, ter

    def _jittered(self, i: int, rng: np.random.Generator, side: int, centre: int | None) -> tuple[int, int] | None:
        """The pixel (row, column) a patch is centred on: ``centre`` (or, with ``foreground_bias``, a
        nucleus pixel) moved by up to a quarter of ``side``; None for a patch placed anywhere."""
        fg = self._fg[i]
        if centre is None and fg.size and rng.random() < self.cfg.foreground_bias:
            centre = int(fg[rng.integers(fg.size)])
        if centre is None:
            return None
        cy, cx = divmod(centre, self.samples[i].semantic.shape[1])
        return (cy + int(rng.integers(-side // 4, side // 4 + 1)), cx + int(rng.integers(-side // 4, side // 4 + 1)))

    def _centre(self, i: int, rng: np.random.Generator, side: int, centre: int | None) -> tuple[float, float]:
        """A turned patch's centre (continuous): ``_jittered``'s pixel's middle, or anywhere; kept
        inside the sample where the patch fits."""
        h, w = self.samples[i].semantic.shape
        pixel = self._jittered(i, rng, side, centre)
        cy, cx = (rng.uniform(0, h), rng.uniform(0, w)) if pixel is None else (pixel[0] + 0.5, pixel[1] + 0.5)
        half = side / 2
        return (float(np.clip(cy, half, h - half)) if h > side else h / 2,
                float(np.clip(cx, half, w - half)) if w > side else w / 2)

    def _corner(self, i: int, rng: np.random.Generator, side: int, shape: tuple[int, int],
                centre: int | None) -> tuple[int, int]:
        """A square crop's top-left corner in the padded sample of ``shape``."""
        h, w = shape
        pixel = self._jittered(i, rng, side, centre)
        if pixel is not None:
            return int(np.clip(pixel[0] - side // 2, 0, h - side)), int(np.clip(pixel[1] - side // 2, 0, w - side))
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


def _warp(s: Sample, labels: tuple[np.ndarray, np.ndarray], centre: tuple[float, float], scale: float, angle: float,
          size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``size``² patch centred on ``centre`` ((y, x), continuous: pixel ``i`` spans ``[i, i + 1)``),
    its grid the sample's scaled by ``scale`` and turned by ``angle`` radians; ``labels``: the
    sample's semantic and ternary maps as int16 (``_int16_labels``)."""
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    mid = (size - 1) / 2
    cy, cx = centre[0] - 0.5, centre[1] - 0.5
    to_source = np.array([[cos, -sin, cx - cos * mid + sin * mid],
                          [sin, cos, cy - sin * mid - cos * mid]], dtype=np.float64)
    flags = cv2.WARP_INVERSE_MAP
    image = cv2.warpAffine(s.image, to_source, (size, size), flags=flags | cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    sem, ter = (cv2.warpAffine(a, to_source, (size, size), flags=flags | cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE).astype(np.int64) for a in labels)
    return image, sem, ter


def _int16_labels(s: Sample) -> tuple[np.ndarray, np.ndarray]:
    """A sample's semantic and ternary maps as int16, a type OpenCV's warps take."""
    return s.semantic.astype(np.int16), s.ternary.astype(np.int16)


def _resize(arr: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    if arr.ndim == 3:
        return np.asarray(Image.fromarray(arr).resize((size, size), resample))
    out = Image.fromarray(arr.astype(np.int32)).resize((size, size), resample)
    return np.asarray(out).astype(np.int64)


def class_shares(dataset: PatchDataset, n: int = 400) -> dict[str, Any]:
    """What the sampler shows: per semantic label, its share of the labelled pixels of ``n`` patches."""
    counts: dict[int, int] = {}
    for index in range(n):
        rng = np.random.default_rng((dataset.seed, 2**32 - 1, index))
        i, centre = dataset.pick(rng)
        _, sem, _ = dataset.pasted(dataset.crop(i, rng, centre), i, index)
        values, freq = np.unique(sem, return_counts=True)
        for v, f in zip(values.tolist(), freq.tolist(), strict=True):
            counts[v] = counts.get(v, 0) + f
    labelled = sum(f for v, f in counts.items() if v != IGNORE)
    not_nuclear = (IGNORE, 0, BACKGROUND_OR_MACROPHAGE)
    nuclear = sum(f for v, f in counts.items() if v not in not_nuclear)
    return {"patches": n, "labelled_share": {str(v): f / labelled for v, f in sorted(counts.items()) if v != IGNORE},
            "nuclear_share": {str(v): f / nuclear for v, f in sorted(counts.items()) if v not in not_nuclear}}


def write_sampling(path: Path, dataset: PatchDataset, n: int = 400) -> None:
    """Record :func:`class_shares` as JSON (label values as keys; negative: the partial labels of
    ``training.data.sample.PARTIAL_LABELS``)."""
    path.write_text(json.dumps(class_shares(dataset, n), indent=1))
