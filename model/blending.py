"""Gaussian-weighted blending of overlapping tile logits into one region (the "merger"), in torch.

Every output pixel is ``sum_t w_t * logits_t / sum_t w_t`` over the grid tiles ``t`` that cover it.
An ``Accumulator`` holds that sum for one region only, so memory is bounded by the region's size.
It lives where the network runs (``cpu`` or ``cuda``, the same code): logits never leave the
device, and ``class_maps`` turns the blended region into what the sinks need (uint8 argmax maps).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from model.tiling import Box


@lru_cache(maxsize=8)
def gaussian_weights(tile: int, sigma_scale: float = 0.25, device: str = "cpu") -> torch.Tensor:
    """Separable 2-D Gaussian of side ``tile``, sigma ``tile * sigma_scale``, peak 1 (float32)."""
    centre = (tile - 1) / 2.0
    sigma = tile * sigma_scale
    axis = torch.exp(-0.5 * ((torch.arange(tile, dtype=torch.float64) - centre) / sigma) ** 2)
    weights = torch.outer(axis, axis).to(torch.float32)
    return (weights / weights.max()).to(device)


class Accumulator:
    """Weighted sums of ``channels`` logits and of weights over one region, on ``device``."""

    def __init__(self, region: Box, channels: int, device: torch.device | str = "cpu") -> None:
        self.region = region
        self.values = torch.zeros((channels, region.height, region.width), dtype=torch.float32, device=device)
        self.weights = torch.zeros((region.height, region.width), dtype=torch.float32, device=device)

    def add(self, tile_box: Box, logits: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one tile's ``(C, T, T)`` logits, weighted by ``(T, T)`` weights, where it overlaps."""
        part = tile_box.intersect(self.region)
        if part is None:
            return
        ty, tx = part.y0 - tile_box.y0, part.x0 - tile_box.x0
        ry, rx = part.y0 - self.region.y0, part.x0 - self.region.x0
        h, w = part.height, part.width
        wt = weights[ty : ty + h, tx : tx + w]
        self.values[:, ry : ry + h, rx : rx + w].addcmul_(logits[:, ty : ty + h, tx : tx + w], wt)
        self.weights[ry : ry + h, rx : rx + w] += wt

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended logits ``(C, h, w)`` (0 where nothing covered) and the covered mask ``(h, w)``."""
        covered = self.weights > 0
        self.values.div_(torch.where(covered, self.weights, 1.0))
        return self.values, covered


def class_maps(values: torch.Tensor, covered: torch.Tensor, n_semantic: int) -> torch.Tensor:
    """``(2, h, w)`` uint8: argmax of the semantic and of the ternary logits, 0 where not covered."""
    return torch.stack([first_argmax(values[:n_semantic]), first_argmax(values[n_semantic:])]).masked_fill_(
        ~covered, 0)


def first_argmax(planes: torch.Tensor) -> torch.Tensor:
    """uint8 index of the largest of ``(C, h, w)`` planes per pixel; ties go to the lower class, as in
    ``numpy.argmax``. A running maximum over the planes: ``torch.argmax`` over the first dimension is
    7x slower than this (and than numpy) on the CPU.
    """
    best = planes[0].clone()
    index = torch.zeros(planes.shape[1:], dtype=torch.uint8, device=planes.device)
    for k in range(1, planes.shape[0]):
        index.masked_fill_(planes[k] > best, k)
        torch.maximum(best, planes[k], out=best)
    return index
