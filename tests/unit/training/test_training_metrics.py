"""Pixel metrics against hand-computed confusion cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import Confusion, PixelMetrics, nucleus_confusion


def test_confusion_iou_dice_and_miou() -> None:
    target = np.array([0, 0, 0, 0, 1, 1, 2, 2, -1, -1])
    pred = np.array([0, 0, 0, 1, 1, 2, 2, 2, 1, 2])
    conf = Confusion(4)
    conf.update(pred, target)
    # class 0: tp 3 fp 0 fn 1 ; class 1: tp 1 fp 1 fn 1 ; class 2: tp 2 fp 1 fn 0 ; class 3 absent
    assert conf.matrix[:3, :3].tolist() == [[3, 1, 0], [0, 1, 1], [0, 0, 2]]
    iou = conf.iou()
    assert iou[:3] == pytest.approx([3 / 4, 1 / 3, 2 / 3])
    assert math.isnan(iou[3])
    assert conf.dice()[:3] == pytest.approx([6 / 7, 2 / 4, 4 / 5])
    macro, micro = conf.miou()
    assert macro == pytest.approx((3 / 4 + 1 / 3 + 2 / 3) / 3)
    assert micro == pytest.approx(6 / (4 + 3 + 3))
    assert conf.miou([1, 2])[0] == pytest.approx(0.5)


def test_confusion_accumulates_and_validates() -> None:
    conf = Confusion(2)
    conf.update(np.array([[1, 1]]), np.array([[1, 0]]))
    conf.update(np.array([[0]]), np.array([[0]]))
    assert conf.matrix.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        conf.update(np.array([5]), np.array([0]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        conf.update(np.array([0, 0, 0]), np.array([0]))
    assert all(math.isnan(v) for v in Confusion(2).miou())


def test_nucleus_dice_merges_inside_and_boundary() -> None:
    target = np.array([0, 1, 2, 2, -1, 0])
    pred = np.array([0, 2, 1, 0, 1, 1])
    conf = nucleus_confusion(pred, target)
    # foreground: tp 2 (pixels 1, 2), fn 1 (pixel 3), fp 1 (pixel 5); pixel 4 ignored
    assert conf.dice()[1] == pytest.approx(4 / 6)


def test_pixel_metrics_summary_keys() -> None:
    m = PixelMetrics(["bg", "a"], ["bg", "in", "bd"])
    sem = np.array([[0, 1], [1, 1]])
    ter = np.array([[0, 1], [2, 2]])
    m.update(sem, ter, sem, ter)
    s = m.summary()
    assert s["sem_iou_a"] == 1.0 and s["nucleus_dice"] == 1.0 and s["ter_dice_bd"] == 1.0
    assert s["sem_miou_macro"] == 1.0 and s["sem_miou_micro"] == 1.0
