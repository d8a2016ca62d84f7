"""Evaluate a checkpoint with the service's engine over whole images.

``python -m training.evaluate --checkpoint X --data Y [--data Z ...] [--out DIR]``

Each ``--data`` folder is detected as MoNuSeg (``images/`` + ``annotations/`` or ``binary_masks/``),
a CoNSeP-style ``images/ + instances/ + classes/`` folder (CoNSeP class map), or a MoNuSAC folder
(``<patient>/<id>.xml``, or ``images/ + masks/`` class masks). Images are taken to be at the model's
mpp. ``--split runs/<run>/split.json --part val`` keeps only that part of MoNuSAC (the patients a
run never trained on; ``--split-datasets`` names other datasets it should apply to). Writes
``eval.json`` and ``eval.md``: pixel metrics; instance metrics PQ/DQ/SQ/F1/AJI, aggregated over all
images of a dataset with ``model.metrics.InstanceEvaluator``, for datasets with instance ground
truth; for MoNuSAC, per cell type with the number of cells each figure rests on
(``training.celltypes``), and each cell type's IoU per patient.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoint import LoadedModel, load_model
from model.metrics import InstanceEvaluator, instance_classes
from model.network import SEMANTIC_CLASSES, TERNARY_CLASSES
from model.options import DEFAULTS, STAIN_METHODS
from training.celltypes import CELL_TYPES, CellTypeEvaluator, GroupIoU
from training.data.sample import Sample
from training.data.sources import CONSEP_CLASS_MAP, load_instance_folder, load_monusac, load_monuseg
from training.metrics import PixelMetrics
from training.nucleus_types import NucleusTypes

# Targets of the shipped model: (dataset, metric, minimum). MoNuSAC: the validation patients.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("monusac", "sem_iou_epithelial", 0.60),
    ("monusac", "sem_iou_lymphocyte", 0.55),
    ("monusac", "sem_iou_macrophage", 0.30),
    ("monusac", "det_f1_neutrophil", 0.3),
    ("monuseg", "nucleus_dice", 0.79),
    ("consep", "sem_iou_epithelial", 0.5),
)
TABLE_METRICS = ("nucleus_dice", "ter_dice_inside", "ter_dice_boundary", "sem_iou_background",
                 "sem_iou_epithelial", "sem_iou_lymphocyte", "sem_miou_macro", "sem_miou_micro")
INSTANCE_KEYS = ("pq", "dq", "sq", "f1", "aji")


def detect_kind(root: Path) -> str:
    """``monuseg``, ``consep`` or ``monusac`` from the folder layout."""
    if (root / "images").is_dir() and ((root / "annotations").is_dir() or (root / "binary_masks").is_dir()):
        return "monuseg"
    if all((root / sub).is_dir() for sub in ("images", "instances", "classes")):
        return "consep"
    if any(root.glob("*/*.xml")) or all((root / sub).is_dir() for sub in ("images", "masks")):
        return "monusac"
    raise ValueError(f"cannot tell the dataset layout of {str(root)!r}: expected images/+annotations/, "
                     "images/+instances/+classes/, or <patient>/<id>.xml")


def load_dataset(root: Path, kind: str) -> list[Sample]:
    """Samples of one evaluation folder."""
    if kind == "monuseg":
        return load_monuseg(root)
    if kind == "consep":
        return load_instance_folder(root, class_map=CONSEP_CLASS_MAP)
    if kind == "monusac":
        return load_monusac(root)
    raise ValueError(f"unknown dataset kind {kind!r}; expected monuseg, consep or monusac")


def evaluate_dataset(engine: Any, samples: Sequence[Sample], mpp: float, *, cell_types: bool = False) -> dict[str, Any]:
    """Pixel and instance metrics over ``samples``, accumulated over all pixels / nuclei."""
    from model.blending import nucleus_inputs
    from model.postprocess import find_nuclei

    pixel = PixelMetrics(SEMANTIC_CLASSES, TERNARY_CLASSES)
    instances = InstanceEvaluator()
    types = CellTypeEvaluator() if cell_types else None
    groups = GroupIoU()
    typed = NucleusTypes()
    start = time.perf_counter()
    for s in samples:
        sem, ter = engine.predict_array(s.image)
        sem_argmax = sem.argmax(0)
        pixel.update(sem_argmax, ter.argmax(0), s.semantic, s.ternary)
        typed.update(s, sem)
        if s.instances is None:
            continue
        nuclei = find_nuclei(*nucleus_inputs(sem, ter), mpp=mpp)
        if types is not None:
            gt_class = update_cell_types(types, s, sem_argmax, ter, nuclei.labels, nuclei.class_index)
            groups.update(s.group, sem_argmax, s.semantic, gt_class)
        else:
            instances.update(s.instances, nuclei.labels)
    out: dict[str, Any] = {"images": len(samples), "seconds": round(time.perf_counter() - start, 1)}
    out.update(pixel.summary())
    out["sem_confusion"] = pixel.sem.matrix.tolist()  # pixels, rows: labelled class, columns: predicted
    if typed.nuclei:
        out["nucleus_types"] = typed.result()
        out["typed_other_share"] = out["nucleus_types"]["other_share"]
    if instances.images:
        result = instances.result()
        out.update({f"inst_{k}": float(result[k]) for k in INSTANCE_KEYS})
    if types is not None:
        out["cell_types"] = types.result()
        out["cell_types_by_group"] = groups.result()
        for name, interval in groups.intervals().items():
            out["cell_types"]["classes"][name]["iou_ci"] = interval
        out.update({f"det_f1_{name}": m["det_f1"] for name, m in out["cell_types"]["classes"].items()})
    return out


def update_cell_types(types: CellTypeEvaluator, s: Sample, sem_argmax: Any, ter: Any, labels: Any,
                      cls: Any) -> dict[int, int]:
    """Add one class-labelled image: GT cells by class component, predicted nuclei of the four types.
    Returns the GT cells' classes, ``{id: index into CELL_TYPES}``."""
    assert s.instances is not None
    gt_class = {i: c - 1 for i, c in instance_classes(s.instances, np.maximum(s.semantic, 0)).items() if c > 0}
    keep = np.concatenate([[False], cls < len(CELL_TYPES)])
    pred = np.where(keep[labels], labels, 0)
    pred_class = {i + 1: int(c) for i, c in enumerate(cls) if c < len(CELL_TYPES)}
    truth = s.semantic > 0
    types.update(s.instances, gt_class, pred, pred_class,
                 {"semantic": (sem_argmax > 0, truth), "ternary": (ter.argmax(0) > 0, truth)})
    return gt_class


