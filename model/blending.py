"""Gaussian-weighted blending of overlapping tile logits into one region (the "merger").

Every output pixel is ``sum_t w_t * logits_t / sum_t w_t`` over the grid tiles ``t`` that cover it.
An ``Accumulator`` holds that sum for one region only, so memory is bounded by the region's size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from model.tiling import Box


@lru_cache(maxsize=8)
def gaussian_weights(tile: int, sigma_scale: float = 0.25) -> np.ndarray:
    """Separable 2-D Gaussian of side ``tile``, sigma ``tile * sigma_scale``, peak 1 (float32)."""
    centre = (tile - 1) / 2.0
    sigma = tile * sigma_scale
    axis = np.exp(-0.5 * ((np.arange(tile) - centre) / sigma) ** 2)
    weights = np.outer(axis, axis).astype(np.float32)
    weights /= weights.max()
    weights.setflags(write=False)
    return weights


class Accumulator:
    """Weighted sums of ``channels`` logits and of weights over one region."""

    def __init__(self, region: Box, channels: int) -> None:
        self.region = region
        self.values = np.zeros((channels, region.height, region.width), dtype=np.float32)
        self.weights = np.zeros((region.height, region.width), dtype=np.float32)

    def add(self, tile_box: Box, logits: np.ndarray, weights: np.ndarray) -> None:
        """Add one tile's ``(C, T, T)`` logits, weighted by ``(T, T)`` weights, where it overlaps."""
        part = tile_box.intersect(self.region)
        if part is None:
            return
        ty, tx = part.y0 - tile_box.y0, part.x0 - tile_box.x0
        ry, rx = part.y0 - self.region.y0, part.x0 - self.region.x0
        h, w = part.height, part.width
        wt = weights[ty : ty + h, tx : tx + w]
        self.values[:, ry : ry + h, rx : rx + w] += logits[:, ty : ty + h, tx : tx + w] * wt
        self.weights[ry : ry + h, rx : rx + w] += wt

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Blended logits ``(C, h, w)`` (0 where nothing covered) and the covered mask ``(h, w)``."""
        covered = self.weights > 0
        np.divide(self.values, self.weights, out=self.values, where=covered)
        return self.values, covered
