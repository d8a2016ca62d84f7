"""A re-implementation of the original project's inference loop, for parity and speed baselines.

It follows the original's ``run_tiled_inference`` (``deployment/space/inference.py``) tile for
tile: the image is padded (reflect) at the bottom and right up to a multiple of the stride (at
least one tile), tiles start at every stride that fits in the padded image, and a last tile is
added flush with the padded edge when the strides leave part of it uncovered. Every tile runs at
batch size 1; Gaussian-weighted logits go into whole-image accumulators, which are divided and
cropped. It is kept deliberately naive: it is the baseline, not a component.

Our engine uses one global grid instead (tiles at every stride that touches the image, the image
mirrored past its edge), so the two agree exactly except in the last stride band at the bottom and
right, where the original's flush tile sits (``band_start``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def gaussian_window(tile: int) -> np.ndarray:
    """Peak-normalised Gaussian, sigma = tile / 4."""
    c, s = (tile - 1) / 2.0, tile / 4.0
    g = np.exp(-((np.arange(tile) - c) ** 2) / (2 * s * s))
    w = np.outer(g, g)
    return (w / w.max()).astype(np.float32)


def padded_size(size: int, tile: int, stride: int) -> int:
    """The original's padded side: up to a multiple of the stride, and at least one tile."""
    return size + max((stride - size % stride) % stride, tile - size)


def original_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis in the original: every stride that fits, then one flush tile."""
    padded = padded_size(size, tile, stride)
    starts = list(range(0, padded - tile + 1, stride))
    if starts[-1] + tile < padded:
        starts.append(padded - tile)
    return starts


def band_start(size: int, tile: int, stride: int) -> int:
    """Where the original's tiles along one axis first differ from our global grid's (else ``size``)."""
    ours = set(range(0, size, stride))
    differing = ours.symmetric_difference(original_starts(size, tile, stride))
    return min([size, *differing])


def original_loop(network: nn.Module, image: np.ndarray, *, tile: int = 256, overlap: int = 64,
                  mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
                  std: tuple[float, float, float] = (0.229, 0.224, 0.225)) -> tuple[np.ndarray, np.ndarray]:
    """Blended ``(5, H, W)`` and ``(3, H, W)`` logits of ``image`` (uint8 HxWx3), batch size 1."""
    stride = tile - overlap
    h, w = image.shape[:2]
    hp, wp = padded_size(h, tile, stride), padded_size(w, tile, stride)
    padded = np.pad(image, ((0, hp - h), (0, wp - w), (0, 0)), mode="reflect")
    acc = np.zeros((8, hp, wp), dtype=np.float32)
    wsum = np.zeros((hp, wp), dtype=np.float32)
    window = gaussian_window(tile)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    network.eval()
    with torch.no_grad():
        for y in original_starts(h, tile, stride):
            for x in original_starts(w, tile, stride):
                patch = torch.from_numpy(np.ascontiguousarray(padded[y : y + tile, x : x + tile]))
                batch = (patch.permute(2, 0, 1)[None].float() / 255.0 - m) / s
                sem, ter = network(batch)
                logits = torch.cat((sem, ter), dim=1)[0].numpy()
                acc[:, y : y + tile, x : x + tile] += logits * window
                wsum[y : y + tile, x : x + tile] += window
    out = (acc / wsum)[:, :h, :w]
    return out[:5], out[5:]
