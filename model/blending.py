"""Gaussian-weighted blending of overlapping tile logits into one region (the "merger"), in torch.

Every output pixel is ``sum_t w_t * logits_t / sum_t w_t`` over the grid tiles ``t`` that cover it.
An ``Accumulator`` holds that sum for one region only, so memory is bounded by the region's size.
It lives where the network runs (``cpu`` or ``cuda``, the same code): logits never leave the
device, and ``class_maps`` and ``nucleus_maps`` turn the blended region into what the sinks need
(uint8 argmax maps, uint8 probabilities for the nuclei).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from model.postprocess import PROB_SCALE
from model.tiling import Box


@lru_cache(maxsize=8)
def gaussian_weights(tile: int, sigma_scale: float = 0.25, device: str = "cpu") -> torch.Tensor:
    """Separable 2-D Gaussian of side ``tile``, sigma ``tile * sigma_scale``, peak 1 (float32)."""
    centre = (tile - 1) / 2.0
    sigma = tile * sigma_scale
    axis = torch.exp(-0.5 * ((torch.arange(tile, dtype=torch.float64) - centre) / sigma) ** 2)
    weights = torch.outer(axis, axis).to(torch.float32)
    return (weights / weights.max()).to(device)


class Workspace:
    """Reusable storage for a run's accumulators: the first block allocates, later ones zero it.

    A fresh 170 MB accumulator per block costs page faults (the allocator maps and unmaps buffers
    that large); a workspace keeps them, so its tensors are valid until the next ``take``.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self._flat = torch.zeros(0, dtype=torch.float32, device=device)

    def reserve(self, n: int) -> None:
        """Hold storage for ``n`` floats now (the largest region of a run), so that no later ``take``
        maps fresh memory: each growth is a new buffer whose pages the system zeroes on first touch."""
        if n > self._flat.numel():
            self._flat = torch.empty(0, dtype=torch.float32, device=self.device)  # the old one goes first
            self._flat = torch.empty(n, dtype=torch.float32, device=self.device)

    def take(self, *shape: int) -> torch.Tensor:
        """A zeroed float32 tensor of ``shape`` over this workspace's storage."""
        n = math.prod(shape)
        self.reserve(n)
        return self._flat[:n].view(shape).zero_()


