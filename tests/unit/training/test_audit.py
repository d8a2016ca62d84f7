"""The audit of calls on unlabelled nuclei: which nuclei count, the pixel tallies by hand, the
crops and sheets, and a run with the shipped model whose IoU agrees with the evaluator's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.postprocess import PROB_SCALE, Nuclei, measure_nuclei
from training.audit import CALL_RGB, LABEL_RGB, Tally, audit_image, crop_pair, describe, draw, sheets, unlabelled_calls
from training.celltypes import CELL_TYPES
from training.synthetic import write_class_mask_folder

SHIPPED = Path(__file__).resolve().parents[3] / "model" / "weights" / "nucseg-default.safetensors"


def _labels() -> np.ndarray:
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[1:5, 1:5] = 1    # epithelial, overlaps a labelled cell
    labels[8:13, 8:15] = 2  # epithelial, on unlabelled pixels only
    labels[15:19, 1:4] = 3  # lymphocyte, on unlabelled pixels
    return labels


def _nuclei(labels: np.ndarray, types: dict[int, str]) -> Nuclei:
    """The service's measurement of ``labels``, each nucleus certain of its type."""
    probs = np.zeros((len(CELL_TYPES) + 1, *labels.shape), dtype=np.uint8)
    probs[0] = PROB_SCALE
    for i, name in types.items():
        probs[:, labels == i] = 0
        probs[CELL_TYPES.index(name) + 1, labels == i] = PROB_SCALE
    return measure_nuclei(labels, probs)


NUCLEI = {1: "epithelial", 2: "epithelial", 3: "lymphocyte"}


def test_only_calls_of_the_type_on_wholly_unlabelled_nuclei_count() -> None:
    nuclei = _nuclei(_labels(), NUCLEI)
    labelled = np.zeros_like(nuclei.labels, dtype=bool)
    labelled[4:7, 4:7] = True  # touches nucleus 1 at one pixel
    ids, calls = unlabelled_calls(nuclei, CELL_TYPES.index("epithelial"), labelled)
    assert ids.tolist() == [2] and calls == 2
    ids, calls = unlabelled_calls(nuclei, CELL_TYPES.index("lymphocyte"), labelled)
    assert ids.tolist() == [3] and calls == 1
    none, calls = unlabelled_calls(nuclei, CELL_TYPES.index("macrophage"), labelled)
    assert none.size == 0 and calls == 0


def test_describe_gives_the_pixel_holding_the_centroid_and_the_area() -> None:
    (call,) = describe("img", _nuclei(_labels(), NUCLEI), np.array([2]))
    assert (call.image, call.nucleus, call.y, call.x, call.pixels) == ("img", 2, 10, 11, 35)
    assert describe("img", _nuclei(_labels(), NUCLEI), np.array([], dtype=np.int64)) == []


def test_tally_iou_and_the_iou_were_the_unlabelled_calls_labelled() -> None:
    pred = np.zeros((10, 10), dtype=bool)
    truth = np.zeros_like(pred)
    truth[0, :6] = True
    pred[0, 2:8] = True          # tp 4, union 8
    pred[5, :3] = True           # a call on an unlabelled nucleus, 3 of its 5 pixels predicted the type
    unlabelled = np.zeros_like(pred)
    unlabelled[5, :5] = True
    tally = Tally()
    tally.update(pred, truth, unlabelled, calls=2, found=1)
    result = tally.result()
    assert result["tp"] == 4 and result["union"] == 11
    assert result["iou"] == pytest.approx(4 / 11)
    # labelled, the nucleus adds its 3 predicted pixels to tp and its 2 others to the union
    assert result["iou_if_unlabelled_calls_labelled"] == pytest.approx(7 / 13)
    assert (result["calls"], result["unlabelled_calls"]) == (2, 1)


def test_missed_side_splits_background_calls_into_outlines_and_whole_cells() -> None:
    truth = np.zeros((30, 30), dtype=bool)
    truth[2:5, 2:5] = True       # cell A: nothing called a nucleus there: missed whole
    truth[10:20, 10:14] = True   # cell B: top half called a nucleus
    nucleus = np.zeros_like(truth)
    nucleus[10:15, 10:14] = True
    tally = Tally()
    tally.update_missed(nucleus, truth)
    r = tally.result()
    assert (r["cells"], r["cells_missed"]) == (2, 1)
    assert r["called_background"] == 9 + 20
    assert r["called_background_in_missed_cells"] == 9
    assert r["called_background_near_call"] == 2 * 4   # rows 15 and 16 of cell B: within 2 px of row 14
    empty = Tally()
    empty.update_missed(np.zeros_like(truth), truth)
    assert empty.result()["cells_missed"] == 2 and empty.result()["called_background_near_call"] == 0


