"""Instance metrics on hand-made cases whose PQ, F1 and AJI are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.metrics import InstanceEvaluator, aji, instance_classes, instance_metrics, overlaps, panoptic_quality


def _image(*rects: tuple[int, int, int, int, int]) -> np.ndarray:
    """Label image 20x40 with rectangles ``(label, y0, y1, x0, x1)``."""
    img = np.zeros((20, 40), dtype=np.int32)
    for label, y0, y1, x0, x1 in rects:
        img[y0:y1, x0:x1] = label
    return img


GT = _image((1, 0, 10, 0, 10), (2, 0, 10, 20, 30), (3, 10, 20, 0, 20))  # areas 100, 100, 200


def test_perfect_match_with_other_ids():
    pred = np.where(GT > 0, GT * 1000 + 7, 0)  # same instances, unrelated ids
    counts = panoptic_quality(GT, pred)
    assert (counts.tp, counts.fp, counts.fn) == (3, 0, 0)
    assert counts.pq == pytest.approx(1.0) and counts.f1 == pytest.approx(1.0)
    assert aji(GT, pred) == pytest.approx(1.0)


def test_instance_metrics_one_image():
    pred = np.where(GT == 2, 0, GT)
    assert instance_metrics(GT, pred) == pytest.approx({"pq": 0.8, "dq": 0.8, "sq": 1.0, "f1": 0.8, "aji": 0.75})


def test_one_missed():
    pred = np.where(GT == 2, 0, GT)
    counts = panoptic_quality(GT, pred)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 1)
    assert counts.dq == pytest.approx(2 / 2.5) and counts.sq == pytest.approx(1.0)
    assert counts.pq == pytest.approx(0.8)
    assert aji(GT, pred) == pytest.approx(300 / 400)


def test_one_split():
    gt = _image((1, 0, 10, 0, 20))  # 200 px
    pred = _image((1, 0, 10, 0, 12), (2, 0, 10, 12, 20))  # 120 + 80 px
    counts = panoptic_quality(gt, pred)
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 0)
    assert counts.sq == pytest.approx(0.6)
    assert counts.pq == pytest.approx(0.6 * 1 / 1.5)
    assert aji(gt, pred) == pytest.approx(120 / (200 + 80))


def test_one_merged():
    gt = _image((1, 0, 10, 0, 10), (2, 0, 10, 10, 20))
    pred = _image((5, 0, 10, 0, 20))  # IoU 0.5 with each: not a match (IoU must be > 0.5)
    counts = panoptic_quality(gt, pred)
    assert (counts.tp, counts.fp, counts.fn) == (0, 1, 2)
    assert counts.pq == 0.0 and counts.f1 == 0.0
    assert aji(gt, pred) == pytest.approx(200 / 400)  # the merged prediction counted per GT


def test_empty_prediction():
    counts = panoptic_quality(GT, np.zeros_like(GT))
    assert (counts.tp, counts.fp, counts.fn) == (0, 0, 3)
    assert counts.pq == 0.0 and counts.f1 == 0.0 and counts.sq == 0.0
    assert aji(GT, np.zeros_like(GT)) == 0.0


def test_empty_ground_truth():
    counts = panoptic_quality(np.zeros_like(GT), GT)
    assert (counts.tp, counts.fp, counts.fn) == (0, 3, 0)
    assert counts.pq == 0.0
    assert aji(np.zeros_like(GT), GT) == 0.0


def test_both_empty_is_undefined():
    empty = np.zeros_like(GT)
    assert math.isnan(panoptic_quality(empty, empty).pq)
    assert math.isnan(aji(empty, empty))


def test_image_without_background_and_sparse_ids():
    gt = np.full((4, 4), 7, dtype=np.int64)  # one instance, no background pixel at all
    pred = np.full((4, 4), 2**40, dtype=np.int64)
    ov = overlaps(gt, pred)
    assert list(ov.gt_ids) == [7] and list(ov.pred_ids) == [2**40]
    assert panoptic_quality(gt, pred).pq == pytest.approx(1.0)


def test_classwise_aggregate_counts_false_positives_of_absent_classes():
    ev = InstanceEvaluator(class_names=("a", "b"))
    # image 1: two class-a nuclei, both found, one predicted as b
    ev.update(GT, GT, {1: 0, 2: 0, 3: 1}, {1: 0, 2: 1, 3: 1})
    # image 2: class b absent from the GT but predicted once: a false positive of b
    gt2 = _image((1, 0, 10, 0, 10))
    pred2 = _image((1, 0, 10, 0, 10), (2, 10, 20, 20, 30))
    per_image = ev.update(gt2, pred2, {1: 0}, {1: 0, 2: 1})
    assert per_image["classes"]["b"]["fp"] == 1 and per_image["classes"]["b"]["sq"] == 0.0
    result = ev.result()
    a, b = result["classes"]["a"], result["classes"]["b"]
    assert (a["tp"], a["fp"], a["fn"]) == (2, 0, 1)  # image-1 id 2 is a miss for a...
    assert (b["tp"], b["fp"], b["fn"]) == (1, 2, 0)  # ...and a false b, plus image 2's b
    assert b["pq"] == pytest.approx(1 / (1 + 1.0))
    assert result["mpq"] == pytest.approx((a["pq"] + b["pq"]) / 2)
    assert result["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1))  # class-agnostic: 4 TP, 1 FP
    assert result["images"] == 2


def test_missing_class_entry_is_an_error():
    ev = InstanceEvaluator(class_names=("a",))
    with pytest.raises(ValueError, match="lack instance ids"):
        ev.update(GT, GT, {1: 0, 2: 0}, {1: 0, 2: 0, 3: 0})


def test_instance_classes_majority_vote():
    cls = np.zeros_like(GT)
    cls[GT == 3] = 2
    cls[10, 0] = 1  # one stray pixel does not change the majority
    assert instance_classes(GT, cls) == {1: 0, 2: 0, 3: 2}


def test_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(20, 40\).*\(4, 4\)"):
        overlaps(GT, np.zeros((4, 4), dtype=np.int32))
