"""Copy-paste of rare cells: whole labelled cells of the training samples pasted into patches.

A class with a few dozen training cells is seen, by class-centred draws alone, always on the same
few backgrounds. ``CellBank`` holds every connected component of the chosen classes (pixels, labels
and mask, cut from the training samples only) and pastes ``1..max_cells`` of them, each turned by
one of the eight dihedral transforms, at random places into a share ``p`` of the patches: the
pixels under the cell's mask take the cell's image, semantic and ternary values (copy-paste,
Ghiasi et al., CVPR 2021). The patch's own stain jitter then applies to the pasted cells too.

Two options make the few cells look less alike: ``scale_jitter`` scales each pasted cell by a factor
in ``1 ± scale_jitter``, and ``match_stain`` moves its colours (CIELAB, as OpenCV computes it for
uint8) by the difference between the mean tissue colour of the image it comes from and that of the
image it is pasted into: a cell cut from a pale slide, pasted into a dark one, is stained as that one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from training.data.augment import flip_rotate
from training.data.sample import Sample

MIN_CELL_PIXELS = 20
"""Smaller components are labelling slivers, not cells."""


@dataclass(frozen=True)
class PasteConfig:
    """How many patches get pasted cells, how many, and of which semantic classes."""

    p: float = 0.0
    max_cells: int = 2
    classes: tuple[int, ...] = (3, 4)
    scale_jitter: float = 0.0
    match_stain: bool = False


@dataclass(frozen=True)
class Cell:
    """One labelled cell: its bounding box's pixels and labels, and its mask."""

    image: np.ndarray
    semantic: np.ndarray
    ternary: np.ndarray
    mask: np.ndarray
    source: int
    """Index of the sample the cell was cut from."""


TISSUE_LIGHTNESS = 230
"""OpenCV's uint8 L (0-255) below which a pixel counts as tissue for the mean stain colour."""


def tissue_lab_mean(image: np.ndarray) -> np.ndarray:
    """Mean CIELAB (OpenCV uint8 scale) of an RGB image's tissue pixels (all pixels if none)."""
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB).reshape(-1, 3)
    tissue = lab[lab[:, 0] < TISSUE_LIGHTNESS]
    return (tissue if len(tissue) else lab).mean(axis=0, dtype=np.float64).astype(np.float32)


class CellBank:
    """Every cell (connected component) of ``cfg.classes`` in ``samples`` that fits a ``size`` patch."""

    def __init__(self, samples: Sequence[Sample], cfg: PasteConfig, size: int) -> None:
        self.cfg = cfg
        self.size = size
        self.cells: dict[int, list[Cell]] = {c: [] for c in cfg.classes}
        for i, s in enumerate(samples):
            for c in cfg.classes:
                self.cells[c].extend(_cells(s, c, size, i))
        self.classes = [c for c in cfg.classes if self.cells[c]]
        self.stains = [tissue_lab_mean(s.image) for s in samples] if cfg.match_stain else []

    def __len__(self) -> int:
        return sum(len(v) for v in self.cells.values())

    def paste(self, image: np.ndarray, sem: np.ndarray, ter: np.ndarray, rng: np.random.Generator,
              into: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """With probability ``p``, copies of the patch with 1..``max_cells`` cells pasted; else the patch.
        ``into``: index of the patch's own sample (for ``match_stain``; None leaves colours as cut)."""
        if not self.classes or rng.random() >= self.cfg.p:
            return image, sem, ter
        image, sem, ter = image.copy(), sem.copy(), ter.copy()
        for _ in range(int(rng.integers(1, self.cfg.max_cells + 1))):
            cls = self.classes[int(rng.integers(len(self.classes)))]
            cell = _turned(self.cells[cls][int(rng.integers(len(self.cells[cls])))], rng)
            if self.cfg.scale_jitter:
                cell = _scaled(cell, rng.uniform(1 - self.cfg.scale_jitter, 1 + self.cfg.scale_jitter), self.size)
            if self.stains and into is not None and into != cell.source:
                cell = _restained(cell, self.stains[into] - self.stains[cell.source])
            h, w = cell.mask.shape
            y, x = int(rng.integers(sem.shape[0] - h + 1)), int(rng.integers(sem.shape[1] - w + 1))
            where = (slice(y, y + h), slice(x, x + w))
            image[where][cell.mask] = cell.image[cell.mask]
            sem[where][cell.mask] = cell.semantic[cell.mask]
            ter[where][cell.mask] = cell.ternary[cell.mask]
        return image, sem, ter


def _cells(s: Sample, cls: int, size: int, source: int) -> list[Cell]:
    """The components of class ``cls`` in ``s`` (sample ``source``) with at least ``MIN_CELL_PIXELS``
    pixels and both sides at most ``size``."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((s.semantic == cls).astype(np.uint8), connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < MIN_CELL_PIXELS or max(w, h) > size:
            continue
        box = (slice(y, y + h), slice(x, x + w))
        out.append(Cell(s.image[box].copy(), s.semantic[box].copy(), s.ternary[box].copy(), labels[box] == k,
                        source))
    return out


def _turned(cell: Cell, rng: np.random.Generator) -> Cell:
    """The cell under one of the eight dihedral transforms."""
    image, semantic, ternary, mask = flip_rotate([cell.image, cell.semantic, cell.ternary, cell.mask], rng)
    return Cell(image, semantic, ternary, mask, cell.source)


def _scaled(cell: Cell, factor: float, size: int) -> Cell:
    """The cell resized by ``factor`` (at most to ``size`` px a side): pixels bilinear, labels and mask
    nearest, so labels stay labels."""
    h, w = cell.mask.shape
    factor = min(factor, size / max(h, w))
    dsize = (max(1, round(w * factor)), max(1, round(h * factor)))

    def labels(a: np.ndarray) -> np.ndarray:
        return cv2.resize(a.astype(np.int16), dsize, interpolation=cv2.INTER_NEAREST).astype(a.dtype)

    image = cv2.resize(cell.image, dsize, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(cell.mask.astype(np.uint8), dsize, interpolation=cv2.INTER_NEAREST).astype(bool)
    return Cell(image, labels(cell.semantic), labels(cell.ternary), mask, cell.source)


def _restained(cell: Cell, shift: np.ndarray) -> Cell:
    """The cell with its CIELAB colours moved by ``shift`` (OpenCV uint8 scale, clipped)."""
    lab = cv2.cvtColor(np.ascontiguousarray(cell.image), cv2.COLOR_RGB2LAB).astype(np.float32) + shift
    image = cv2.cvtColor(np.clip(np.rint(lab), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    return Cell(image, cell.semantic, cell.ternary, cell.mask, cell.source)
