"""Cell-type metrics on class-labelled images (MoNuSAC), with the number of cells each rests on.

Ground-truth "cells" are the connected components of each class in the class mask
(``training.data.sources.class_components``): MoNuSAC's masks hold no instances, so touching nuclei
of one class count as one cell. Predicted cells are the engine's nuclei (``model.postprocess``)
with their class; nuclei the model calls ``other`` are dropped, since MoNuSAC labels only the four
types (every other nucleus is background there).

Per class ``c`` (pooled over all images, as CoNIC's mPQ+):

- ``pq``, ``dq``, ``sq``: panoptic quality, matching GT and predicted cells of class ``c`` at
  IoU > 0.5 (``model.metrics``);
- ``det_f1``: detection F1 with centroids matched one to one within ``radius_px`` (12 px at 40x,
  as HoVer-Net's ``compute_stats``), cells of class ``c`` on both sides;
- ``gt_cells``, ``pred_cells``, ``tp``, ``fp``, ``fn``; ``det_f1_ci``: a 95 % bootstrap interval
  over images (resampled with replacement, counts pooled).

Also ``nucleus_dice_semantic`` (semantic argmax != background) and ``nucleus_dice_ternary``
(ternary argmax != background), both against ``mask > 0``.

``GroupIoU`` keeps each cell type's pixel IoU per group of images (MoNuSAC: per patient) with the
cells it rests on: pooled figures over three patients hide how far one patient is from another. It
also gives each pooled IoU a 95 % bootstrap interval over images (images of one patient are not
independent, so the interval is a lower bound on the uncertainty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from model.metrics import InstanceEvaluator
from model.options import SEMANTIC_CLASSES
from training.metrics import Confusion

CELL_TYPES = SEMANTIC_CLASSES[1:]
"""The four cell types: semantic classes 1..4, indexed 0..3 here."""
DETECTION_RADIUS_PX = 12.0


def centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, ``(n, 2)`` row/col centroids) of the labels > 0."""
    fg = labels > 0
    if not fg.any():
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2))
    rows, cols = np.nonzero(fg)
    lab = labels[fg]
    ids, inverse, area = np.unique(lab, return_inverse=True, return_counts=True)
    cy = np.bincount(inverse, rows) / area
    cx = np.bincount(inverse, cols) / area
    return ids, np.stack([cy, cx], axis=1)


def match_centroids(gt: np.ndarray, pred: np.ndarray, radius: float) -> int:
    """Number of one-to-one pairs within ``radius`` (optimal assignment)."""
    if not len(gt) or not len(pred):
        return 0
    dist = cdist(gt, pred)
    cost = np.where(dist <= radius, dist, 1e6)
    rows, cols = linear_sum_assignment(cost)
    return int((dist[rows, cols] <= radius).sum())


def f1(tp: int, fp: int, fn: int) -> float:
    """``2TP / (2TP + FP + FN)``, NaN when there is nothing to count."""
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else math.nan