class Accumulator:
    """Weighted sums of ``channels`` logits and of weights over one region, on ``device``."""

    def __init__(self, region: Box, channels: int, device: torch.device | str = "cpu",
                 workspace: Workspace | None = None) -> None:
        self.region = region
        h, w = region.height, region.width
        if workspace is None:
            workspace = Workspace(device)
        acc = workspace.take(channels + 1, h, w)  # the logits' sums, then the weights' sum
        self.values, self.weights = acc[:channels], acc[channels]

    def add(self, tile_box: Box, logits: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one tile's ``(C, T, T)`` logits, weighted by ``(T, T)`` weights, where it overlaps.

        Logits kept in a narrower dtype (the tile cache's bf16) are widened first: the same float32
        values, added by the same float32 kernel."""
        part = tile_box.intersect(self.region)
        if part is None:
            return
        ty, tx = part.y0 - tile_box.y0, part.x0 - tile_box.x0
        ry, rx = part.y0 - self.region.y0, part.x0 - self.region.x0
        h, w = part.height, part.width
        wt = weights[ty : ty + h, tx : tx + w]
        self.values[:, ry : ry + h, rx : rx + w].addcmul_(logits[:, ty : ty + h, tx : tx + w].float(), wt)
        self.weights[ry : ry + h, rx : rx + w] += wt

    def sums(self, covered: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weighted sums ``(C, h, w)``, the weights' sums ``(h, w)`` (raised from 0 to the smallest
        normal float where nothing covered, so that sums divided by them are 0 there; a covered pixel's
        weight is far above it) and the covered mask ``(h, w)``, written into ``covered`` if given."""
        covered = torch.gt(self.weights, 0, out=covered) if covered is not None else self.weights > 0
        return self.values, self.weights.clamp_(min=torch.finfo(torch.float32).tiny), covered

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended logits ``(C, h, w)`` (0 where nothing covered) and the covered mask ``(h, w)``."""
        values, weights, covered = self.sums()
        return values.div_(weights), covered


def class_maps(values: torch.Tensor, covered: torch.Tensor, n_semantic: int) -> torch.Tensor:
    """``(2, h, w)`` uint8: argmax of the semantic and of the ternary logits, 0 where not covered."""
    maps = torch.empty((2, *values.shape[1:]), dtype=torch.uint8, device=values.device)
    _class_maps_into(maps, values, covered, n_semantic)
    return maps


def _class_maps_into(maps: torch.Tensor, values: torch.Tensor, covered: torch.Tensor, n_semantic: int) -> torch.Tensor:
    """``class_maps`` written into ``maps``; returns the semantic logits' maximum."""
    semantic, top = _argmax_and_max(values[:n_semantic])
    cover = covered.view(torch.uint8)
    torch.mul(semantic, cover, out=maps[0])
    torch.mul(first_argmax(values[n_semantic:]), cover, out=maps[1])
    return top


BAND_ROWS = 32
"""Rows of a region turned into maps at a time on a CPU (``region_maps``): a band of all planes stays
in cache from one pass to the next (measured 30 % faster than whole planes), with the same values."""


MapTensors = tuple[torch.Tensor, torch.Tensor | None]


def region_maps(values: torch.Tensor, covered: torch.Tensor, n_semantic: int, *, probs: bool, rows: int | None = None,
                weights: torch.Tensor | None = None, out: MapTensors | None = None) -> MapTensors:
    """``class_maps`` and, with ``probs``, ``nucleus_maps`` of a blended region, ``rows`` rows at a
    time (default: ``BAND_ROWS`` on a CPU, the whole region elsewhere, where bands only add kernel
    launches). With ``weights`` (``Accumulator.sums``), ``values`` are weighted sums, divided here a
    band at a time. Overwrites ``values`` where ``probs`` or ``weights``. ``out``: the two maps'
    tensors to write (views of larger ones, say), else new ones."""
    h, w = values.shape[1:]
    rows = rows or (BAND_ROWS if values.device.type == "cpu" else h)
    if out is None:
        out = (torch.empty((2, h, w), dtype=torch.uint8, device=values.device),
               torch.empty((n_semantic + 1, h, w), dtype=torch.uint8, device=values.device) if probs else None)
    classes, nuclei = out
    for y in range(0, h, rows):
        band = values[:, y : y + rows]
        if weights is not None:
            band.div_(weights[y : y + rows])
        top = _class_maps_into(classes[:, y : y + rows], band, covered[y : y + rows], n_semantic)
        if nuclei is not None:
            nucleus_maps(band, n_semantic, top=top, out=nuclei[:, y : y + rows])
    return classes, nuclei


def first_argmax(planes: torch.Tensor) -> torch.Tensor:
    """uint8 index of the largest of ``(C, h, w)`` planes per pixel; ties go to the lower class, as in
    ``numpy.argmax``. A running maximum over the planes: ``torch.argmax`` over the first dimension is
    7x slower than this (and than numpy) on the CPU. Plane ``k`` wins where it beats the best so far,
    and ``k`` is larger than every index before it, so ``max(index, won * k)`` records it: 4x faster
    than ``masked_fill_`` on the CPU, where a dense mask is slow.
    """
    return _argmax_and_max(planes)[0]


def _argmax_and_max(planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``first_argmax`` of ``planes`` and their maximum, which the running maximum leaves behind."""
    best = planes[0].clone()
    index = torch.zeros(planes.shape[1:], dtype=torch.uint8, device=planes.device)
    won = torch.empty(planes.shape[1:], dtype=torch.bool, device=planes.device)
    marked = torch.empty_like(index)
    for k in range(1, planes.shape[0]):
        torch.gt(planes[k], best, out=won)
        torch.maximum(index, torch.mul(won.view(torch.uint8), k, out=marked), out=index)
        torch.maximum(best, planes[k], out=best)
    return index, best


def nucleus_maps(values: torch.Tensor, n_semantic: int, *, logits: bool = True,
                 top: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(n_semantic + 1, h, w)`` uint8: the semantic probabilities and p(inside), times ``PROB_SCALE``.

    What the nuclei post-processing reads of a blended region besides the ternary argmax: a quarter
    of the float32 logits' bytes, computed where the network runs, each rounded half up.
    ``logits=False`` takes probabilities as they are; ``top``, the semantic logits' maximum, when
    known; ``out``, the tensor to write. Overwrites ``values`` (softmax in place: no region-sized
    temporaries).
    """
    sem, ter = values[:n_semantic], values[n_semantic:]
    half = torch.full((), 0.5, device=values.device)
    if logits:  # exp(l - top) / sum, times PROB_SCALE, plus a half: one multiply-add
        torch.addcmul(half, sem, _exp_shifted_(sem, top), value=PROB_SCALE, out=sem)
        inside = _inside_probability_(ter)
    else:
        sem.mul_(PROB_SCALE).add_(half)
        inside = ter[1]
    if out is None:
        out = torch.empty((n_semantic + 1, *values.shape[1:]), dtype=torch.uint8, device=values.device)
    out[:n_semantic] = sem  # float to uint8 truncates: floor(p * PROB_SCALE + 0.5)
    out[n_semantic] = inside.mul_(PROB_SCALE).add_(half)
    return out


def _exp_shifted_(planes: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """The numerators of a softmax over the first dimension, ``exp(x - max)``, in place; returns
    the reciprocal of their sum. ``top``, the planes' maximum, when known (else a running maximum:
    faster than ``amax(0)``)."""
    if top is None:
        top = planes[0].clone()
        for plane in planes[1:]:
            torch.maximum(top, plane, out=top)
    planes.sub_(top).exp_()
    return planes.sum(0).reciprocal_()


def _inside_probability_(ter: torch.Tensor) -> torch.Tensor:
    """p(inside) from ``(3, h, w)`` ternary logits, ``1 / (1 + exp(t_0 - t_1) + exp(t_2 - t_1))``:
    two exponentials a pixel, not three. Overwrites ``ter``; the result is a view of it."""
    ter[0].sub_(ter[1]).exp_()
    ter[2].sub_(ter[1]).exp_()
    return ter[0].add_(1.0).add_(ter[2]).reciprocal_()


def nucleus_inputs(sem: np.ndarray, ter: np.ndarray, *, logits: bool = True,
                   valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ternary argmax, nucleus_maps)`` as numpy uint8 arrays, from whole-region float maps.

    For callers holding ``(C, h, w)`` semantic and ``(3, h, w)`` ternary logits (or probabilities):
    the same maps the engine hands the nuclei sink; ``valid`` False pixels are background.
    """
    if ter.ndim != 3 or ter.shape[0] != 3:
        raise ValueError(f"ternary maps must be (3, h, w), got shape {ter.shape}")
    if sem.ndim != 3 or sem.shape[1:] != ter.shape[1:] or sem.shape[0] < 2:
        raise ValueError(f"semantic maps must be (C >= 2, {ter.shape[1]}, {ter.shape[2]}), got shape {sem.shape}")
    values = torch.from_numpy(np.concatenate((sem, ter)).astype(np.float32, copy=False))
    covered = torch.ones(ter.shape[1:], dtype=torch.bool) if valid is None else torch.from_numpy(valid)
    ternary = class_maps(values, covered, sem.shape[0])[1]
    return ternary.numpy(), nucleus_maps(values, sem.shape[0], logits=logits).numpy()
