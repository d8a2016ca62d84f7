"""Copy-paste of rare cells: whole labelled cells of the training samples pasted into patches.

A class with a few dozen training cells is seen, by class-centred draws alone, always on the same
few backgrounds. ``CellBank`` holds every connected component of the chosen classes (pixels, labels
and mask, cut from the training samples only) and pastes ``1..max_cells`` of them, each turned by
one of the eight dihedral transforms, at random places into a share ``p`` of the patches: the
pixels under the cell's mask take the cell's image, semantic and ternary values (copy-paste,
Ghiasi et al., CVPR 2021). The patch's own stain jitter then applies to the pasted cells too.
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


@dataclass(frozen=True)
class Cell:
    """One labelled cell: its bounding box's pixels and labels, and its mask."""

    image: np.ndarray
    semantic: np.ndarray
    ternary: np.ndarray
    mask: np.ndarray


class CellBank:
    """Every cell (connected component) of ``cfg.classes`` in ``samples`` that fits a ``size`` patch."""

    def __init__(self, samples: Sequence[Sample], cfg: PasteConfig, size: int) -> None:
        self.cfg = cfg
        self.size = size
        self.cells: dict[int, list[Cell]] = {c: [] for c in cfg.classes}
        for s in samples:
            for c in cfg.classes:
                self.cells[c].extend(_cells(s, c, size))
        self.classes = [c for c in cfg.classes if self.cells[c]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.cells.values())

    def paste(self, image: np.ndarray, sem: np.ndarray, ter: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """With probability ``p``, copies of the patch with 1..``max_cells`` cells pasted; else the patch."""
        if not self.classes or rng.random() >= self.cfg.p:
            return image, sem, ter
        image, sem, ter = image.copy(), sem.copy(), ter.copy()
        for _ in range(int(rng.integers(1, self.cfg.max_cells + 1))):
            cls = self.classes[int(rng.integers(len(self.classes)))]
            cell = _turned(self.cells[cls][int(rng.integers(len(self.cells[cls])))], rng)
            h, w = cell.mask.shape
            y, x = int(rng.integers(sem.shape[0] - h + 1)), int(rng.integers(sem.shape[1] - w + 1))
            where = (slice(y, y + h), slice(x, x + w))
            image[where][cell.mask] = cell.image[cell.mask]
            sem[where][cell.mask] = cell.semantic[cell.mask]
            ter[where][cell.mask] = cell.ternary[cell.mask]
        return image, sem, ter


def _cells(s: Sample, cls: int, size: int) -> list[Cell]:
    """The components of class ``cls`` in ``s`` with at least ``MIN_CELL_PIXELS`` pixels and both sides
    at most ``size``."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((s.semantic == cls).astype(np.uint8), connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < MIN_CELL_PIXELS or max(w, h) > size:
            continue
        box = (slice(y, y + h), slice(x, x + w))
        out.append(Cell(s.image[box].copy(), s.semantic[box].copy(), s.ternary[box].copy(), labels[box] == k))
    return out


def _turned(cell: Cell, rng: np.random.Generator) -> Cell:
    """The cell under one of the eight dihedral transforms."""
    return Cell(*flip_rotate([cell.image, cell.semantic, cell.ternary, cell.mask], rng))