def bootstrap_ratio(counts: np.ndarray, k: int, n: int, seed: int) -> list[list[float]]:
    """95 % bootstrap interval, per class, of ``k TP / (k TP + FP + FN)`` pooled over images resampled
    with replacement (``k`` 2: F1 or Dice; 1: IoU). ``counts`` is ``(images, classes, 3)``: TP, FP,
    FN; NaN where no resample defines the ratio."""
    if not len(counts) or n <= 0:
        return [[math.nan, math.nan] for _ in range(counts.shape[1])]
    picks = np.random.default_rng(seed).integers(len(counts), size=(n, len(counts)))
    sums = counts[picks].sum(axis=1)  # (n, classes, 3)
    out = []
    for c in range(counts.shape[1]):
        tp, fp, fn = sums[:, c, 0], sums[:, c, 1], sums[:, c, 2]
        denom = k * tp + fp + fn
        vals = np.divide(k * tp, denom, out=np.full(n, np.nan), where=denom > 0)
        vals = vals[np.isfinite(vals)]
        out.append([float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if len(vals)
                   else [math.nan, math.nan])
    return out


@dataclass
class CellTypeEvaluator:
    """Accumulates per-class instance and detection metrics over images."""

    radius_px: float = DETECTION_RADIUS_PX
    instances: InstanceEvaluator = field(default_factory=lambda: InstanceEvaluator(CELL_TYPES))
    per_image: list[np.ndarray] = field(default_factory=list)  # (classes, 3): tp, fp, fn
    nucleus: dict[str, np.ndarray] = field(default_factory=lambda: {"semantic": np.zeros(3), "ternary": np.zeros(3)})

    def update(self, gt_labels: np.ndarray, gt_class: dict[int, int], pred_labels: np.ndarray,
               pred_class: dict[int, int], masks: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """One image: labels with ``{id: class index into CELL_TYPES}``; ``masks`` name -> (pred, gt)."""
        self.instances.update(gt_labels, pred_labels, gt_class, pred_class)
        gt_ids, gt_xy = centroids(gt_labels)
        pred_ids, pred_xy = centroids(pred_labels)
        counts = np.zeros((len(CELL_TYPES), 3), dtype=np.int64)
        for c in range(len(CELL_TYPES)):
            g = gt_xy[np.array([gt_class.get(int(i)) == c for i in gt_ids], dtype=bool)]
            p = pred_xy[np.array([pred_class.get(int(i)) == c for i in pred_ids], dtype=bool)]
            tp = match_centroids(g, p, self.radius_px)
            counts[c] = (tp, len(p) - tp, len(g) - tp)
        self.per_image.append(counts)
        for name, (pred, gt) in masks.items():
            self.nucleus[name] += (np.sum(pred & gt), np.sum(pred & ~gt), np.sum(~pred & gt))

    def result(self, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Per class metrics with cell counts, plus nucleus Dice."""
        inst = self.instances.result()
        total = np.sum(self.per_image, axis=0) if self.per_image else np.zeros((len(CELL_TYPES), 3), int)
        cis = bootstrap_ratio(np.stack(self.per_image) if self.per_image else np.zeros((0, len(CELL_TYPES), 3)),
                              2, bootstrap, seed)
        classes = {}
        for c, name in enumerate(CELL_TYPES):
            tp, fp, fn = (int(v) for v in total[c])
            pq = inst["classes"][name]
            classes[name] = {"gt_cells": tp + fn, "pred_cells": tp + fp, "tp": tp, "fp": fp, "fn": fn,
                             "det_f1": f1(tp, fp, fn), "det_f1_ci": cis[c],
                             "pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"],
                             "pq_gt_cells": pq["tp"] + pq["fn"]}
        out: dict[str, Any] = {"images": len(self.per_image), "classes": classes, "mpq": inst["mpq"]}
        for name, (tp, fp, fn) in self.nucleus.items():
            out[f"nucleus_dice_{name}"] = f1(int(tp), int(fp), int(fn))
        return out


@dataclass
class GroupIoU:
    """Per image: its group (MoNuSAC: patient), each cell type's pixel TP, FP, FN and its GT cells;
    per-group figures and intervals are pooled from these."""

    groups: list[str] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)  # (cell types, 3): TP, FP, FN
    cells: list[np.ndarray] = field(default_factory=list)  # (cell types,)

    def update(self, group: str, sem_pred: np.ndarray, sem_target: np.ndarray, gt_class: dict[int, int]) -> None:
        """One image of ``group``: semantic argmax and target (negative targets ignored), and its GT
        cells as ``{id: class index into CELL_TYPES}``."""
        image = Confusion(len(SEMANTIC_CLASSES))
        image.update(sem_pred, sem_target)
        self.groups.append(group)
        self.counts.append(np.stack(image.tp_fp_fn(), axis=1)[1:])
        self.cells.append(np.bincount(np.fromiter(gt_class.values(), dtype=np.int64, count=len(gt_class)),
                                      minlength=len(CELL_TYPES)))

    def result(self) -> dict[str, dict[str, Any]]:
        """``{group: {"images", "cells": {type: n}, "iou": {type: IoU or NaN}}}``, groups sorted."""
        out = {}
        for group in sorted(set(self.groups)):
            mine = [i for i, g in enumerate(self.groups) if g == group]
            tp, fp, fn = np.sum([self.counts[i] for i in mine], axis=0).T
            union = tp + fp + fn
            iou = np.divide(tp, union, out=np.full(len(CELL_TYPES), math.nan), where=union > 0)
            cells = np.sum([self.cells[i] for i in mine], axis=0)
            out[group] = {"images": len(mine),
                          "cells": {name: int(n) for name, n in zip(CELL_TYPES, cells, strict=True)},
                          "iou": {name: float(v) for name, v in zip(CELL_TYPES, iou, strict=True)}}
        return out

    def intervals(self, bootstrap: int = 1000, seed: int = 0) -> dict[str, list[float]]:
        """Each cell type's pooled IoU, 95 % bootstrap interval over images."""
        counts = np.stack(self.counts) if self.counts else np.zeros((0, len(CELL_TYPES), 3))
        return dict(zip(CELL_TYPES, bootstrap_ratio(counts, 1, bootstrap, seed), strict=True))
