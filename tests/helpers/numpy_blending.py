"""The engine's former numpy blending, kept as the reference the torch blending is tested against."""

from __future__ import annotations

import numpy as np

from model.tiling import Box


def gaussian_weights(tile: int, sigma_scale: float = 0.25) -> np.ndarray:
    """Separable 2-D Gaussian of side ``tile``, sigma ``tile * sigma_scale``, peak 1 (float32)."""
    centre = (tile - 1) / 2.0
    axis = np.exp(-0.5 * ((np.arange(tile) - centre) / (tile * sigma_scale)) ** 2)
    weights = np.outer(axis, axis).astype(np.float32)
    return weights / weights.max()


def blend(region: Box, tiles: list[tuple[Box, np.ndarray]], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of ``(C, T, T)`` tile logits over ``region`` (0 where uncovered), and the covered mask."""
    values = np.zeros((tiles[0][1].shape[0], region.height, region.width), dtype=np.float32)
    total = np.zeros((region.height, region.width), dtype=np.float32)
    for box, logits in tiles:
        part = box.intersect(region)
        if part is None:
            continue
        ty, tx, ry, rx = part.y0 - box.y0, part.x0 - box.x0, part.y0 - region.y0, part.x0 - region.x0
        h, w = part.height, part.width
        wt = weights[ty : ty + h, tx : tx + w]
        values[:, ry : ry + h, rx : rx + w] += logits[:, ty : ty + h, tx : tx + w] * wt
        total[ry : ry + h, rx : rx + w] += wt
    covered = total > 0
    np.divide(values, total, out=values, where=covered)
    return values, covered
