"""MoNuSAC class masks in training: the adapter, the patient split, partial labels, class-centred
patches, stronger augmentation and the per-cell-type metrics, on generated data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.celltypes import CELL_TYPES, CellTypeEvaluator, match_centroids
from training.config import TrainConfig
from training.data.augment import AugmentConfig, augment
from training.data.patches import PatchConfig, PatchDataset, class_shares
from training.data.sample import IGNORE, INFLAMMATORY
from training.data.sources import class_components, load_monusac, patient_of
from training.losses import semantic_loss
from training.metrics import Confusion
from training.synthetic import write_class_mask_folder
from training.train import split_samples


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_mask_folder(tmp_path_factory.mktemp("monusac"), patients=3)


def test_class_masks_become_samples_grouped_by_patient(folder: Path) -> None:
    samples = load_monusac(folder)
    assert len(samples) == 6
    assert {s.group for s in samples} == {"TCGA-XX-P000", "TCGA-XX-P001", "TCGA-XX-P002"}
    s = samples[1]
    assert set(np.unique(s.semantic)) <= {0, 1, 2, 3, 4} and s.instances is not None
    nuclei = s.semantic > 0
    assert ((s.instances > 0) == nuclei).all()
    assert (s.ternary[nuclei] != 0).all()  # labelled nuclei: inside, boundary or an ignored clump
    # the unlabelled dark nucleus may be a nucleus: unknown for the ternary head, background for semantic
    assert (s.ternary[4:9, 4:9] == IGNORE).all() and (s.semantic[4:9, 4:9] == 0).all()
    # pale background away from any nucleus stays background
    background = (s.ternary == 0)
    assert background.mean() > 0.3 and not (background & nuclei).any()


def test_touching_nuclei_of_one_class_are_one_cell_and_classes_stay_apart() -> None:
    sem = np.zeros((10, 10), np.int64)
    sem[1:4, 1:4] = 2
    sem[1:4, 4:7] = 2  # touches the first: one lymphocyte component
    sem[5:8, 1:4] = 3  # touches nothing
    sem[5:8, 4:7] = 4  # touches the neutrophil, other class
    labels = class_components(sem)
    assert labels.max() == 3
    assert len(np.unique(labels[sem == 2])) == 1
    assert labels[6, 2] != labels[6, 5]


def test_patient_of() -> None:
    assert patient_of("TCGA-2Z-A9JG-01Z-00-DX1_3") == "TCGA-2Z-A9JG"
    assert patient_of("img0_001") == "img0_001"


def _config(val_groups: dict[str, list[str]]) -> TrainConfig:
    return TrainConfig.model_validate({"name": "t", "out_dir": "x", "data": {
        "sources": [{"kind": "monusac", "root": "r"}], "val_groups": val_groups}})


def test_validation_split_by_named_patients(folder: Path) -> None:
    samples = load_monusac(folder)
    train, val = split_samples(samples, "monusac", _config({"monusac": ["TCGA-XX-P001"]}))
    assert {s.group for s in val} == {"TCGA-XX-P001"} and len(val) == 2
    assert "TCGA-XX-P001" not in {s.group for s in train} and len(train) == 4
    with pytest.raises(ValueError, match="TCGA-XX-NOPE"):
        split_samples(samples, "monusac", _config({"monusac": ["TCGA-XX-NOPE"]}))


def test_partial_label_is_minus_log_of_the_set_probability() -> None:
    logits = torch.randn(1, 5, 2, 2, requires_grad=True)
    target = torch.tensor([[[INFLAMMATORY, INFLAMMATORY], [INFLAMMATORY, INFLAMMATORY]]])
    loss = semantic_loss(logits, target, None)
    p = F.softmax(logits.detach(), 1)[0]
    expected = -torch.log(p[2] + p[3] + p[4]).mean()
    # CE and Dice see no full label (0 and 0 with eps), so the partial term is all there is
    assert math.isclose(float(loss.detach()), float(expected), rel_tol=1e-5)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_partial_term_weighted_by_its_pixel_share() -> None:
    logits = torch.randn(1, 5, 1, 4)
    full = torch.tensor([[[1, 0, 2, 2]]])
    mixed = torch.tensor([[[1, 0, 2, INFLAMMATORY]]])
    ignored = torch.tensor([[[1, 0, 2, IGNORE]]])
    p = F.softmax(logits, 1)[0, :, 0, 3]
    partial = float(-torch.log(p[2] + p[3] + p[4]))
    got = float(semantic_loss(logits, mixed, None))
    assert math.isclose(got, float(semantic_loss(logits, ignored, None)) + 0.25 * partial, rel_tol=1e-5)
    assert got != float(semantic_loss(logits, full, None))


def test_metrics_ignore_partial_labels() -> None:
    conf = Confusion(5)
    conf.update(np.array([2, 3, 1]), np.array([INFLAMMATORY, IGNORE, 1]))
    assert conf.matrix.sum() == 1 and conf.matrix[1, 1] == 1


def test_class_centred_patches_show_the_rare_class(folder: Path) -> None:
    samples = load_monusac(folder)
    base = PatchConfig(size=32, per_epoch=8, foreground_bias=0.0, scale_jitter=0.0)
    plain = class_shares(PatchDataset(samples, base, seed=1), n=120)
    centred = PatchConfig(size=32, per_epoch=8, foreground_bias=0.0, scale_jitter=0.0, class_bias=1.0,
                          class_draw=(0.0, 0.0, 1.0, 0.0))
    ds = PatchDataset(samples, centred, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        i, centre = ds.pick(rng)
        assert centre is not None and samples[i].semantic.ravel()[centre] == 3
    shares = class_shares(ds, n=120)
    assert shares["nuclear_share"]["3"] > 2 * plain["nuclear_share"].get("3", 0.0)
    with pytest.raises(ValueError, match="class_draw"):
        PatchDataset(samples, PatchConfig(class_bias=0.5, class_draw=(1.0, -1.0, 0.0, 0.0)))


def test_strong_augmentation_keeps_labels_and_types() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    sem = rng.integers(-2, 5, (32, 32)).astype(np.int64)
    ter = rng.integers(-1, 3, (32, 32)).astype(np.int64)
    cfg = AugmentConfig(flips=False, hed_strong_p=1.0, saturation=0.3, blur_p=1.0, noise=0.05)
    out, s2, t2 = augment(image, sem, ter, rng, cfg)
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)
    assert np.array_equal(s2, sem) and np.array_equal(t2, ter)


def test_centroid_matching_is_one_to_one_within_the_radius() -> None:
    gt = np.array([[0.0, 0.0], [0.0, 20.0]])
    pred = np.array([[0.0, 5.0], [0.0, 6.0], [0.0, 40.0]])
    assert match_centroids(gt, pred, 12.0) == 1
    assert match_centroids(gt, pred, 15.0) == 2
    assert match_centroids(gt, pred[:0], 12.0) == 0


def test_cell_type_counts_and_f1_by_hand() -> None:
    gt = np.zeros((40, 40), np.int32)
    gt[2:8, 2:8] = 1      # lymphocyte, found as lymphocyte
    gt[20:26, 2:8] = 2    # neutrophil, found as lymphocyte: a miss for both
    gt[30:36, 30:36] = 3  # macrophage, not found
    pred = np.zeros_like(gt)
    pred[2:8, 3:9] = 1
    pred[20:26, 2:8] = 2
    pred[10:16, 30:36] = 3  # an epithelial false positive
    ev = CellTypeEvaluator()
    truth = gt > 0
    ev.update(gt, {1: 1, 2: 2, 3: 3}, pred, {1: 1, 2: 1, 3: 0}, {"semantic": (pred > 0, truth)})
    res = ev.result(bootstrap=50)
    lym, neu, mac, epi = (res["classes"][n] for n in ("lymphocyte", "neutrophil", "macrophage", "epithelial"))
    assert (lym["tp"], lym["fp"], lym["fn"], lym["gt_cells"]) == (1, 1, 0, 1)
    assert math.isclose(lym["det_f1"], 2 / 3)
    assert (neu["tp"], neu["fn"], neu["det_f1"]) == (0, 1, 0.0)
    assert (mac["gt_cells"], mac["fn"]) == (1, 1)
    assert (epi["fp"], epi["gt_cells"]) == (1, 0)
    lo, hi = lym["det_f1_ci"]
    assert lo <= lym["det_f1"] <= hi
    assert lym["pq_gt_cells"] == 1 and lym["pq"] > 0
    inter, fp, fn = 30 + 36, 6 + 36, 6 + 36  # pixel overlap by hand
    assert math.isclose(res["nucleus_dice_semantic"], 2 * inter / (2 * inter + fp + fn))
    assert len(CELL_TYPES) == 4


def test_stain_reference_of_training_images_holds_both_methods() -> None:
    from model.stain import lab_stats
    from training.stain import reference

    rng = np.random.default_rng(6)
    conc = np.stack([rng.gamma(2.0, 0.35, (64, 64)), rng.gamma(2.0, 0.25, (64, 64))])
    he = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    he = he / np.linalg.norm(he, axis=0)
    images = [np.clip(240 * np.exp(-np.einsum("cs,shw->hwc", he, c)), 0, 255).astype(np.uint8)
              for c in (conc, conc[:, ::-1] * 1.2)]
    ref = reference(images)
    expected = np.mean([lab_stats(im)[0] for im in images], axis=0)
    assert np.allclose(ref.reinhard.mean, expected)
    cosines = (np.asarray(ref.macenko.he) / np.linalg.norm(ref.macenko.he, axis=0) * he).sum(axis=0)
    assert (cosines > 0.99).all()  # both stain vectors recovered from the pooled pixels


def test_confusion_table_gives_each_labelled_class_its_shares() -> None:
    from training.evaluate import confusion_table

    matrix = [[90, 10, 0, 0, 0], [5, 15, 0, 0, 0], [0] * 5, [0, 0, 0, 1, 3], [0, 0, 0, 0, 0]]
    lines = confusion_table("monusac", matrix)
    assert lines[4] == "| background | 0.900 | 0.100 | 0.000 | 0.000 | 0.000 | 100 |"
    assert lines[5] == "| epithelial | 0.250 | 0.750 | 0.000 | 0.000 | 0.000 | 20 |"
    assert lines[7] == "| neutrophil | 0.000 | 0.000 | 0.000 | 0.250 | 0.750 | 4 |"
    assert lines[6].endswith("| 0 |") and "as macrophage" in lines[2]


def test_group_iou_keeps_each_patients_iou_and_cells_apart() -> None:
    from training.celltypes import GroupIoU
    from training.evaluate import group_table

    groups = GroupIoU()
    target = np.array([[0, 1, 1, 2], [0, 1, -1, 2]])
    groups.update("P2", np.array([[0, 1, 0, 2], [0, 1, 3, 0]]), target, {1: 0, 2: 1})
    groups.update("P1", np.array([[1, 1, 1, 2], [0, 1, 1, 2]]), target, {1: 0, 2: 1, 3: 0})
    groups.update("P2", target.clip(0), target, {5: 0})
    result = groups.result()
    assert list(result) == ["P1", "P2"]
    assert result["P1"]["images"] == 1 and result["P2"]["images"] == 2
    assert result["P1"]["cells"] == {"epithelial": 2, "lymphocyte": 1, "neutrophil": 0, "macrophage": 0}
    assert result["P2"]["cells"]["epithelial"] == 2 and result["P2"]["cells"]["lymphocyte"] == 1
    # P1: epithelial labelled on 3 pixels, predicted on those and one more (the ignored pixel not counted)
    assert result["P1"]["iou"]["epithelial"] == 3 / 4 and result["P1"]["iou"]["lymphocyte"] == 1.0
    # P2: epithelial TP 2 + 3, FN 1; lymphocyte TP 1 + 2, FN 1
    assert result["P2"]["iou"]["epithelial"] == 5 / 6 and result["P2"]["iou"]["lymphocyte"] == 3 / 4
    assert np.isnan(result["P2"]["iou"]["macrophage"])  # neither labelled nor predicted
    lines = group_table("monusac", result)
    assert lines[4] == "| P1 | 1 | 0.750 (2) | 1.000 (1) | n/a (0) | n/a (0) |"


def test_iou_intervals_hold_the_pooled_iou_and_narrow_with_agreeing_images() -> None:
    from training.celltypes import GroupIoU

    rng = np.random.default_rng(4)
    agreeing, mixed = GroupIoU(), GroupIoU()
    for i in range(12):
        target = rng.integers(0, 3, (20, 20))
        wrong = np.where(rng.random((20, 20)) < 0.2, 0, target)  # every image: a fifth of its pixels missed
        agreeing.update("P", wrong, target, {})
        mixed.update("P", target if i % 2 else np.zeros_like(target), target, {})  # images all right or all wrong
    for groups in (agreeing, mixed):
        pooled = groups.result()["P"]["iou"]["epithelial"]
        lo, hi = groups.intervals(bootstrap=500)["epithelial"]
        assert lo <= pooled <= hi
    assert np.diff(agreeing.intervals(bootstrap=500)["epithelial"])[0] < 0.05
    assert np.diff(mixed.intervals(bootstrap=500)["epithelial"])[0] > 0.2
    assert all(np.isnan(v) for v in agreeing.intervals()["neutrophil"])  # never labelled nor predicted
