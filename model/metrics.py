"""Instance metrics: panoptic quality (PQ = DQ × SQ), detection F1 and AJI.

Definitions (one ground-truth label image ``gt`` and one predicted ``pred``, 0 = background):

- Matching: a GT and a predicted instance match when IoU > 0.5. Such pairs are unique (two
  instances cannot both overlap one other instance by more than half of their union), so no
  assignment solver is needed. TP = matched pairs, FP = unmatched predictions, FN = unmatched GT.
- ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU of TP) / TP``, ``PQ = DQ × SQ``.
- Per class ``c``: the same, restricted to GT instances of class ``c`` and predictions of class
  ``c`` (MoNuSAC's class-wise PQ). ``mPQ`` is the mean of the per-class PQs that are defined.
- Detection F1: class-agnostic F1 of the IoU > 0.5 matching, ``2TP / (2TP + FP + FN)`` (equal to
  the binary DQ; a detection-only view that ignores class and contour quality).
- AJI (Kumar et al. 2017): each GT instance takes the prediction of highest IoU with it;
  ``AJI = sum |G ∩ P| / (sum |G ∪ P| + sum |unused P|)``.

Undefined values are NaN: PQ of a class with neither GT nor predictions, SQ without a TP, AJI with
an empty GT and prediction. An empty prediction against non-empty GT gives PQ = F1 = AJI = 0, and so
does a non-empty prediction against an empty GT.

MoNuSAC pitfalls and how this module avoids them. Foucart, Debeir and Decaestecker ("Comments on
'MoNuSAC2020'", IEEE TMI 2022) found three problems in the challenge's ranking code: a coding
mistake producing erroneous false positives, another missing false positives, and the aggregation
method. The CoNIC challenge later switched to aggregate counts (``mPQ+``) for the same reason.

1. Per-image averaging. MoNuSAC (like PanNuke and the first Lizard paper) computed PQ per image and
   per class and then averaged. An image with one lymphocyte then weighs as much as one with three
   hundred, and where a class is absent from an image's GT its PQ is undefined: skipping that
   image drops its false positives of the class, scoring it 0 or 1 biases the mean. Here
   ``InstanceEvaluator`` sums TP, FP, FN and the IoU sum per class over all images and computes
   PQ once from the totals (aggregate, as ``mPQ+``); AJI likewise sums intersections and unions.
   ``update`` still returns each image's own scores for inspection.
2. Label-index mismatches. Code that walks ``np.unique(labels)[1:]`` assumes label 0 is present
   and first; fast PQ code often assumes contiguous ids (HoVer-Net's ``get_fast_pq`` needs
   ``remap_label`` first); class lookups that index a table by instance id break when GT and
   prediction ids differ. Any of these yields phantom false positives or lost instances. Here each
   label image is relabelled with ``np.unique(..., return_inverse=True)``, 0 is background by value
   (never by position), overlaps come from the sparse co-occurrence of (gt id, pred id) pairs, and
   classes are explicit ``{instance id: class}`` mappings keyed by each image's original ids. An
   instance missing from its mapping is an error, never silently class 0.

Usage (``training/`` evaluation)::

    ev = InstanceEvaluator(class_names=("epithelial", "lymphocyte", "neutrophil", "macrophage"))
    for gt, gt_cls, pred, pred_cls in items:   # label images and {id: class index}
        ev.update(gt, pred, gt_cls, pred_cls)
    ev.result()  # {"pq", "dq", "sq", "f1", "aji", "mpq", "classes": {name: {"pq", ...}}, "images"}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MATCH_IOU = 0.5


@dataclass
class Counts:
    """TP, FP, FN and the IoU sum of matched pairs; add them up over images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    @property
    def dq(self) -> float:
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return self.tp / denom if denom else math.nan

    @property
    def sq(self) -> float:
        return self.iou_sum / self.tp if self.tp else (math.nan if self.fp + self.fn == 0 else 0.0)

    @property
    def pq(self) -> float:
        dq = self.dq
        return 0.0 if dq == 0 else dq * self.sq

    @property
    def f1(self) -> float:
        return self.dq

    def as_dict(self) -> dict[str, float | int]:
        return {"pq": self.pq, "dq": self.dq, "sq": self.sq, "tp": self.tp, "fp": self.fp, "fn": self.fn}


