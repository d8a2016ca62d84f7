"""Nuclei as objects: instances from the two heads, per-nucleus class, measurements, polygons.

Instances (``instance_labels``), on the ternary head (0 background, 1 inside, 2 boundary):

1. Foreground is ``argmax != background`` (inside ∪ boundary); seeds are 4-connected ``inside``
   regions, minus specks under ``min_seed_um2``.
2. A foreground component holding one seed is that seed's nucleus; one with no seed (a small
   nucleus predicted as all boundary) is a nucleus of its own. Only components with several seeds
   run a watershed, on ``1 - p(inside)`` over the component, so the boundary class splits touching
   nuclei. Each such watershed sees one component's crop, never the block around it.
3. Objects under ``min_area_um2`` are dropped; areas are in µm² so the threshold means the same at
   every mpp.

Class (``classify``): the cell type (semantic classes 1..4) with the highest mean probability over
the nucleus, or ``other`` when the mean background probability beats all four (MoNuSAC labels only
four types; fibroblasts and the like are found by the ternary head). Confidence is that mean.

Blocks (``NucleusSink``): each block is post-processed on its region (inner + margin) and keeps the
nuclei whose centroid lies in its inner box. With ``EngineOptions.margin >= nucleus_margin_px(mpp)``
any nucleus up to ``NUCLEUS_MARGIN_UM`` across that is owned by a block lies whole in its region, so
the result equals post-processing the whole image at once. Larger objects are counted as
``oversized`` in the stats (they may be cut or kept twice).

Coordinates: pixel ``(r, c)`` of the analysis level covers ``[c, c+1) x [r, r+1)``; centroids and
polygons use these continuous coordinates, times ``view.l0_per_px`` for level-0 slide pixels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image
from scipy import ndimage
from skimage.measure import find_contours
from skimage.segmentation import watershed

from model.analysis import MPP_TOLERANCE
from model.engine import BlockResult, RunContext
from model.errors import OptionsError
from model.geojson import GeoJSONWriter
from model.tiling import Box

NUCLEUS_MARGIN_UM = 32.0  # largest nucleus (µm across) whose block ownership is exact
MIN_AREA_UM2 = 8.0  # smaller objects are dropped (a 3.2 µm disc)
MIN_SEED_UM2 = 1.0  # smaller inside-specks do not seed a nucleus of their own
SIMPLIFY_PX = 0.5  # polygon simplification tolerance, analysis pixels
OTHER = "other"
OTHER_COLOUR = (160, 160, 160)
LYMPHOCYTE = "lymphocyte"
INSTANCES_MAX_PIXELS = 64_000_000  # instances.png only for images up to this size (uint32: 256 MB)
_CROSS = ndimage.generate_binary_structure(2, 1)


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

    @property
    def n(self) -> int:
        return len(self.area_px)


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax (float32 or float64 kept)."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def ternary_masks(ter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(foreground, inside)`` of the ternary argmax (ties go to the lower class, as ``np.argmax``).

    Works on logits and on probabilities alike.
    """
    if ter.ndim != 3 or ter.shape[0] != 3:
        raise ValueError(f"ternary maps must be (3, h, w), got shape {ter.shape}")
    bg, inside, boundary = ter[0], ter[1], ter[2]
    foreground = np.maximum(inside, boundary) > bg
    return foreground, (inside > bg) & (inside >= boundary)


def inside_probability(ter: np.ndarray, *, logits: bool) -> np.ndarray:
    """``p(inside)`` from ternary logits or probabilities."""
    if not logits:
        return np.asarray(ter[1], dtype=np.float32)
    return softmax(ter.astype(np.float32), axis=0)[1]


