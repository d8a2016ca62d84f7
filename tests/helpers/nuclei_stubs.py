"""Generated nuclei and a network stub that returns their exact maps (for post-processing tests).

Pixels carry the maps in their colour: background is white (blue > 127, so that white read past a
slide's edge stays background); nucleus pixels have blue 0, red = 100 × ternary class (1 inside,
2 boundary) and green = 50 × semantic class (0 background .. 4 macrophage). ``CodeNet`` decodes
the colour of its input (normalised with ``tests.helpers.stubs.RAW``: rgb / 255) into one-hot logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

TER_STEP = 100
SEM_STEP = 50
LOGIT = 10.0


@dataclass(frozen=True)
class Nucleus:
    """An ellipse with centre ``(cx, cy)`` in pixels, radii, rotation (radians) and semantic class."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    sem: int


class CodeNet(nn.Module):
    """Decodes the colour code into exact one-hot logits ``(sem (N,5,T,T), ter (N,3,T,T))``."""

    output_stride = 32
    encoder_name = "code-stub"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = np.rint(x.detach().cpu().numpy() * 255.0)  # numpy: cheaper than torch for this
        nucleus = rgb[:, 2] <= 127
        ter = np.where(nucleus, np.clip(np.rint(rgb[:, 0] / TER_STEP), 0, 2), 0).astype(np.int64)
        sem = np.where(nucleus, np.clip(np.rint(rgb[:, 1] / SEM_STEP), 0, 4), 0).astype(np.int64)
        sem_logits = np.eye(5, dtype=np.float32)[sem].transpose(0, 3, 1, 2) * LOGIT
        ter_logits = np.eye(3, dtype=np.float32)[ter].transpose(0, 3, 1, 2) * LOGIT
        return torch.from_numpy(sem_logits), torch.from_numpy(ter_logits)


def paint(height: int, width: int, nuclei: list[Nucleus]) -> np.ndarray:
    """Instance labels ``(h, w)`` int32, nucleus ``k`` = label ``k + 1`` (later ones on top)."""
    labels = np.zeros((height, width), dtype=np.int32)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    for k, n in enumerate(nuclei):
        c, s = np.cos(n.angle), np.sin(n.angle)
        u = (xx - n.cx) * c + (yy - n.cy) * s
        v = -(xx - n.cx) * s + (yy - n.cy) * c
        labels[(u / n.rx) ** 2 + (v / n.ry) ** 2 <= 1.0] = k + 1
    return labels


def ternary_of(labels: np.ndarray) -> np.ndarray:
    """0 background, 2 on nucleus pixels with a 4-neighbour of another label, else 1."""
    cross = ndimage.generate_binary_structure(2, 1)
    edge = (ndimage.maximum_filter(labels, footprint=cross, mode="nearest") != labels) | (
        ndimage.minimum_filter(labels, footprint=cross, mode="nearest") != labels
    )
    return np.where(labels == 0, 0, np.where(edge, 2, 1)).astype(np.uint8)


def encode(labels: np.ndarray, nuclei: list[Nucleus]) -> np.ndarray:
    """RGB uint8 image carrying the ternary and semantic classes of ``labels``."""
    sem_of = np.array([0] + [n.sem for n in nuclei], dtype=np.uint8)
    rgb = np.full((*labels.shape, 3), 255, dtype=np.uint8)
    nucleus = labels > 0
    rgb[nucleus, 0] = ternary_of(labels)[nucleus] * TER_STEP
    rgb[nucleus, 1] = sem_of[labels[nucleus]] * SEM_STEP
    rgb[nucleus, 2] = 0
    return rgb


def exact_logits(labels: np.ndarray, nuclei: list[Nucleus]) -> tuple[np.ndarray, np.ndarray]:
    """The whole-image logits the stub gives for ``encode(labels, nuclei)``."""
    sem_of = np.array([0] + [n.sem for n in nuclei])
    sem = np.eye(5, dtype=np.float32)[sem_of[labels]].transpose(2, 0, 1) * LOGIT
    ter = np.eye(3, dtype=np.float32)[ternary_of(labels)].transpose(2, 0, 1) * LOGIT
    return sem, ter


def scatter(rng: np.random.Generator, height: int, width: int, count: int, r: tuple[float, float],
            classes: tuple[int, ...] = (0, 1, 2, 3, 4), margin: float = 2.0) -> list[Nucleus]:
    """``count`` random ellipses that do not overlap (they may touch)."""
    out: list[Nucleus] = []
    while len(out) < count:
        rx, ry = rng.uniform(*r), rng.uniform(*r)
        cx = rng.uniform(rx + margin, width - rx - margin)
        cy = rng.uniform(ry + margin, height - ry - margin)
        if all(np.hypot(cx - n.cx, cy - n.cy) > max(rx, ry) + max(n.rx, n.ry) + 1 for n in out):
            out.append(Nucleus(cx, cy, rx, ry, rng.uniform(0, np.pi), int(rng.choice(classes))))
    return out