def test_crop_pair_outlines_the_call_and_the_labels_and_pads_black() -> None:
    image = np.full((30, 30, 3), 128, dtype=np.uint8)
    call = np.zeros((30, 30), dtype=bool)
    call[2:8, 2:8] = True
    labelled = np.zeros_like(call)
    labelled[12:18, 12:18] = True
    pair = crop_pair(image, call, labelled, 5, 5, radius=10, zoom=2)
    assert pair.shape == (40, 80, 3)
    raw, drawn = pair[:, :40], pair[:, 40:]
    assert (raw[:10, :10] == 0).all()          # above and left of the image: black
    assert not (raw == CALL_RGB).all(axis=-1).any()
    assert (drawn == CALL_RGB).all(axis=-1).sum() == 20 * 4   # the 6x6 square's edge, zoomed twice
    assert (drawn == LABEL_RGB).all(axis=-1).any()


def test_sheets_hold_eight_crops_in_order_and_fill_the_last_with_blank() -> None:
    crops = [np.full((4, 6, 3), k, dtype=np.uint8) for k in range(1, 10)]
    out = sheets(crops)
    assert len(out) == 2 and out[0].shape == (16, 12, 3)
    assert out[0][0, 0, 0] == 1 and out[0][0, 6, 0] == 2 and out[0][4, 0, 0] == 3
    assert out[1][0, 0, 0] == 9 and (out[1][0, 6:] == 0).all()


def test_audit_image_tallies_pixels_and_draws_the_called_nucleus() -> None:
    labels = _labels()
    semantic = np.zeros_like(labels)
    semantic[1:5, 1:5] = 1                                # nucleus 1 is a labelled epithelial cell
    sem_argmax = np.where(labels > 0, 1, 0)               # every nucleus's pixels predicted epithelial
    image = np.full((20, 20, 3), 200, dtype=np.uint8)
    tally = Tally()
    calls = audit_image(tally, "img", sem_argmax, semantic, _nuclei(labels, NUCLEI), 0)
    assert [(c.nucleus, c.pixels) for c in calls] == [(2, 35)]
    r = tally.result()
    assert (r["tp"], r["union"]) == (16, 16 + 35 + 12)
    assert (r["unlabelled_px_called_type"], r["unlabelled_px_not_called_type"]) == (35, 0)
    assert r["iou_if_unlabelled_calls_labelled"] == pytest.approx((16 + 35) / (16 + 35 + 12))
    (pair,) = draw(calls, {"img": (image, labels, semantic)})
    drawn = pair[:, pair.shape[1] // 2:]
    yellow = np.argwhere((drawn == CALL_RGB).all(axis=-1)) // 2 + np.array([calls[0].y, calls[0].x]) - 48
    assert set(map(tuple, yellow)) == {(y, x) for y in range(8, 13) for x in range(8, 15)
                                       if y in (8, 12) or x in (8, 14)}   # nucleus 2's edge, nothing else


def test_run_with_the_shipped_model_agrees_with_the_evaluator(tmp_path: Path) -> None:
    from training.audit import main as audit_main
    from training.evaluate import main as evaluate_main

    data = write_class_mask_folder(tmp_path / "monusac", patients=2, size=128, n_nuclei=14)
    engine = ["--tile-size", "128", "--overlap", "32", "--precision", "fp32"]
    assert evaluate_main(["--checkpoint", str(SHIPPED), "--data", str(data), "--out", str(tmp_path / "e"),
                          *engine]) == 0
    ious = json.loads((tmp_path / "e" / "eval.json").read_text())["datasets"]["monusac"]
    for cell_type in CELL_TYPES:
        out = tmp_path / cell_type
        assert audit_main(["--checkpoint", str(SHIPPED), "--data", str(data), "--cell-type", cell_type,
                           "--sample", "3", "--out", str(out), *engine]) == 0
        report = json.loads((out / "audit.json").read_text())
        assert report["images"] == 4 and report["cell_type"] == cell_type
        assert report["iou"] == pytest.approx(ious[f"sem_iou_{cell_type}"])
        assert report["iou_if_unlabelled_calls_labelled"] >= report["iou"]
        assert 0 <= report["unlabelled_calls"] <= report["calls"]
        assert len(report["sampled"]) == min(3, report["unlabelled_calls"])
        assert len(list(out.glob("sheet_*.png"))) == (1 if report["sampled"] else 0)