@dataclass
class Overlaps:
    """Instances of a GT/prediction pair, relabelled 1..n, and their pairwise intersections."""

    gt_ids: np.ndarray  # original ids of GT instances 1..n_gt (index i-1)
    pred_ids: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pair_gt: np.ndarray  # (k,) relabelled GT index 1..n_gt of each overlapping pair
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def pair_iou(self) -> np.ndarray:
        union = self.gt_area[self.pair_gt - 1] + self.pred_area[self.pair_pred - 1] - self.pair_inter
        return self.pair_inter / union

    def matches(self, threshold: float = MATCH_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(gt index, pred index, IoU)`` of pairs with IoU > ``threshold`` (unique for >= 0.5)."""
        if threshold < 0.5:
            raise ValueError(f"unique matching needs an IoU threshold >= 0.5, got {threshold}")
        iou = self.pair_iou
        keep = iou > threshold
        return self.pair_gt[keep], self.pair_pred[keep], iou[keep]


def _relabel(labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(labels as 0..n with 0 = background, original ids of 1..n)``."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} labels must be >= 0 (0 = background), got minimum {labels.min()}")
    ids, inverse = np.unique(labels, return_inverse=True)
    if len(ids) and ids[0] == 0:
        return inverse.reshape(labels.shape), ids[1:]
    return inverse.reshape(labels.shape) + 1, ids


def overlaps(gt: np.ndarray, pred: np.ndarray) -> Overlaps:
    """Areas and sparse pairwise intersections of two label images of equal shape."""
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} differs from pred shape {pred.shape}")
    g, gt_ids = _relabel(gt, "gt")
    p, pred_ids = _relabel(pred, "pred")
    g, p = g.ravel().astype(np.int64), p.ravel().astype(np.int64)
    gt_area = np.bincount(g, minlength=len(gt_ids) + 1)[1:]
    pred_area = np.bincount(p, minlength=len(pred_ids) + 1)[1:]
    both = (g > 0) & (p > 0)
    keys, inter = np.unique(g[both] * (len(pred_ids) + 1) + p[both], return_counts=True)
    pair_gt, pair_pred = np.divmod(keys, len(pred_ids) + 1)
    return Overlaps(gt_ids, pred_ids, gt_area, pred_area, pair_gt, pair_pred, inter)


def _class_array(ids: np.ndarray, classes: Mapping[int, int] | None, name: str) -> np.ndarray:
    if classes is None:
        return np.zeros(len(ids), dtype=np.int64)
    missing = [int(i) for i in ids if int(i) not in classes]
    if missing:
        raise ValueError(f"{name} classes lack instance ids {missing[:10]} (of {len(missing)})")
    return np.array([classes[int(i)] for i in ids], dtype=np.int64)


def panoptic_counts(
    ov: Overlaps,
    gt_classes: Mapping[int, int] | None = None,
    pred_classes: Mapping[int, int] | None = None,
    classes: Sequence[int] | None = None,
) -> dict[int | None, Counts]:
    """Counts for the class-agnostic matching (key None) and for each class in ``classes``."""
    mg, mp, miou = ov.matches()
    out: dict[int | None, Counts] = {
        None: Counts(len(mg), len(ov.pred_ids) - len(mp), len(ov.gt_ids) - len(mg), float(miou.sum()))
    }
    if classes is None:
        return out
    gc = _class_array(ov.gt_ids, gt_classes, "gt")
    pc = _class_array(ov.pred_ids, pred_classes, "pred")
    same = gc[mg - 1] == pc[mp - 1]
    for c in classes:
        hit = same & (gc[mg - 1] == c)
        tp = int(hit.sum())
        out[c] = Counts(tp, int((pc == c).sum()) - tp, int((gc == c).sum()) - tp, float(miou[hit].sum()))
    return out


def aji_terms(ov: Overlaps) -> tuple[int, int]:
    """``(intersection sum, union sum)`` of AJI for one image (sum over images, then divide)."""
    n_gt = len(ov.gt_ids)
    if len(ov.pair_gt) == 0:
        return 0, int(ov.gt_area.sum() + ov.pred_area.sum())
    iou = ov.pair_iou
    order = np.lexsort((-iou, ov.pair_gt))  # per GT, best IoU first
    first = np.ones(len(order), dtype=bool)
    first[1:] = ov.pair_gt[order][1:] != ov.pair_gt[order][:-1]
    best = order[first]
    bg, bp, binter = ov.pair_gt[best], ov.pair_pred[best], ov.pair_inter[best]
    inter = int(binter.sum())
    union = int((ov.gt_area[bg - 1] + ov.pred_area[bp - 1] - binter).sum())
    unmatched_gt = np.ones(n_gt, dtype=bool)
    unmatched_gt[bg - 1] = False
    used = np.zeros(len(ov.pred_ids), dtype=bool)
    used[bp - 1] = True
    union += int(ov.gt_area[unmatched_gt].sum() + ov.pred_area[~used].sum())
    return inter, union


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index of one image (NaN when both are empty)."""
    inter, union = aji_terms(overlaps(gt, pred))
    return inter / union if union else math.nan


def panoptic_quality(gt: np.ndarray, pred: np.ndarray) -> Counts:
    """Class-agnostic PQ counts of one image (``.pq``, ``.dq``, ``.sq``, ``.f1``)."""
    return panoptic_counts(overlaps(gt, pred))[None]


def instance_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Class-agnostic ``pq``, ``dq``, ``sq``, ``f1`` and ``aji`` of one image.

    Averaging these over images is the per-image pitfall above; for a data set, feed the images
    to ``InstanceEvaluator`` and read its aggregate ``result()``.
    """
    ov = overlaps(gt, pred)
    counts = panoptic_counts(ov)[None]
    inter, union = aji_terms(ov)
    return {"pq": counts.pq, "dq": counts.dq, "sq": counts.sq, "f1": counts.f1,
            "aji": inter / union if union else math.nan}


@dataclass
class InstanceEvaluator:
    """Aggregates PQ per class, detection F1 and AJI over many images (see module docstring)."""

    class_names: Sequence[str] = ()
    counts: dict[int | None, Counts] = field(default_factory=dict)
    aji_inter: int = 0
    aji_union: int = 0
    images: int = 0

    def update(
        self,
        gt: np.ndarray,
        pred: np.ndarray,
        gt_classes: Mapping[int, int] | None = None,
        pred_classes: Mapping[int, int] | None = None,
    ) -> dict[str, Any]:
        """Add one image; classes map instance ids to indices into ``class_names``. Returns its scores."""
        ov = overlaps(gt, pred)
        classes = range(len(self.class_names)) if self.class_names else None
        if classes is not None and (gt_classes is None or pred_classes is None):
            raise ValueError("class_names were given, so gt_classes and pred_classes are required")
        image = panoptic_counts(ov, gt_classes, pred_classes, classes)
        for key, value in image.items():
            self.counts[key] = self.counts.get(key, Counts()) + value
        inter, union = aji_terms(ov)
        self.aji_inter += inter
        self.aji_union += union
        self.images += 1
        return _summary(image, inter, union, self.class_names)

    def result(self) -> dict[str, Any]:
        """Aggregate scores over all images so far."""
        return {"images": self.images, **_summary(self.counts, self.aji_inter, self.aji_union, self.class_names)}


def _summary(counts: Mapping[int | None, Counts], inter: int, union: int, names: Sequence[str]) -> dict[str, Any]:
    binary = counts.get(None, Counts())
    per_class = {name: counts.get(i, Counts()).as_dict() for i, name in enumerate(names)}
    defined = [v["pq"] for v in per_class.values() if not math.isnan(v["pq"])]
    return {
        "pq": binary.pq, "dq": binary.dq, "sq": binary.sq, "f1": binary.f1,
        "aji": inter / union if union else math.nan,
        "mpq": float(np.mean(defined)) if defined else math.nan,
        "classes": per_class,
    }


def instance_classes(labels: np.ndarray, class_map: np.ndarray) -> dict[int, int]:
    """``{instance id: majority class}`` from a per-pixel class map (for GT given as two images)."""
    if labels.shape != class_map.shape:
        raise ValueError(f"labels shape {labels.shape} differs from class map shape {class_map.shape}")
    fg = labels > 0
    if not fg.any():
        return {}
    pairs, counts = np.unique(np.stack([labels[fg], class_map[fg]]), axis=1, return_counts=True)
    order = np.lexsort((-counts, pairs[0]))
    ids, cls = pairs[0][order], pairs[1][order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return {int(i): int(c) for i, c in zip(ids[first], cls[first], strict=True)}
