"""A small re-implementation of the original project's inference loop, for parity and speed baselines.

The original pads the whole image (reflect) at the bottom and right so that tiles at stride
``tile - overlap`` fit exactly, runs every tile at batch size 1, accumulates Gaussian-weighted
logits into whole-image accumulators, divides and crops. It is kept deliberately naive: it is the
baseline, not a component.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def gaussian_window(tile: int) -> np.ndarray:
    """Peak-normalised Gaussian, sigma = tile / 4."""
    c, s = (tile - 1) / 2.0, tile / 4.0
    g = np.exp(-((np.arange(tile) - c) ** 2) / (2 * s * s))
    w = np.outer(g, g)
    return (w / w.max()).astype(np.float32)


def original_loop(network: nn.Module, image: np.ndarray, *, tile: int = 256, overlap: int = 64,
                  mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
                  std: tuple[float, float, float] = (0.229, 0.224, 0.225)) -> tuple[np.ndarray, np.ndarray]:
    """Blended ``(5, H, W)`` and ``(3, H, W)`` logits of ``image`` (uint8 HxWx3), batch size 1."""
    stride = tile - overlap
    h, w = image.shape[:2]
    hp = tile + max(0, math.ceil((h - tile) / stride)) * stride
    wp = tile + max(0, math.ceil((w - tile) / stride)) * stride
    padded = np.pad(image, ((0, hp - h), (0, wp - w), (0, 0)), mode="reflect")
    acc = np.zeros((8, hp, wp), dtype=np.float32)
    wsum = np.zeros((hp, wp), dtype=np.float32)
    window = gaussian_window(tile)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    network.eval()
    with torch.no_grad():
        for y in range(0, hp - tile + 1, stride):
            for x in range(0, wp - tile + 1, stride):
                patch = torch.from_numpy(np.ascontiguousarray(padded[y : y + tile, x : x + tile]))
                batch = (patch.permute(2, 0, 1)[None].float() / 255.0 - m) / s
                sem, ter = network(batch)
                logits = torch.cat((sem, ter), dim=1)[0].numpy()
                acc[:, y : y + tile, x : x + tile] += logits * window
                wsum[y : y + tile, x : x + tile] += window
    out = (acc / wsum)[:, :h, :w]
    return out[:5], out[5:]
