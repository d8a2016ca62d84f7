"""Pixel metrics from a confusion matrix: IoU, mIoU (macro and micro), Dice, nucleus Dice.

- ``IoU_c = TP / (TP + FP + FN)``, NaN when the class is absent from target and prediction.
- mIoU macro: mean of the defined per-class IoUs. mIoU micro: ``sum TP / sum (TP + FP + FN)``
  over the same classes (pixel-weighted).
- ``Dice_c = 2 TP / (2 TP + FP + FN)``.
- Nucleus Dice: binary Dice of ``ternary > 0`` (inside or boundary) against the target.

Pixels with target ``-1`` are skipped. Instance metrics (PQ, AJI, F1) live in ``model.metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

IGNORE = -1


class Confusion:
    """An accumulating ``(n, n)`` confusion matrix, rows = target, columns = prediction."""

    def __init__(self, n_classes: int) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n = n_classes
        self.matrix = np.zeros((n_classes, n_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add one prediction/target pair of equal shape (negative targets, -1 or partial, are ignored)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
        valid = target >= 0
        p, t = pred[valid].astype(np.int64), target[valid].astype(np.int64)
        for name, arr in (("pred", p), ("target", t)):
            if arr.size and (arr.min() < 0 or arr.max() >= self.n):
                raise ValueError(f"{name} values must be in [0, {self.n}), got [{arr.min()}, {arr.max()}]")
        self.matrix += np.bincount(t * self.n + p, minlength=self.n * self.n).reshape(self.n, self.n)

    def tp_fp_fn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class true positives, false positives and false negatives."""
        tp = np.diag(self.matrix).astype(np.float64)
        return tp, self.matrix.sum(0) - tp, self.matrix.sum(1) - tp

    def iou(self) -> np.ndarray:
        """Per-class IoU (NaN where undefined)."""
        tp, fp, fn = self.tp_fp_fn()
        return _ratio(tp, tp + fp + fn)

    def dice(self) -> np.ndarray:
        """Per-class Dice (NaN where undefined)."""
        tp, fp, fn = self.tp_fp_fn()
        return _ratio(2 * tp, 2 * tp + fp + fn)

    def miou(self, classes: Sequence[int] | None = None) -> tuple[float, float]:
        """(macro, micro) mIoU over ``classes`` (default all) that are defined."""
        tp, fp, fn = self.tp_fp_fn()
        idx = np.arange(self.n) if classes is None else np.asarray(classes)
        denom = (tp + fp + fn)[idx]
        keep = denom > 0
        if not keep.any():
            return math.nan, math.nan
        macro = float(np.mean(tp[idx][keep] / denom[keep]))
        micro = float(tp[idx][keep].sum() / denom[keep].sum())
        return macro, micro


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, math.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def nucleus_confusion(pred_ternary: np.ndarray, target_ternary: np.ndarray) -> Confusion:
    """Binary nucleus-vs-background confusion from ternary maps (target -1 ignored)."""
    conf = Confusion(2)
    target = np.where(target_ternary == IGNORE, IGNORE, target_ternary > 0)
    conf.update((pred_ternary > 0).astype(np.int64), target.astype(np.int64))
    return conf


class PixelMetrics:
    """Accumulates the semantic and ternary confusions plus nucleus Dice over many images."""

    def __init__(self, semantic_classes: Sequence[str], ternary_classes: Sequence[str]) -> None:
        self.sem_names = list(semantic_classes)
        self.ter_names = list(ternary_classes)
        self.sem = Confusion(len(semantic_classes))
        self.ter = Confusion(len(ternary_classes))
        self.nuc = Confusion(2)

    def update(self, sem_pred: np.ndarray, ter_pred: np.ndarray, sem_target: np.ndarray,
               ter_target: np.ndarray) -> None:
        """Add one image (or batch) of argmax predictions and targets."""
        self.sem.update(sem_pred, sem_target)
        self.ter.update(ter_pred, ter_target)
        self.nuc.matrix += nucleus_confusion(ter_pred, ter_target).matrix

    def summary(self) -> dict[str, float]:
        """Flat ``name -> value`` dict (NaN where a class never occurred)."""
        out: dict[str, float] = {}
        for name, v in zip(self.sem_names, self.sem.iou(), strict=True):
            out[f"sem_iou_{name}"] = float(v)
        for name, v in zip(self.sem_names, self.sem.dice(), strict=True):
            out[f"sem_dice_{name}"] = float(v)
        out["sem_miou_macro"], out["sem_miou_micro"] = self.sem.miou()
        for name, v in zip(self.ter_names, self.ter.dice(), strict=True):
            out[f"ter_dice_{name}"] = float(v)
        for name, v in zip(self.ter_names, self.ter.iou(), strict=True):
            out[f"ter_iou_{name}"] = float(v)
        out["nucleus_dice"] = float(self.nuc.dice()[1])
        return out
