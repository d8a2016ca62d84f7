"""Nuclei called one cell type that touch no labelled pixel, with crops to read by eye.

``python -m training.audit --checkpoint X --data ../shared/data/monusac --split S --part val
--cell-type epithelial [--sample 32] [--seed 0] [--out runs/audit]``

MoNuSAC labels four cell types and leaves every other pixel background, including nuclei its
annotators did not outline. A call of a type on a nucleus that touches no labelled pixel counts
wholly against that type's IoU, whether the nucleus is of another kind (a true error) or one left
out of the labels; no metric can tell the two apart. This tool counts such calls, samples some
with a fixed seed and draws each, numbered (the crop, and the crop with the call outlined in
yellow and labelled cells in cyan), so that a reader can. On the other side it splits the type's
labelled pixels called background into those within ``BORDER_PX`` of a pixel called a nucleus
(outlines that disagree) and those of cells missed whole (under ``MISSED_SHARE`` of their pixels
called a nucleus). It writes ``audit.json`` (the counts, the type's pixel IoU, the IoU it would
have if every such nucleus were labelled that type, the sampled calls) and ``sheet_<k>.png``,
eight crops a sheet.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from model.checkpoint import load_model
from model.postprocess import Nuclei, find_nuclei
from training.celltypes import CELL_TYPES
from training.evaluate import add_engine_args, add_split_args, load_dataset, make_engine, select

CALL_RGB = (255, 255, 0)
LABEL_RGB = (0, 255, 255)
CROPS_PER_SHEET = 8
BORDER_PX = 2
MISSED_SHARE = 0.1


@dataclass(frozen=True)
class Call:
    """One predicted nucleus of the audited type that touches no labelled pixel."""

    image: str
    nucleus: int
    y: int
    x: int
    pixels: int


@dataclass
class Tally:
    """Counts of one type, pooled over images; pixels "called the type" are those whose semantic
    argmax is the type, "unlabelled" those of its calls on nuclei that touch no labelled pixel."""

    calls: int = 0
    unlabelled_calls: int = 0
    tp: int = 0
    union: int = 0
    unlabelled_px_called_type: int = 0
    unlabelled_px_not_called_type: int = 0
    cells: int = 0
    cells_missed: int = 0
    called_background: int = 0
    called_background_near_call: int = 0
    called_background_in_missed_cells: int = 0

    def update(self, pred: np.ndarray, truth: np.ndarray, unlabelled: np.ndarray, calls: int, found: int) -> None:
        """Add one image: ``pred``/``truth`` the type's pixels, ``unlabelled`` the unlabelled calls' pixels."""
        self.calls += calls
        self.unlabelled_calls += found
        self.tp += int((pred & truth).sum())
        self.union += int((pred | truth).sum())
        self.unlabelled_px_called_type += int((unlabelled & pred).sum())
        self.unlabelled_px_not_called_type += int((unlabelled & ~pred).sum())

    def update_missed(self, nucleus: np.ndarray, truth: np.ndarray) -> None:
        """Add one image's labelled pixels of the type called background (``nucleus``: called any type)."""
        background = truth & ~nucleus
        near = ndi.distance_transform_edt(~nucleus) <= BORDER_PX if nucleus.any() else np.zeros_like(nucleus)
        cells, n = ndi.label(truth)
        shares = np.asarray(ndi.mean(nucleus, cells, np.arange(1, n + 1))) if n else np.zeros(0)
        missed = np.concatenate([[False], shares < MISSED_SHARE])[cells]
        self.cells += n
        self.cells_missed += int((shares < MISSED_SHARE).sum())
        self.called_background += int(background.sum())
        self.called_background_near_call += int((background & near).sum())
        self.called_background_in_missed_cells += int((background & missed).sum())

    def result(self) -> dict[str, Any]:
        """Counts, the IoU, and the IoU were every unlabelled call's nucleus labelled the type
        (``None`` where the type is neither labelled nor predicted)."""
        iou = self.tp / self.union if self.union else None
        relabelled = self.union + self.unlabelled_px_not_called_type
        ceiling = (self.tp + self.unlabelled_px_called_type) / relabelled if relabelled else None
        return {**asdict(self), "iou": iou, "iou_if_unlabelled_calls_labelled": ceiling}


def unlabelled_calls(nuclei: Nuclei, cell_type: int, labelled: np.ndarray) -> tuple[np.ndarray, int]:
    """``(ids, calls)``: labels of the ``nuclei`` called ``cell_type`` (an index into
    ``CELL_TYPES``) whose pixels are all unlabelled, and how many were called that type in all."""
    touched = np.bincount(nuclei.labels[labelled].ravel(), minlength=nuclei.n + 1)[1:] > 0
    called = nuclei.class_index == cell_type
    return np.flatnonzero(called & ~touched) + 1, int(called.sum())