def instance_labels(
    ter: np.ndarray,
    *,
    mpp: float,
    logits: bool = True,
    params: PostprocessParams = PostprocessParams(),
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Sequential instance labels ``(h, w)`` int32 from ternary maps (see the module docstring)."""
    params.validate()
    foreground, inside = ternary_masks(ter)
    if valid is not None:
        foreground &= valid
        inside &= valid
    px_area = mpp * mpp
    seeds, n_seeds = _seeds(inside, math.ceil(params.min_seed_um2 / px_area))
    labels = _grow(seeds, n_seeds, foreground, ter, logits)
    return _drop_small(labels, math.ceil(params.min_area_um2 / px_area))


def _seeds(inside: np.ndarray, min_px: int) -> tuple[np.ndarray, int]:
    seeds, n = ndimage.label(inside, structure=_CROSS)
    if n == 0 or min_px <= 1:
        return seeds, n
    return _relabel(seeds, np.bincount(seeds.ravel(), minlength=n + 1) >= min_px)


def _relabel(labels: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """Keep labels where ``keep[label]`` (index 0 ignored), renumbered 1..k in order."""
    keep = keep.copy()
    keep[0] = False
    lut = np.zeros(len(keep), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels], int(keep.sum())


def _grow(seeds: np.ndarray, n_seeds: int, foreground: np.ndarray, ter: np.ndarray, logits: bool) -> np.ndarray:
    """Assign every foreground pixel to a seed, component by component."""
    comp, n_comp = ndimage.label(foreground, structure=_CROSS)
    if n_comp == 0:
        return comp
    seed_px = np.flatnonzero(seeds)
    seed_comp = np.zeros(n_seeds + 1, dtype=np.int64)
    seed_comp[seeds.ravel()[seed_px]] = comp.ravel()[seed_px]
    per_comp = np.bincount(seed_comp[1:], minlength=n_comp + 1)
    lut = np.zeros(n_comp + 1, dtype=np.int32)
    single = per_comp[seed_comp[1:]] == 1
    lut[seed_comp[1:][single]] = np.arange(1, n_seeds + 1, dtype=np.int32)[single]
    unseeded = np.flatnonzero(per_comp[1:] == 0) + 1
    lut[unseeded] = np.arange(n_seeds + 1, n_seeds + 1 + len(unseeded), dtype=np.int32)
    labels = lut[comp]
    multi = np.flatnonzero(per_comp[1:] > 1) + 1
    if len(multi):
        boxes = ndimage.find_objects(comp)
        for c in multi:
            _split_component(labels, comp, seeds, ter, boxes[c - 1], int(c), logits)
    return labels


def _split_component(
    labels: np.ndarray, comp: np.ndarray, seeds: np.ndarray, ter: np.ndarray,
    box: tuple[slice, slice], c: int, logits: bool,
) -> None:
    """Watershed of one multi-seed component on ``1 - p(inside)``, written into ``labels``."""
    mask = comp[box] == c
    markers = np.where(mask, seeds[box], 0)
    elevation = 1.0 - inside_probability(ter[(slice(None), *box)], logits=logits)
    grown = watershed(elevation, markers, connectivity=1, mask=mask)
    labels[box][mask] = grown[mask]


def _drop_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    n = int(labels.max(initial=0))
    if n == 0:
        return labels
    return _relabel(labels, np.bincount(labels.ravel(), minlength=n + 1) >= max(min_px, 1))[0]


def measure_nuclei(labels: np.ndarray, sem: np.ndarray, *, logits: bool = True) -> Nuclei:
    """Area, centroid, mean semantic probabilities, class and confidence of each label."""
    n = int(labels.max(initial=0))
    c = sem.shape[0]
    if sem.ndim != 3 or sem.shape[1:] != labels.shape or c < 2:
        raise ValueError(f"semantic maps must be (C >= 2, {labels.shape}), got shape {sem.shape}")
    px = np.flatnonzero(labels)
    lab = labels.ravel()[px]
    area = np.bincount(lab, minlength=n + 1)[1:]
    safe = np.maximum(area, 1)
    rows, cols = np.divmod(px, labels.shape[1])
    sums = np.stack([np.bincount(lab, cols, n + 1)[1:], np.bincount(lab, rows, n + 1)[1:]], axis=1)
    centroid = sums / safe[:, None] + 0.5
    values = sem.reshape(c, -1)[:, px]
    probs = softmax(np.asarray(values, dtype=np.float32), axis=0) if logits else values
    mean = np.stack([np.bincount(lab, probs[k], n + 1)[1:] for k in range(c)], axis=1) / safe[:, None]
    cls, conf = classify(mean)
    return Nuclei(labels, area, centroid, mean, cls, conf)


def classify(mean_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class index (cell type ``k`` is semantic class ``k+1``; ``C-1`` is other) and confidence."""
    cells = mean_prob[:, 1:]
    best = cells.argmax(axis=1) if len(cells) else np.zeros(0, dtype=np.int64)
    best_prob = cells.max(axis=1, initial=0.0)
    is_other = mean_prob[:, 0] > best_prob
    cls = np.where(is_other, cells.shape[1], best)
    return cls.astype(np.int64), np.where(is_other, mean_prob[:, 0], best_prob)


def find_nuclei(
    sem: np.ndarray,
    ter: np.ndarray,
    *,
    mpp: float,
    logits: bool = True,
    params: PostprocessParams = PostprocessParams(),
    valid: np.ndarray | None = None,
) -> Nuclei:
    """Instances and their measurements from one region's semantic and ternary maps."""
    labels = instance_labels(ter, mpp=mpp, logits=logits, params=params, valid=valid)
    return measure_nuclei(labels, sem, logits=logits)


def nucleus_polygons(
    labels: np.ndarray,
    ids: np.ndarray,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    tolerance_px: float = SIMPLIFY_PX,
) -> np.ndarray:
    """Simplified, valid, counter-clockwise shapely Polygons of ``ids`` (outer boundary, no holes).

    Coordinates are ``(region coordinate + origin) * scale``: with ``origin`` the region's analysis
    offset and ``scale = view.l0_per_px`` they are level-0 slide pixels.
    """
    if len(ids) == 0:
        return np.empty(0, dtype=object)
    boxes = ndimage.find_objects(labels, max_label=int(ids.max()))
    rings = [_outer_contour(labels, int(i), boxes[int(i) - 1]) for i in ids]
    counts = np.array([len(r) for r in rings])
    coords = (np.concatenate(rings) + np.asarray(origin)) * scale
    raw = shapely.polygons(shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), counts)))
    polys = shapely.simplify(raw, tolerance_px * scale, preserve_topology=False)  # fast Douglas-Peucker
    bad = ~shapely.is_valid(polys) | shapely.is_empty(polys)
    if bad.any():  # rare self-touching results: redo those with the topology-preserving simplifier
        polys[bad] = shapely.simplify(raw[bad], tolerance_px * scale, preserve_topology=True)
        still = ~shapely.is_valid(polys)
        polys[still] = [_largest_polygon(shapely.make_valid(p)) for p in polys[still]]
    return np.asarray(shapely.orient_polygons(polys, exterior_cw=False), dtype=object)