def select(samples: list[Sample], kind: str, args: argparse.Namespace) -> list[Sample]:
    """The samples listed under ``args.part`` of ``args.split`` for this dataset, if the split applies to it."""
    if not args.split or kind not in args.split_datasets.split(","):
        return samples
    record = json.loads(Path(args.split).read_text())
    if kind not in record:
        raise ValueError(f"split {args.split!r} has no entry for dataset {kind!r}: {sorted(record)}")
    names = set(record[kind][args.part])
    return [s for s in samples if s.name in names]


def make_engine(model: LoadedModel, args: argparse.Namespace) -> Any:
    """The service's engine with the CLI's options."""
    from model.engine import Engine, EngineOptions

    opts = EngineOptions(tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                         precision=args.precision, device=args.device, tissue=False, tta=args.tta,
                         stain=args.stain)
    return Engine(model, opts)


def check_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with the value reached and whether it is met (datasets present only)."""
    rows = []
    for dataset, metric, minimum in TARGETS:
        if dataset in results:
            value = float(results[dataset].get(metric, math.nan))
            rows.append({"dataset": dataset, "metric": metric, "target": minimum, "value": value,
                         "met": bool(value >= minimum)})
    return rows


def markdown(report: dict[str, Any]) -> str:
    """A markdown table: metrics as rows, datasets as columns, then the targets."""
    names = list(report["datasets"])
    lines = [f"Checkpoint `{report['checkpoint']}` (sha256 `{report['sha256'][:16]}…`), engine "
             f"tile {report['engine']['tile_size']}/overlap {report['engine']['overlap']}, "
             f"precision {report['engine']['precision']}"
             f"{', test-time augmentation (four flips)' if report['engine'].get('tta') else ''}.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    keys = [*TABLE_METRICS, "typed_other_share", *(f"inst_{k}" for k in INSTANCE_KEYS)]
    for key in ["images", *keys]:
        cells = [_fmt(report["datasets"][n].get(key)) for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if "monuseg" in report["datasets"]:
        lines += ["", "MoNuSeg has no cell-type labels (semantic target ignored on nuclei), so its "
                  "per-type semantic IoUs only count false positives and read 0; `typed_other_share` is "
                  "the share of its nuclei whose highest mean semantic probability is background."]
    for name in names:
        if "cell_types" in report["datasets"][name]:
            lines += ["", *cell_type_table(name, report["datasets"][name]),
                      "", *group_table(name, report["datasets"][name]["cell_types_by_group"]),
                      "", *confusion_table(name, report["datasets"][name]["sem_confusion"])]
    if report["targets"]:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['dataset']} {t['metric']} ≥ {t['target']} | {_fmt(t['value'])} | "
                         f"{'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def cell_type_table(name: str, result: dict[str, Any]) -> list[str]:
    """Per cell type: GT cells, pixel IoU with its interval, Dice, detection F1 with its interval, PQ."""
    ct = result["cell_types"]
    lines = [f"{name}, per cell type ({ct['images']} images; cells = connected components of each class; "
             "intervals: 95 % bootstrap over images):", "",
             "| class | GT cells | pred cells | IoU [95 % CI] | Dice | detection F1 [95 % CI] | PQ |",
             "|---|---|---|---|---|---|---|"]
    for cls, m in ct["classes"].items():
        iou_lo, iou_hi = m["iou_ci"]
        lo, hi = m["det_f1_ci"]
        lines.append(f"| {cls} | {m['gt_cells']} | {m['pred_cells']} | {_fmt(result.get(f'sem_iou_{cls}'))} "
                     f"[{_fmt(iou_lo)}, {_fmt(iou_hi)}] | {_fmt(result.get(f'sem_dice_{cls}'))} | "
                     f"{_fmt(m['det_f1'])} [{_fmt(lo)}, {_fmt(hi)}] | {_fmt(m['pq'])} |")
    lines += ["", f"nucleus Dice from the semantic map {_fmt(ct['nucleus_dice_semantic'])}, from the ternary map "
              f"{_fmt(ct['nucleus_dice_ternary'])}; mPQ {_fmt(ct['mpq'])}."]
    return lines


def group_table(name: str, groups: dict[str, dict[str, Any]]) -> list[str]:
    """Each cell type's pixel IoU per patient, with the GT cells it rests on."""
    lines = [f"{name}, IoU per patient (GT cells in brackets):", "",
             "| patient | images | " + " | ".join(CELL_TYPES) + " |", "|---|---|" + "---|" * len(CELL_TYPES)]
    for group, g in groups.items():
        cells = [f"{_fmt(g['iou'][t])} ({g['cells'][t]})" for t in CELL_TYPES]
        lines.append(f"| {group} | {g['images']} | " + " | ".join(cells) + " |")
    return lines