def describe(name: str, nuclei: Nuclei, ids: np.ndarray) -> list[Call]:
    """A ``Call`` for each label in ``ids``: the pixel holding its centroid, and its area."""
    return [Call(name, int(i), int(nuclei.centroid_xy[i - 1, 1]), int(nuclei.centroid_xy[i - 1, 0]),
                 int(nuclei.area_px[i - 1])) for i in ids]


def _window(a: np.ndarray, y: int, x: int, radius: int) -> np.ndarray:
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad)[y:y + 2 * radius, x:x + 2 * radius]


def _edge(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndi.binary_erosion(mask)


def crop_pair(image: np.ndarray, call: np.ndarray, labelled: np.ndarray, y: int, x: int,
              radius: int = 48, zoom: int = 2) -> np.ndarray:
    """The crop around ``(y, x)`` beside the same crop with ``call`` and ``labelled`` outlined,
    zoomed ``zoom`` times; outside the image is black."""
    raw = _window(image, y, x, radius)
    drawn = raw.copy()
    drawn[_edge(_window(call, y, x, radius))] = CALL_RGB
    drawn[_edge(_window(labelled, y, x, radius))] = LABEL_RGB
    pair = np.concatenate([raw, drawn], axis=1)
    return np.repeat(np.repeat(pair, zoom, axis=0), zoom, axis=1)


def sheets(crops: Sequence[np.ndarray], per_sheet: int = CROPS_PER_SHEET, per_row: int = 2) -> list[np.ndarray]:
    """Crops laid out ``per_row`` to a row, ``per_sheet`` to a sheet, in order (blank fills the last)."""
    out = []
    for start in range(0, len(crops), per_sheet):
        chunk = list(crops[start:start + per_sheet])
        chunk += [np.zeros_like(crops[0])] * (per_sheet - len(chunk))
        rows = [np.concatenate(chunk[r:r + per_row], axis=1) for r in range(0, per_sheet, per_row)]
        out.append(np.concatenate(rows, axis=0))
    return out


def audit_image(tally: Tally, name: str, sem_argmax: np.ndarray, semantic: np.ndarray, nuclei: Nuclei,
                cell_type: int) -> list[Call]:
    """Add one image to ``tally``: its semantic argmax, labels (``semantic``, MoNuSAC classes) and
    nuclei. Returns the unlabelled calls of ``cell_type``."""
    ids, calls = unlabelled_calls(nuclei, cell_type, semantic > 0)
    truth = semantic == cell_type + 1
    tally.update(sem_argmax == cell_type + 1, truth, np.isin(nuclei.labels, ids), calls, len(ids))
    tally.update_missed(sem_argmax > 0, truth)
    return describe(name, nuclei, ids)


def draw(calls: Sequence[Call], images: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """A crop pair per call; ``images[name]`` is ``(RGB image, nucleus labels, semantic labels)``."""
    crops = []
    for c in calls:
        image, labels, semantic = images[c.image]
        crops.append(crop_pair(image, labels == c.nucleus, semantic > 0, c.y, c.x))
    return crops


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Audit and write ``audit.json`` and the sheets under ``args.out``."""
    from model.blending import nucleus_inputs

    model = load_model(args.checkpoint)
    engine = make_engine(model, args)
    cell_type = CELL_TYPES.index(args.cell_type)
    tally, calls, images = Tally(), [], {}
    samples = select(load_dataset(Path(args.data), "monusac"), "monusac", args)
    for s in samples:
        sem, ter = engine.predict_array(s.image)
        nuclei = find_nuclei(*nucleus_inputs(sem, ter), mpp=model.card.mpp)
        calls += audit_image(tally, s.name, sem.argmax(0), s.semantic, nuclei, cell_type)
        images[s.name] = (s.image, nuclei.labels, s.semantic)
    picked = random.Random(args.seed).sample(calls, min(args.sample, len(calls)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    crops = draw(picked, images)
    for k, sheet in enumerate(sheets(crops) if crops else []):
        Image.fromarray(sheet).save(out / f"sheet_{k}.png")
    report = {"checkpoint": str(args.checkpoint), "sha256": model.sha256, "cell_type": args.cell_type,
              "images": len(samples), "seed": args.seed, **tally.result(),
              "sampled": [{"number": i, **asdict(c)} for i, c in enumerate(picked)]}
    (out / "audit.json").write_text(json.dumps(report, indent=1))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help=".pt or .safetensors checkpoint")
    p.add_argument("--data", required=True, help="a MoNuSAC folder (class masks)")
    p.add_argument("--cell-type", required=True, choices=CELL_TYPES)
    p.add_argument("--sample", type=int, default=32, help="calls drawn for reading")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/audit", help="output folder for audit.json and the sheets")
    add_engine_args(p)
    add_split_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    report = run(parse_args(argv))
    print(json.dumps({k: v for k, v in report.items() if k != "sampled"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