def _outer_contour(labels: np.ndarray, label: int, box: tuple[slice, slice] | None) -> np.ndarray:
    """Closed ``(k, 2)`` x, y ring around ``label`` in continuous region coordinates."""
    if box is None:
        raise ValueError(f"label {label} is not in the label image")
    mask = np.pad(labels[box] == label, 1).astype(np.float32)
    contour = max(find_contours(mask, 0.5), key=len)  # (row, col) in the padded crop
    offset = np.array([box[1].start - 1 + 0.5, box[0].start - 1 + 0.5])
    return contour[:, ::-1] + offset


def _largest_polygon(geom: shapely.Geometry) -> shapely.Geometry:
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon)]
    best = max(parts, key=lambda g: g.area) if parts else shapely.convex_hull(geom)
    return shapely.Polygon(best.exterior) if isinstance(best, shapely.Polygon) else best


class _Growable:
    """A float32 array that grows by appending chunks (amortised doubling)."""

    def __init__(self) -> None:
        self._data = np.empty(1024, dtype=np.float32)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.size + len(values)
        if need > len(self._data):
            grown = np.empty(max(need, 2 * len(self._data)), dtype=np.float32)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : need] = values
        self.size = need

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]


class NucleusSink:
    """BlockSink: nuclei of each block into a streamed GeoJSON, stats into ``finish()["nuclei"]``.

    ``geojson_path`` None keeps stats only. ``instances_path`` writes a uint32 label image (PNG,
    RGBA bytes of the little-endian label: decode with ``np.asarray(img).view('<u4')[..., 0]``),
    label ``k`` being the ``k``-th GeoJSON feature; refused over ``INSTANCES_MAX_PIXELS``.
    """

    def __init__(
        self,
        geojson_path: str | Path | None = None,
        *,
        params: PostprocessParams = PostprocessParams(),
        instances_path: str | Path | None = None,
    ) -> None:
        params.validate()
        self.params = params
        self.geojson_path = Path(geojson_path) if geojson_path is not None else None
        self.instances_path = Path(instances_path) if instances_path is not None else None
        self._writer: GeoJSONWriter | None = None
        self._instances: np.ndarray | None = None
        self.timings = {"postprocess_s": 0.0, "polygons_s": 0.0, "write_s": 0.0}

    def start(self, ctx: RunContext) -> None:
        classes = ctx.card.semantic_classes
        if len(classes) < 2 or len(ctx.card.semantic_colours) != len(classes):
            raise OptionsError(f"model card needs background + cell types with colours, got {classes}")
        self.mpp = ctx.view.mpp
        self.scale = ctx.view.l0_per_px
        self.bounds = ctx.view.bounds
        self.margin = ctx.options.margin
        required = nucleus_margin_px(self.mpp)
        if self.margin < required and len(ctx.blocks) > 1:
            raise OptionsError(
                f"NucleusSink needs EngineOptions.margin >= {required} px ({NUCLEUS_MARGIN_UM} µm at "
                f"{self.mpp:.4g} µm/px), got {self.margin}"
            )
        self.names = (*classes[1:], OTHER)
        self.colours = (*ctx.card.semantic_colours[1:], OTHER_COLOUR)
        self.tissue_mm2 = ctx.tissue.area_px() * self.mpp**2 / 1e6
        self.areas = [_Growable() for _ in self.names]
        self.oversized = 0
        self._writer = GeoJSONWriter(self.geojson_path) if self.geojson_path is not None else None
        if self.instances_path is not None:
            self._instances = self._allocate_instances(ctx.view.width, ctx.view.height)

    def _allocate_instances(self, width: int, height: int) -> np.ndarray:
        if width * height > INSTANCES_MAX_PIXELS:
            raise OptionsError(
                f"instances.png is for small images: {width}x{height} = {width * height} analysis "
                f"pixels, over the cap of {INSTANCES_MAX_PIXELS}"
            )
        return np.zeros((height, width), dtype=np.uint32)

    def add(self, block: BlockResult) -> None:
        sem, ter = block.sem_logits, block.ter_logits
        if sem is None or ter is None:
            return
        t0 = time.perf_counter()
        nuclei = find_nuclei(sem, ter, mpp=self.mpp, params=self.params, valid=block.covered)
        region, inner = block.region, block.inner
        owned = _owned(nuclei.centroid_xy + np.array([region.x0, region.y0]), inner)
        ids = np.flatnonzero(owned) + 1
        self.oversized += self._count_oversized(nuclei.labels, ids, region)
        t1 = time.perf_counter()
        polys = nucleus_polygons(nuclei.labels, ids, origin=(region.x0, region.y0), scale=self.scale,
                                 tolerance_px=self.params.simplify_px)
        t2 = time.perf_counter()
        self._record(nuclei, ids, polys, region)
        t3 = time.perf_counter()
        self.timings["postprocess_s"] += t1 - t0
        self.timings["polygons_s"] += t2 - t1
        self.timings["write_s"] += t3 - t2

    def _count_oversized(self, labels: np.ndarray, ids: np.ndarray, region: Box) -> int:
        """Owned nuclei touching a cut edge of the region: wider than the margin."""
        edges = []
        if region.x0 > self.bounds.x0:
            edges.append(labels[:, 0])
        if region.x1 < self.bounds.x1:
            edges.append(labels[:, -1])
        if region.y0 > self.bounds.y0:
            edges.append(labels[0])
        if region.y1 < self.bounds.y1:
            edges.append(labels[-1])
        if not edges or not len(ids):
            return 0
        return int(np.isin(ids, np.concatenate(edges)).sum())

    def _record(self, nuclei: Nuclei, ids: np.ndarray, polys: np.ndarray, region: Box) -> None:
        idx = ids - 1
        area_um2 = nuclei.area_px[idx] * self.mpp**2
        cls = nuclei.class_index[idx]
        for k in range(len(self.names)):
            self.areas[k].extend(area_um2[cls == k])
        first_label = sum(a.size for a in self.areas) - len(ids) + 1
        if self._writer is not None:
            self._write_features(polys, cls, area_um2, nuclei.confidence[idx])
        if self._instances is not None and len(ids):
            lut = np.zeros(nuclei.n + 1, dtype=np.uint32)
            lut[ids] = np.arange(first_label, first_label + len(ids), dtype=np.uint32)
            out = self._instances[region.y0 : region.y1, region.x0 : region.x1]
            painted = lut[nuclei.labels]
            np.copyto(out, painted, where=painted > 0)

    def _write_features(self, polys: np.ndarray, cls: np.ndarray, area_um2: np.ndarray, conf: np.ndarray) -> None:
        assert self._writer is not None
        for poly, k, area, c in zip(polys, cls, area_um2, conf, strict=True):
            ring = shapely.get_coordinates(poly.exterior)
            self._writer.write_detection(
                ring, self.names[k], self.colours[k], {"area_um2": float(area), "confidence": float(c)}
            )

    def finish(self) -> dict[str, Any]:
        if self._writer is not None:
            self._writer.close()
        if self._instances is not None and self.instances_path is not None:
            write_instances_png(self.instances_path, self._instances)
            self._instances = None
        return {"nuclei": self.stats()}

    def stats(self) -> dict[str, Any]:
        """Counts, densities and areas per class, and the lymphocyte fraction."""
        total = sum(a.size for a in self.areas)
        per_class = {
            name: _class_stats(a.values, self.tissue_mm2) for name, a in zip(self.names, self.areas, strict=True)
        }
        lymph = per_class[LYMPHOCYTE]["count"] if LYMPHOCYTE in per_class else None
        return {
            "count": total,
            "classes": per_class,
            # lymphocytes / all nuclei: a simple tumour-infiltrating-lymphocyte (TIL) indicator,
            # not a validated TIL score (no stroma/tumour compartments).
            "lymphocyte_fraction": (lymph / total) if lymph is not None and total else None,
            "lymphocyte_fraction_definition": "lymphocyte nuclei / all nuclei; a simple TIL indicator",
            "density_unit": "nuclei per mm² of tissue",
            "tissue_area_mm2": self.tissue_mm2,
            "min_area_um2": self.params.min_area_um2,
            "mpp": self.mpp,
            "margin_px": self.margin,
            "oversized": self.oversized,
            "geojson": self.geojson_path.name if self.geojson_path is not None else None,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def _owned(centroid_xy: np.ndarray, inner: Box) -> np.ndarray:
    """Centroids (continuous analysis coordinates) inside the half-open ``inner`` box."""
    x, y = centroid_xy[:, 0], centroid_xy[:, 1]
    return (x >= inner.x0) & (x < inner.x1) & (y >= inner.y0) & (y < inner.y1)


def _class_stats(areas: np.ndarray, tissue_mm2: float) -> dict[str, Any]:
    n = len(areas)
    return {
        "count": n,
        "density_per_mm2": n / tissue_mm2 if tissue_mm2 > 0 else None,
        "mean_area_um2": float(areas.mean(dtype=np.float64)) if n else None,
        "median_area_um2": float(np.median(areas)) if n else None,
    }


def write_instances_png(path: str | Path, labels: np.ndarray) -> None:
    """uint32 labels as an RGBA PNG (bytes of the little-endian value)."""
    rgba = np.ascontiguousarray(labels.astype("<u4")).view(np.uint8).reshape(*labels.shape, 4)
    Image.fromarray(rgba).save(path, optimize=False, compress_level=1)


def read_instances_png(path: str | Path) -> np.ndarray:
    """Inverse of ``write_instances_png``."""
    with Image.open(path) as img:
        rgba = np.ascontiguousarray(np.asarray(img.convert("RGBA")))
    return rgba.view("<u4")[..., 0].astype(np.uint32)