def confusion_table(name: str, matrix: list[list[int]]) -> list[str]:
    """Where each labelled class's pixels went: the share predicted as each semantic class."""
    m = np.asarray(matrix, dtype=np.float64)
    shares = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    lines = [f"{name}, semantic confusion (share of each labelled class's pixels predicted as each class):", "",
             "| labelled | " + " | ".join(f"as {c}" for c in SEMANTIC_CLASSES) + " | pixels |",
             "|---|" + "---|" * (len(SEMANTIC_CLASSES) + 1)]
    for cls, row, total in zip(SEMANTIC_CLASSES, shares, m.sum(axis=1), strict=True):
        lines.append(f"| {cls} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {int(total):,} |")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"
    return "n/a" if value is None else str(value)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate and write ``eval.json`` and ``eval.md`` under ``args.out``."""
    model = load_model(args.checkpoint)
    engine = make_engine(model, args)
    results: dict[str, dict[str, Any]] = {}
    for root in map(Path, args.data):
        kind = args.kind or detect_kind(root)
        samples = select(load_dataset(root, kind), kind, args)[: args.limit or None]
        metrics = evaluate_dataset(engine, samples, model.card.mpp, cell_types=kind == "monusac")
        results[kind] = metrics | {"data": str(root)}
    report = {"checkpoint": str(args.checkpoint), "sha256": model.sha256, "card": model.card.name,
              "engine": {"tile_size": args.tile_size, "overlap": args.overlap, "precision": engine.precision,
                         "stain": args.stain, "tta": args.tta},
              "datasets": results,
              "targets": check_targets(results)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1, default=_nan_none))
    (out / "eval.md").write_text(markdown(report))
    return report


def _nan_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help=".pt or .safetensors checkpoint")
    p.add_argument("--data", required=True, action="append", help="dataset folder (repeatable)")
    p.add_argument("--kind", choices=("monuseg", "consep", "monusac"), help="override layout detection")
    p.add_argument("--out", default="runs/eval", help="output folder for eval.json and eval.md")
    add_engine_args(p)
    add_split_args(p)
    p.add_argument("--limit", type=int, default=0, help="only the first N images per dataset (0: all)")
    return p.parse_args(argv)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's options, as ``make_engine`` reads them."""
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", action="store_true", help="the engine's test-time augmentation (four flips per tile)")
    p.add_argument("--stain", default=DEFAULTS.stain, choices=STAIN_METHODS,
                   help="the engine's stain normalisation (to the card's stain_reference, each image fitted on itself)")


def add_split_args(p: argparse.ArgumentParser) -> None:
    """A training run's split, as ``select`` reads it."""
    p.add_argument("--split", help="split.json of a training run: evaluate only its --part of each dataset")
    p.add_argument("--part", default="val", choices=("train", "val"))
    p.add_argument("--split-datasets", default="monusac",
                   help="comma-separated datasets the split applies to (others, e.g. test folders, are used whole)")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    report = run(parse_args(argv))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
