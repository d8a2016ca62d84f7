"""Nuclei as objects: instances from the two heads, per-nucleus class, measurements, polygons.

Inputs are uint8 maps of a blended region: the ternary argmax (0 background, 1 inside, 2 boundary;
0 where nothing was covered) and the semantic probabilities and p(inside) times ``PROB_SCALE``
(``model.blending.nucleus_maps``). They are a quarter of the float32 logits' bytes, so a block
travels cheaply to a worker process, and they are made where the network runs.

Instances (``instance_labels``):

1. Foreground is ``ternary != background`` (inside ∪ boundary); seeds are 4-connected ``inside``
   regions, minus specks under ``min_seed_um2``.
2. A foreground component holding one seed is that seed's nucleus; one with no seed (a small
   nucleus predicted as all boundary) is a nucleus of its own. Only components with several seeds
   run a watershed, on ``1 - p(inside)`` over the component, so the boundary class splits touching
   nuclei. Each such watershed sees one component's crop, never the block around it.
3. Objects under ``min_area_um2`` are dropped; areas are in µm² so the threshold means the same at
   every mpp.

Nuclei are numbered by their foreground component (raster order of the components), the extra
nuclei of split components after all components; each nucleus's area, centroid and box come with
its component (counted on the component's runs along the rows), and only split components are
counted again, on their crops.

Class (``classify``): the cell type (semantic classes 1..4) with the highest mean probability over
the nucleus, or ``other`` when the mean background probability beats all four (MoNuSAC labels only
four types; fibroblasts and the like are found by the ternary head). Confidence is that mean.

Blocks (``block_nuclei``, run by ``model.nuclei.NucleusSink``): each block is post-processed on its
region (inner + margin) and keeps the nuclei whose centroid lies in its inner box. With
``EngineOptions.margin >= nucleus_margin_px(mpp)`` any nucleus up to ``NUCLEUS_MARGIN_UM`` across that
is owned by a block lies whole in its region, so the result equals post-processing the whole image
at once. Larger objects are counted as
``oversized`` in the stats (they may be cut or kept twice). Only the foreground components whose box
meets the inner box can hold an owned nucleus: the others are left whole, and seeds, watersheds and
classes are worked out on the window around the rest (``find_nuclei(keep=...)``).

Polygons: OpenCV's border following gives the outer boundary pixel centres (one trace of the whole
foreground for the nuclei that stand apart, one per nucleus for the others), grown by half a pixel
(mitred) onto the pixel edges and simplified (GEOS's Douglas-Peucker, ``SIMPLIFY_PX``).

Coordinates: pixel ``(r, c)`` of the analysis level covers ``[c, c+1) x [r, r+1)``; centroids and
polygons use these continuous coordinates, times ``view.l0_per_px`` for level-0 slide pixels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
from PIL import Image
from scipy import ndimage, sparse
from skimage.segmentation._watershed_cy import watershed_raveled  # the routine behind watershed()

from model.analysis import MPP_TOLERANCE
from model.errors import OptionsError
from model.tiling import Box

NUCLEUS_MARGIN_UM = 32.0  # largest nucleus (µm across) whose block ownership is exact
MIN_AREA_UM2 = 8.0  # smaller objects are dropped (a 3.2 µm disc)
MIN_SEED_UM2 = 1.0  # smaller inside-specks do not seed a nucleus of their own
SIMPLIFY_PX = 0.5  # polygon simplification tolerance, analysis pixels
PROB_SCALE = 255  # the nuclei maps hold probabilities as round(p * PROB_SCALE) in uint8


def nucleus_margin_px(mpp: float) -> int:
    """Blended pixels around each block that ``NucleusSink`` needs at ``mpp`` µm/px."""
    if not mpp > 0:
        raise OptionsError(f"mpp must be positive, got {mpp}")
    return math.ceil(NUCLEUS_MARGIN_UM / mpp)


def engine_margin(model_mpp: float) -> int:
    """``EngineOptions.margin`` for ``NucleusSink`` with a model at ``model_mpp``.

    The analysis level's mpp is within ``MPP_TOLERANCE`` of the model's, so this covers it.
    """
    return nucleus_margin_px(model_mpp / (1 + MPP_TOLERANCE))


@dataclass(frozen=True)
class PostprocessParams:
    """Thresholds in physical units."""

    min_area_um2: float = MIN_AREA_UM2
    min_seed_um2: float = MIN_SEED_UM2
    simplify_px: float = SIMPLIFY_PX

    def validate(self) -> None:
        for name in ("min_area_um2", "min_seed_um2", "simplify_px"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise OptionsError(f"{name} must be a finite number >= 0, got {value}")


@dataclass
class Nuclei:
    """Instances of one region; per-nucleus arrays are indexed by ``label - 1``."""

    labels: np.ndarray  # (h, w) int32, 0 = background, 1..n
    area_px: np.ndarray  # (n,) int64
    centroid_xy: np.ndarray  # (n, 2) float64, continuous region coordinates
    mean_prob: np.ndarray  # (n, C) float64 mean semantic probabilities
    class_index: np.ndarray  # (n,) int64: 0..C-2 cell types (semantic class k+1), C-1 = other
    confidence: np.ndarray  # (n,) float64
    box: np.ndarray  # (n, 4) int64 (y0, x0, y1, x1): a box holding the nucleus

    @property
    def n(self) -> int:
        return len(self.area_px)


def instance_labels(
    ternary: np.ndarray,
    inside_prob: np.ndarray,
    *,
    mpp: float,
    params: PostprocessParams = PostprocessParams(),
) -> np.ndarray:
    """Sequential instance labels ``(h, w)`` int32 from the ternary argmax and uint8 p(inside)."""
    return _instances(ternary, inside_prob, mpp, params).labels


@dataclass
class _Labelled:
    """Instance labels, their pixels (flat indices ``px``, labels ``lab`` there; ``px`` may hold some
    pixels labelled 0, whose ``lab`` is 0), and per label
    (indexed by label; row 0 unused) its pixel count, centroid (continuous x, y) and a box
    ``(y0, x0, y1, x1)`` holding it (its foreground component's, for split components)."""

    labels: np.ndarray
    px: np.ndarray
    lab: np.ndarray
    area: np.ndarray
    centroid: np.ndarray
    box: np.ndarray


def _instances(ternary: np.ndarray, inside_prob: np.ndarray, mpp: float, params: PostprocessParams,
               keep: Box | None = None) -> _Labelled:
    params.validate()
    if ternary.ndim != 2 or inside_prob.shape != ternary.shape:
        raise ValueError(f"ternary (h, w) and p(inside) of the same shape expected, got {ternary.shape} "
                         f"and {inside_prob.shape}")
    px_area = mpp * mpp
    foreground = ternary > 0
    comps = _Components.of(foreground)
    live, window = _window(comps, keep, ternary.shape)
    win = np.s_[window.y0:window.y1, window.x0:window.x1]
    inside = ternary[win] == 1
    seed_px = np.flatnonzero(inside)
    seeds, n = _label(inside)
    seed_at = seeds.ravel().take(seed_px)
    seed_lut, n_seeds = _keep_lut(np.bincount(seed_at, minlength=n + 1) >= math.ceil(params.min_seed_um2 / px_area))
    grown = _grow(_Seeds(seeds, seed_lut, n_seeds, _first_pixels(seed_at, seed_px, n), window), comps, live,
                  inside_prob)
    if window.area < foreground.size:
        framed = np.zeros_like(foreground)
        framed[win] = foreground[win]
        foreground = framed
    # every foreground pixel gets a label, so the labelled pixels are found on the boolean mask
    return _drop_small(grown, np.flatnonzero(foreground), math.ceil(params.min_area_um2 / px_area))


def _window(comps: _Components, keep: Box | None, shape: tuple[int, ...]) -> tuple[np.ndarray, Box]:
    """The components that may hold a nucleus whose centroid lies in ``keep`` (those whose box meets
    it: a centroid lies in its nucleus's box, which lies in its component's), as a mask by component
    (row 0 False), and the box holding them and ``keep``. All components and the whole region
    without ``keep``."""
    whole = Box(0, 0, shape[1], shape[0])
    live = np.ones(comps.n + 1, bool)
    live[0] = False
    if keep is None:
        return live, whole
    y0, x0, y1, x1 = comps.box.T
    live &= (y0 < keep.y1) & (y1 > keep.y0) & (x0 < keep.x1) & (x1 > keep.x0)
    rows = comps.box[live]
    window = Box(int(rows[:, 1].min(initial=keep.x0)), int(rows[:, 0].min(initial=keep.y0)),
                 int(rows[:, 3].max(initial=keep.x1)), int(rows[:, 2].max(initial=keep.y1)))
    return live, window.intersect(whole) or whole


def _first_pixels(at: np.ndarray, px: np.ndarray, n: int) -> np.ndarray:
    """A pixel (flat index) of each label 0..n (row 0 unused) from the labelled pixels ``px`` in
    raster order and their labels ``at``: with labels numbered in raster order (``_label``), each
    label's first pixel is where the labels first pass their running maximum."""
    first = np.zeros(n + 1, np.int64)
    if not len(at):
        return first
    new = np.empty(len(at), bool)
    new[0] = True
    np.greater(at[1:], np.maximum.accumulate(at[:-1]), out=new[1:])
    if int(new.sum()) == n:
        first[1:] = px[new]
    else:  # not numbered in raster order: any pixel of each label
        first[at] = px
    return first


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask, numbered in raster order (as ``ndimage.label``,
    about twice as fast)."""
    count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    return labels, count - 1


@dataclass
class _Components:
    """4-connected components of a mask (``_label``) with each one's pixel count, centroid
    (continuous x, y) and box ``(y0, x0, y1, x1)``; row 0 is the background."""

    labels: np.ndarray
    n: int
    area: np.ndarray
    centroid: np.ndarray
    box: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray) -> _Components:
        labels, n = _label(mask)
        return cls(labels, n, *_run_stats(labels, n))


def _run_stats(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts ``(n + 1,)``, centroids ``(n + 1, 2)`` (continuous x, y; exact integer sums, as
    ``_area_centroid``) and boxes ``(n + 1, 4)`` of labels 0..n (row 0 unused) from the runs of equal
    labels along the rows: a run per label and row, a few percent of the pixels (OpenCV's statistics
    pass visits every pixel, and costs three times the labelling)."""
    h, w = labels.shape
    starts = np.empty((h, w), bool)
    starts[:, 0] = True
    np.not_equal(labels[:, 1:], labels[:, :-1], out=starts[:, 1:])
    at = np.flatnonzero(starts)
    length = np.diff(at, append=labels.size)  # a row's last run ends where the next row's first starts
    lab = labels.ravel()[at]
    on = lab != 0
    at, length, lab = at[on], length[on], lab[on]
    row, col = np.divmod(at, w)
    area = np.bincount(lab, length, n + 1).astype(np.int64)
    sums = np.stack([np.bincount(lab, length * (2 * col + length - 1) // 2, n + 1),
                     np.bincount(lab, length * row, n + 1)], axis=1)
    box = np.zeros((n + 1, 4), np.int64)
    box[1:, :2] = (h, w)
    np.minimum.at(box[:, 0], lab, row)
    np.minimum.at(box[:, 1], lab, col)
    np.maximum.at(box[:, 2], lab, row + 1)
    np.maximum.at(box[:, 3], lab, col + length)
    return area, _centroids(sums, area), box


def _keep_lut(keep: np.ndarray) -> tuple[np.ndarray, int]:
    """Lookup table old label -> new label (0 for dropped ones and for 0), and the count kept."""
    keep = keep.copy()
    keep[0] = False
    k = int(keep.sum())
    lut = np.zeros(len(keep), dtype=np.int32)
    lut[keep] = np.arange(1, k + 1, dtype=np.int32)
    return lut, k


@dataclass
class _Seeds:
    """Seeds labelled on ``window`` (``labels``, window-sized), numbered again by ``lut`` (``n`` kept),
    and a pixel of each (flat window index, by its label in ``labels``)."""

    labels: np.ndarray
    lut: np.ndarray
    n: int
    pixel: np.ndarray
    window: Box

    def components(self, comp: np.ndarray) -> np.ndarray:
        """The foreground component of each kept seed (row 0 unused; region-sized ``comp``)."""
        row, col = np.divmod(self.pixel[1:], self.window.width)
        seed_comp = np.zeros(self.n + 1, dtype=np.int64)
        seed_comp[self.lut[1:]] = comp[row + self.window.y0, col + self.window.x0]  # dropped seeds land on 0
        return seed_comp


def _grow(seeds: _Seeds, comps: _Components, live: np.ndarray, inside_prob: np.ndarray) -> _Labelled:
    """Assign every foreground pixel to a nucleus. A component with one seed or none is one nucleus
    and keeps its component number, and so does every component that is not ``live``; in a live
    component with several seeds, the first seed's nucleus keeps it and the others are numbered after
    all components. The result's ``px`` and ``lab`` are left empty."""
    comp, n_comp = comps.labels, comps.n
    seed_comp = seeds.components(comp)
    per_comp = np.bincount(seed_comp[1:], minlength=n_comp + 1)
    per_comp[~live] = 0
    empty = np.zeros(0, np.int64)
    split = np.flatnonzero(per_comp[1:] > 1) + 1
    if not len(split):
        return _Labelled(comp, empty, empty, comps.area, comps.centroid, comps.box)
    shared = np.flatnonzero(per_comp[seed_comp[1:]] > 1) + 1  # the seeds of split components
    _, first = np.unique(seed_comp[shared], return_index=True)
    others = np.setdiff1d(shared, shared[first], assume_unique=True)
    seed_label = np.zeros(seeds.n + 1, dtype=np.int32)
    seed_label[shared[first]] = seed_comp[shared[first]]
    seed_label[others] = np.arange(n_comp + 1, n_comp + 1 + len(others), dtype=np.int32)
    rows = np.concatenate([np.arange(n_comp + 1), seed_comp[others]])  # a new nucleus starts with its component's box
    grown = _Labelled(comp, empty, empty, comps.area[rows], comps.centroid[rows], comps.box[rows])
    _split_components(grown, seeds, seed_label[seeds.lut], inside_prob, split)
    return grown


def _split_components(grown: _Labelled, seeds: _Seeds, marker_lut: np.ndarray, inside_prob: np.ndarray,
                      split: np.ndarray) -> None:
    """Watershed of the components ``split`` (labelled in ``grown.labels``, boxes in ``grown.box``, all
    inside the seeds' window) on ``1 - p(inside)``, markers ``marker_lut[seeds.labels]``; written into
    ``grown`` (its labels, and the areas and centroids of every nucleus in those components)."""
    labels = grown.labels
    boxes = grown.box[split]
    crops = [np.s_[y0:y1, x0:x1] for y0, x0, y1, x1 in boxes.tolist()]
    dy, dx = seeds.window.y0, seeds.window.x0
    in_window = [np.s_[y0 - dy:y1 - dy, x0 - dx:x1 - dx] for y0, x0, y1, x1 in boxes.tolist()]
    masks = [labels[crop] == c for crop, c in zip(crops, split.tolist(), strict=True)]
    markers = [np.where(m, marker_lut[seeds.labels[w]], 0) for m, w in zip(masks, in_window, strict=True)]
    stack = _CropStack(masks, [PROB_SCALE - inside_prob[crop] for crop in crops], markers)
    stack.flood()
    for crop, mask, out in zip(crops, masks, stack.crops(), strict=True):
        np.copyto(labels[crop], out, where=mask)
    # every flooded pixel: its label, and its place in the region from its place in the stack
    at = np.flatnonzero(stack.inside)
    lab = stack.out.ravel()[at]
    row = at // stack.width
    col = at - row * stack.width
    k = stack.crop_of_row()[row]
    area, centroid = _area_centroid(lab, row + (boxes[:, 0] - stack.tops)[k], col + boxes[:, 1][k], int(lab.max()))
    ids = np.flatnonzero(area)
    grown.area[ids], grown.centroid[ids] = area[ids], centroid[ids]


class _CropStack:
    """2-D crops stacked in one array for scikit-image's flooding routine, each framed by pixels
    outside every mask (a row above each crop and one below the last, a column after the widest)."""

    def __init__(self, masks: list[np.ndarray], elevation: list[np.ndarray], markers: list[np.ndarray]) -> None:
        self.shapes = [m.shape for m in masks]
        self.width = max(w for _, w in self.shapes) + 1
        self.tops = np.cumsum([1] + [h + 1 for h, _ in self.shapes])[:-1]
        height = int(self.tops[-1]) + self.shapes[-1][0] + 1
        self.image = np.zeros((height, self.width), np.float64)
        self.inside = np.zeros((height, self.width), np.int8)
        self.out = np.zeros((height, self.width), np.int32)
        for top, (h, w), m, e, k in zip(self.tops.tolist(), self.shapes, masks, elevation, markers, strict=True):
            self.inside[top:top + h, :w] = m
            self.image[top:top + h, :w] = e
            self.out[top:top + h, :w] = k

    def flood(self) -> None:
        """scikit-image's ``watershed(e, m, connectivity=1, mask=k)`` of each crop, without its per-call
        validation and padding (most of its cost on a nucleus-sized crop): its flooding routine on
        each crop's rows in turn. Only the marker pixels next to an unlabelled pixel of the mask enter
        its queue (a seed's inner pixels, most of its pixels, could never label anything), so where
        elevations tie, equal pixels may be taken in another order than scikit-image's (both
        arbitrary); without ties the labels are scikit-image's (tests check both). One flooding per
        crop, because the queue breaks such ties by its heap positions: crops flooded together would
        depend on each other."""
        width = self.width
        # 4-neighbours of a raveled index, in scikit-image's order; the strides in elements
        neighbours, strides = np.array([-width, -1, 1, width], np.intp), np.array([width, 1], np.intp)
        image, inside, out = self.image.ravel(), self.inside.ravel(), self.out.ravel()
        starts = (self.tops - 1) * width
        stops = (self.tops + np.array([h for h, _ in self.shapes]) + 1) * width
        seeds = np.flatnonzero(self._front())
        cuts = np.searchsorted(seeds, starts)
        for a, b, lo, hi in zip(starts.tolist(), stops.tolist(), cuts.tolist(), [*cuts[1:].tolist(), len(seeds)],
                                strict=True):
            watershed_raveled(image[a:b], seeds[lo:hi] - a, neighbours, inside[a:b], strides, 0.0, out[a:b], False)

    def _front(self) -> np.ndarray:
        """Marker pixels with a 4-neighbour in the mask that no marker holds (the frame keeps crops apart)."""
        marked = self.out != 0
        free = (self.inside != 0) & ~marked
        near = np.zeros_like(marked)
        near[1:] |= free[:-1]
        near[:-1] |= free[1:]
        near[:, 1:] |= free[:, :-1]
        near[:, :-1] |= free[:, 1:]
        return marked & near

    def crop_of_row(self) -> np.ndarray:
        """The crop each row of the stack holds (a frame row: the crop after it, or the last)."""
        rows = np.repeat(np.arange(len(self.shapes)), [h + 1 for h, _ in self.shapes])
        return np.append(rows, len(self.shapes) - 1)

    def crops(self) -> list[np.ndarray]:
        """Each crop's labels."""
        return [self.out[top:top + h, :w] for top, (h, w) in zip(self.tops.tolist(), self.shapes, strict=True)]


def _drop_small(grown: _Labelled, px: np.ndarray, min_px: int) -> _Labelled:
    """``grown`` with its pixels ``px`` (those of dropped labels then labelled 0) and only the labels of
    ``min_px`` pixels or more, numbered 1..n again: each dropped label is cleared in its box, and the
    highest kept labels take the free numbers, so only the small boxes of the labels that go or move
    are touched."""
    labels, area = grown.labels, grown.area
    small = np.flatnonzero(area[1:] < max(min_px, 1)) + 1
    rows = np.arange(len(area))
    if len(small):
        n = len(area) - 1 - len(small)
        for label in small.tolist():
            _relabel(labels, grown.box[label], label, 0)
        movers = np.setdiff1d(np.arange(n + 1, len(area)), small, assume_unique=True)
        for hole, label in zip(small[small <= n].tolist(), movers.tolist(), strict=True):
            _relabel(labels, grown.box[label], label, hole)
            rows[hole] = label
        rows = rows[:n + 1]
    return _Labelled(labels, px, labels.ravel().take(px), area[rows], grown.centroid[rows], grown.box[rows])


def _relabel(labels: np.ndarray, box: np.ndarray, old: int, new: int) -> None:
    """Give the pixels of ``old`` (all inside ``box``, ``(y0, x0, y1, x1)``) the label ``new``."""
    y0, x0, y1, x1 = (int(v) for v in box)
    crop = labels[y0:y1, x0:x1]
    crop[crop == old] = new


def measure_nuclei(labels: np.ndarray, sem_prob: np.ndarray) -> Nuclei:
    """Area, centroid, mean semantic probabilities, class and confidence of each label.

    ``sem_prob`` is ``(C, h, w)`` uint8, probabilities times ``PROB_SCALE``.
    """
    return _measure(_pixel_stats(labels), sem_prob)


def _pixel_stats(labels: np.ndarray) -> _Labelled:
    """Any label image's pixels and per-label area, centroid and box, by counting its pixels."""
    px = np.flatnonzero(labels)
    lab = labels.ravel()[px]
    n = int(lab.max(initial=0))
    area, centroid = _area_centroid(lab, *np.divmod(px, labels.shape[1]), n)
    return _Labelled(labels, px, lab, area, centroid, _boxes(labels, n))


def _area_centroid(lab: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts ``(n + 1,)`` and centroids ``(n + 1, 2)`` (continuous x, y) of labels 0..n from
    their pixels' labels, rows and columns (whole-region coordinates: exact integer sums, so a crop
    and the whole region give the same centroids to the bit)."""
    area = np.bincount(lab, minlength=n + 1)
    sums = np.stack([np.bincount(lab, cols, n + 1), np.bincount(lab, rows, n + 1)], axis=1)
    return area, _centroids(sums, area)


def _centroids(sums: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Continuous centroids ``(x, y)`` (pixel centres at +0.5) from each label's column and row sums
    ``(n + 1, 2)`` and pixel counts; 0.5 for empty labels."""
    return sums / np.maximum(area, 1)[:, None] + 0.5


def _boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """``(n + 1, 4)`` boxes ``(y0, x0, y1, x1)`` of labels 1..n (row 0 and absent labels: empty)."""
    box = np.zeros((n + 1, 4), np.int64)
    for i, found in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        if found is not None:
            box[i] = (found[0].start, found[1].start, found[0].stop, found[1].stop)
    return box


def _measure(inst: _Labelled, sem_prob: np.ndarray) -> Nuclei:
    labels, px, lab = inst.labels, inst.px, inst.lab
    n = len(inst.area) - 1
    c = sem_prob.shape[0]
    if sem_prob.ndim != 3 or sem_prob.shape[1:] != labels.shape or c < 2:
        raise ValueError(f"semantic maps must be (C >= 2, {labels.shape}), got shape {sem_prob.shape}")
    safe = np.maximum(inst.area[1:], 1)
    mean = _label_sums(lab, n, np.take(sem_prob.reshape(c, -1), px, axis=1))[1:] / (PROB_SCALE * safe[:, None])
    cls, conf = classify(mean)
    return Nuclei(labels, inst.area[1:], inst.centroid[1:], mean, cls, conf, inst.box[1:])


def _label_sums(lab: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    """``(n + 1, C)`` sums of ``values`` ``(C, k)`` uint8 per label ``lab`` ``(k,)``: one sparse product
    (a label-by-pixel indicator matrix times the values laid out pixel-major, filled a channel at a
    time in uint8 and then cast: a transposing copy, or filling float32 columns, costs more than the
    product), about twice as fast as a ``bincount`` per channel. Exact in float32 for objects under
    65,000 pixels."""
    k = len(lab)
    onehot = sparse.csc_matrix((np.ones(k, np.float32), lab, np.arange(k + 1)), shape=(n + 1, k))
    columns = np.empty((k, len(values)), np.uint8)
    for i, channel in enumerate(values):
        columns[:, i] = channel
    return np.asarray(onehot @ columns.astype(np.float32), dtype=np.float64)


def classify(mean_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class index (cell type ``k`` is semantic class ``k+1``; ``C-1`` is other) and confidence."""
    cells = mean_prob[:, 1:]
    best = cells.argmax(axis=1) if len(cells) else np.zeros(0, dtype=np.int64)
    best_prob = cells.max(axis=1, initial=0.0)
    is_other = mean_prob[:, 0] > best_prob
    cls = np.where(is_other, cells.shape[1], best)
    return cls.astype(np.int64), np.where(is_other, mean_prob[:, 0], best_prob)


def find_nuclei(
    ternary: np.ndarray,
    probs: np.ndarray,
    *,
    mpp: float,
    params: PostprocessParams = PostprocessParams(),
    keep: Box | None = None,
) -> Nuclei:
    """Instances and their measurements from one region's ternary argmax and ``nucleus_maps``
    (``model.blending.nucleus_inputs`` makes both from float logits).

    ``keep`` (region coordinates): only the nuclei whose centroid lies in it are needed, so the
    components that cannot hold one are not split, and seeds, splits and classes are worked out on
    the window around the others only; the nuclei kept are those of the whole region.
    """
    return _measure(_instances(ternary, probs[-1], mpp, params, keep), probs[:-1])


def nucleus_polygons(
    labels: np.ndarray,
    ids: np.ndarray,
    *,
    boxes: np.ndarray | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    tolerance_px: float = SIMPLIFY_PX,
) -> np.ndarray:
    """Simplified, valid, counter-clockwise shapely Polygons of ``ids`` (outer boundary, no holes).

    ``boxes``: a box ``(y0, x0, y1, x1)`` holding each of ``ids`` (``Nuclei.box``); found in
    ``labels`` when not given. Coordinates are ``(region coordinate + origin) * scale``: with
    ``origin`` the region's analysis offset and ``scale = view.l0_per_px`` they are level-0 slide pixels.
    """
    if len(ids) == 0:
        return np.empty(0, dtype=object)
    if boxes is None:
        boxes = _boxes(labels, int(ids.max()))[ids]
    rings = _outer_contours(labels, ids, boxes)
    raw = _pixel_edges(rings, origin, scale)  # boundary pixels -> pixel edges
    odd = shapely.get_type_id(raw) != shapely.GeometryType.POLYGON
    raw[odd] = [_largest_polygon(g) for g in raw[odd]]
    holed = shapely.get_num_interior_rings(raw) > 0
    raw[holed] = shapely.polygons(shapely.get_exterior_ring(raw[holed]))  # no holes
    polys = _simplified(raw, tolerance_px * scale)
    bad = ~shapely.is_valid(polys) | shapely.is_empty(polys)
    if bad.any():  # rare self-touching results: redo those with the topology-preserving simplifier
        polys[bad] = shapely.simplify(raw[bad], tolerance_px * scale, preserve_topology=True)
        still = ~shapely.is_valid(polys)
        polys[still] = [_largest_polygon(shapely.make_valid(p)) for p in polys[still]]
    return np.asarray(shapely.orient_polygons(polys, exterior_cw=False), dtype=object)


def _outer_contour(labels: np.ndarray, label: int, box: list[int]) -> np.ndarray:
    """Outer boundary pixels of ``label`` (inside ``box``, ``(y0, x0, y1, x1)``) as ``(k, 2)`` int32
    x, y region pixel indices (their centres lie 0.5 further).

    OpenCV's border following (``findContours``), the longest outer contour when the label has
    several parts; ``nucleus_polygons`` grows the ring of centres by half a pixel onto the pixel edges.
    """
    y0, x0, y1, x1 = box
    mask = (labels[y0:y1, x0:x1] == label).view(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
    if not contours:
        raise ValueError(f"label {label} is not in the label image inside {tuple(box)}")
    return (contours[0] if len(contours) == 1 else max(contours, key=len)).reshape(-1, 2)


def _simplified(polys: np.ndarray, tolerance: float) -> np.ndarray:
    """Hole-free polygons with their exteriors simplified by GEOS's Douglas-Peucker: the points
    ``shapely.simplify(polys, tolerance, preserve_topology=False)`` keeps, in two thirds of the time,
    because rings skip the validity check (and ``buffer(0)`` repair) GEOS runs on each polygon it
    simplifies; ``nucleus_polygons`` checks the results once. Empty where a ring collapses."""
    rings = shapely.simplify(shapely.get_exterior_ring(polys), tolerance, preserve_topology=False)
    out = np.full(len(polys), shapely.Polygon(), dtype=object)
    whole = (shapely.get_type_id(rings) == shapely.GeometryType.LINEARRING) & ~shapely.is_empty(rings)
    out[whole] = shapely.polygons(rings[whole])
    return out


def _outer_contours(labels: np.ndarray, ids: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """``_outer_contour`` of each of ``ids`` (boxes ``(y0, x0, y1, x1)`` holding them), the same points.

    One border following of the whole foreground (``labels > 0``, within the boxes' union) gives
    every nucleus that stands apart its contour, at a fraction of the cost of tracing nuclei one by
    one: a contour whose every vertex lies on one label is that label's outer contour, because the
    trace of a whole component, started at its first pixel in raster order, is the trace of its mask
    alone. Nuclei that touch another (split components, or 4-components that meet at a corner, which
    the 8-connected trace joins) and nuclei inside another's hole are traced alone, and so is a label
    seen in several contours (a label in several parts, which ``find_nuclei`` does not make: its
    nuclei are 4-connected; a part hidden in another's hole would go unseen).
    """
    y0, x0 = (int(v) for v in boxes[:, :2].min(axis=0))
    y1, x1 = (int(v) for v in boxes[:, 2:].max(axis=0))
    window = labels[y0:y1, x0:x1]
    contours, _ = cv2.findContours((window > 0).view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                   offset=(x0, y0))
    found = np.full(int(ids.max()) + 1, -1, np.int64)  # by label: its own contour, or -1
    if contours:
        counts = np.array([len(c) for c in contours])
        points = np.concatenate(contours).reshape(-1, 2)
        owner = labels[points[:, 1], points[:, 0]]
        first = np.cumsum(counts) - counts
        alone = np.logical_and.reduceat(owner == np.repeat(owner[first], counts), first)
        alone &= owner[first] < len(found)  # labels above the ids are never asked for
        mine = owner[first][alone]
        found[mine] = np.flatnonzero(alone)
        found[mine[np.bincount(mine)[mine] > 1]] = -1  # a label in several parts
        mixed = owner[np.repeat(~alone, counts)]
        found[mixed[mixed < len(found)]] = -1  # ... or with a part among other labels
    rings = []
    for i, box, k in zip(ids.tolist(), boxes.tolist(), found[ids].tolist(), strict=True):
        rings.append(contours[k].reshape(-1, 2) if k >= 0 else _outer_contour(labels, i, box))
    return rings


def _pixel_edges(rings: list[np.ndarray], origin: tuple[float, float] = (0.0, 0.0), scale: float = 1.0) -> np.ndarray:
    """Each ring of boundary pixels (``_outer_contour``) as the ring of their centres grown by half a
    pixel onto the pixel edges (mitred), in the coordinates ``(x + origin) * scale``.

    Most rings are offset in numpy (each edge moved out by 0.5, corners mitred), which is the same
    point set as GEOS's mitred buffer for traced region boundaries whenever no corner turns by more
    than 120 degrees (``_mitred_offsets``); the others (spikes, thin rings) go through ``shapely.buffer``.
    """
    out = np.empty(len(rings), dtype=object)
    shift = np.asarray(origin, dtype=np.float64)
    centre = shift + 0.5
    counts = np.array([len(r) for r in rings])
    wide = np.flatnonzero(counts >= 3)
    exact = wide[:0]
    if len(wide):
        vertices = (np.concatenate([rings[i] for i in wide]) + centre) * scale
        polys, ok = _mitred_offsets(vertices, counts[wide], 0.5 * scale)
        exact = wide[ok]
        out[exact] = polys[ok]
    rest = np.setdiff1d(np.arange(len(rings)), exact)
    if len(rest):
        grown = shapely.buffer(_ring_geometries([rings[i] for i in rest]), 0.5, cap_style="square",
                               join_style="mitre", mitre_limit=2.0)
        out[rest] = shapely.transform(grown, lambda xy: (xy + shift) * scale)
    return out


def _mitred_offsets(v: np.ndarray, n: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Polygons of the closed rings ``v`` (``n`` points each, concatenated) offset outwards by ``r``,
    and whether each is exact (every corner's mitre within twice ``r``).

    For the traced outer boundaries of 4-connected regions this is enough for a simple ring (the
    trace hugs the region, and turns of 45 or 90 degrees cannot bring two offset edges together), so
    GEOS's validity check, about half of the offsets' cost, is not run; tests check it on thousands of
    random regions, and ``nucleus_polygons`` validates what it returns."""
    first = np.cumsum(n) - n
    last = first + n - 1
    nxt, prv = np.arange(1, len(v) + 1), np.arange(-1, len(v) - 1)  # the next and previous point of each
    nxt[last], prv[first] = first, last
    x, y = np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(v[:, 1])  # 1-D gathers: twice as fast
    xn, yn = x[nxt], y[nxt]
    dx, dy = xn - x, yn - y  # edge i runs from point i to the next
    length = np.hypot(dx, dy)
    area = np.add.reduceat(x * yn - xn * y, first)  # twice the signed area
    q = np.repeat(np.sign(area), n) / np.maximum(length, 1e-12)
    nx, ny = dy * q, -dx * q  # outward unit normals
    nxp, nyp = nx[prv], ny[prv]
    cos = nxp * nx + nyp * ny
    m = np.maximum(1 + cos, 1e-12)
    grown = np.stack([x + r * (nxp + nx) / m, y + r * (nyp + ny) / m], axis=1)
    polys = shapely.polygons(shapely.linearrings(grown, indices=np.repeat(np.arange(len(n)), n)))
    return polys, np.logical_and.reduceat((cos > -0.5) & (length > 0), first) & (area != 0)


def _ring_geometries(rings: list[np.ndarray]) -> np.ndarray:
    """Polygons of the rings of boundary pixels' centres, of 3 or more points; lines and points for
    the thinner ones."""
    geoms = np.empty(len(rings), dtype=object)
    counts = np.array([len(r) for r in rings])
    wide = np.flatnonzero(counts >= 3)
    if len(wide):
        coords = np.concatenate([rings[i] for i in wide]) + 0.5
        geoms[wide] = shapely.polygons(shapely.linearrings(coords, indices=np.repeat(np.arange(len(wide)),
                                                                                     counts[wide])))
    for i in np.flatnonzero(counts < 3):
        centres = rings[i] + 0.5
        geoms[i] = shapely.LineString(centres) if counts[i] == 2 else shapely.Point(centres[0])
    return geoms


def _largest_polygon(geom: shapely.Geometry) -> shapely.Geometry:
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon)]
    best = max(parts, key=lambda g: g.area) if parts else shapely.convex_hull(geom)
    return shapely.Polygon(best.exterior) if isinstance(best, shapely.Polygon) else best


@dataclass(frozen=True)
class BlockPlace:
    """Where a block lies and how its nuclei are measured: all a block's post-processing needs
    besides its maps."""

    region: Box
    inner: Box
    bounds: Box  # the analysis level
    mpp: float
    scale: float  # level-0 pixels per analysis pixel
    params: PostprocessParams
    keep_labels: bool = False  # return the region's labels (for instances.png)


@dataclass
class BlockNuclei:
    """The nuclei a block owns, ready to record; per-nucleus arrays in feature order."""

    region: Box
    rings: list[np.ndarray]  # closed exterior rings, (k, 2) x, y in level-0 pixels
    class_index: np.ndarray
    area_um2: np.ndarray
    confidence: np.ndarray
    oversized: int
    timings: dict[str, float]
    labels: np.ndarray | None = None  # region labels, with ``BlockPlace.keep_labels``
    ids: np.ndarray | None = None  # the owned labels, with ``BlockPlace.keep_labels``
    features: list[str] | None = None  # each nucleus's GeoJSON text, when made where it was post-processed


def block_nuclei(place: BlockPlace, ternary: np.ndarray, probs: np.ndarray) -> BlockNuclei:
    """Instances, classes and polygons of the nuclei whose centroid lies in ``place.inner``."""
    t0 = time.perf_counter()
    region = place.region
    keep = place.inner.shift(-region.x0, -region.y0)  # region coordinates
    nuclei = find_nuclei(ternary, probs, mpp=place.mpp, params=place.params, keep=keep)
    ids = np.flatnonzero(_owned(nuclei.centroid_xy, keep)) + 1
    oversized = _count_oversized(nuclei.labels, ids, region, place.bounds)
    t1 = time.perf_counter()
    polys = nucleus_polygons(nuclei.labels, ids, boxes=nuclei.box[ids - 1], origin=(region.x0, region.y0),
                             scale=place.scale,
                             tolerance_px=place.params.simplify_px)
    rings = _exterior_coordinates(polys)
    t2 = time.perf_counter()
    idx = ids - 1
    return BlockNuclei(region, rings, nuclei.class_index[idx], nuclei.area_px[idx] * place.mpp**2,
                       nuclei.confidence[idx], oversized, {"postprocess_s": t1 - t0, "polygons_s": t2 - t1},
                       nuclei.labels if place.keep_labels else None, ids if place.keep_labels else None)


def _exterior_coordinates(polys: np.ndarray) -> list[np.ndarray]:
    """Each polygon's exterior ring as ``(k, 2)`` coordinates (views of one array)."""
    if not len(polys):
        return []
    exteriors = shapely.get_exterior_ring(polys)
    xy = shapely.get_coordinates(exteriors)
    stops = np.cumsum(shapely.get_num_coordinates(exteriors)).tolist()
    return [xy[a:b] for a, b in zip([0, *stops[:-1]], stops, strict=True)]


def _count_oversized(labels: np.ndarray, ids: np.ndarray, region: Box, bounds: Box) -> int:
    """Owned nuclei touching a cut edge of the region: wider than the margin."""
    edges = []
    if region.x0 > bounds.x0:
        edges.append(labels[:, 0])
    if region.x1 < bounds.x1:
        edges.append(labels[:, -1])
    if region.y0 > bounds.y0:
        edges.append(labels[0])
    if region.y1 < bounds.y1:
        edges.append(labels[-1])
    if not edges or not len(ids):
        return 0
    return int(np.isin(ids, np.concatenate(edges)).sum())


def _owned(centroid_xy: np.ndarray, inner: Box) -> np.ndarray:
    """Centroids (continuous analysis coordinates) inside the half-open ``inner`` box."""
    x, y = centroid_xy[:, 0], centroid_xy[:, 1]
    return (x >= inner.x0) & (x < inner.x1) & (y >= inner.y0) & (y < inner.y1)


def write_instances_png(path: str | Path, labels: np.ndarray) -> None:
    """uint32 labels as an RGBA PNG (bytes of the little-endian value)."""
    rgba = np.ascontiguousarray(labels.astype("<u4")).view(np.uint8).reshape(*labels.shape, 4)
    Image.fromarray(rgba).save(path, optimize=False, compress_level=1)


def read_instances_png(path: str | Path) -> np.ndarray:
    """Inverse of ``write_instances_png``."""
    with Image.open(path) as img:
        rgba = np.ascontiguousarray(np.asarray(img.convert("RGBA")))
    return rgba.view("<u4")[..., 0].astype(np.uint32)
