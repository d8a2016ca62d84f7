"""The class-map sink: per-pixel argmax, class statistics, streamed masks and small overlays."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.engine import BlockResult, RunContext
from model.maskwriter import MaskWriter
from model.overlays import OverlayHead, OverlayWriter, sample_positions
from model.readers import thumbnail
from model.writers import ClassMapStore

OVERLAY_MAX_SIDE = 4096


@dataclass
class _Head:
    name: str
    classes: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...]
    counts: np.ndarray
    store: ClassMapStore | None = None
    writer: MaskWriter | None = None
    small: np.ndarray | None = None


class ClassMapSink:
    """The class maps of both heads per block: counts classes, stores masks, samples overlay maps."""

    needs_logits = False
    needs_probs = False

    def __init__(self, out_dir: Path, *, masks: bool = True, overlays: bool = True,
                 overlay_max_side: int = OVERLAY_MAX_SIDE) -> None:
        self.out_dir = out_dir
        self.masks, self.overlays = masks, overlays
        self.overlay_max_side = overlay_max_side
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._heads: list[_Head] = []
        self._ctx: RunContext | None = None
        self._k = 1.0
        self._row_left: Counter[int] = Counter()
        self._overlays: OverlayWriter | None = None

    def start(self, ctx: RunContext) -> None:
        self._ctx = ctx
        card, view = ctx.card, ctx.view
        self._heads = [
            _Head("semantic", card.semantic_classes, card.semantic_colours,
                  np.zeros(len(card.semantic_classes), np.int64)),
            _Head("ternary", card.ternary_classes, card.ternary_colours,
                  np.zeros(len(card.ternary_classes), np.int64)),
        ]
        if self.masks:
            self._tmp = tempfile.TemporaryDirectory(prefix=".maps-", dir=self.out_dir)
            for head in self._heads:
                head.store = ClassMapStore(Path(self._tmp.name) / f"{head.name}.raw", view.width, view.height)
                head.writer = MaskWriter(head.store, self.out_dir / f"{head.name}.png",
                                         self.out_dir / f"{head.name}.tiff", head.colours)
        self._row_left = Counter(b.y1 for b in ctx.blocks)  # blocks still to come per block row
        self._k = max(1.0, max(view.width, view.height) / self.overlay_max_side)
        if self.overlays:
            size = self._overlay_size()
            for head in self._heads:
                head.small = np.zeros((size[1], size[0]), dtype=np.uint8)
            heads = [OverlayHead(h.name, h.small, h.colours) for h in self._heads if h.small is not None]
            self._overlays = OverlayWriter(self.out_dir, self._thumbnail, heads, self._k, view.height)

    def _overlay_size(self) -> tuple[int, int]:
        assert self._ctx is not None
        view = self._ctx.view
        return max(1, round(view.width / self._k)), max(1, round(view.height / self._k))

    def add(self, block: BlockResult) -> None:
        box = block.inner
        if block.classes is None:
            maps = [np.zeros((box.height, box.width), np.uint8)] * 2
        else:
            rows, cols = block.inner_slices()
            maps = [block.classes[0, rows, cols], block.classes[1, rows, cols]]
        for head, classes in zip(self._heads, maps, strict=True):
            head.counts += class_counts(classes, len(head.classes))
            if head.store is not None and block.classes is not None:
                head.store.write_block(box.x0, box.y0, classes)
            if head.small is not None:
                self._sample(head.small, box.x0, box.y0, classes)
        self._row_left[box.y1] -= 1
        if self._row_left[box.y1] == 0:
            for head in self._heads:
                if head.writer is not None:
                    head.writer.rows_done(box.y1)
            if self._overlays is not None:
                self._overlays.rows_done(box.y1)

    def _sample(self, small: np.ndarray, x0: int, y0: int, classes: np.ndarray) -> None:
        """Nearest-neighbour: overlay pixel u samples analysis pixel floor((u + 0.5) * k)."""
        k = self._k
        us = sample_positions(x0, x0 + classes.shape[1], k, small.shape[1])
        vs = sample_positions(y0, y0 + classes.shape[0], k, small.shape[0])
        if len(us) and len(vs):
            src_x = np.floor((us + 0.5) * k).astype(np.int64) - x0
            src_y = np.floor((vs + 0.5) * k).astype(np.int64) - y0
            # us and vs are runs of consecutive indices; two takes are 7x faster than one 2-D gather
            small[vs[0] : vs[-1] + 1, us[0] : us[-1] + 1] = classes.take(src_y, axis=0).take(src_x, axis=1)

    def finish(self) -> dict[str, Any]:
        assert self._ctx is not None
        try:
            self._write_files()
        finally:
            self._close()
        return {
            "tissue": self._tissue_stats(),
            "semantic": self._head_stats(self._heads[0]),
            "ternary": self._head_stats(self._heads[1]),
        }

    def _tissue_stats(self) -> dict[str, float]:
        assert self._ctx is not None
        view, area_px = self._ctx.view, self._ctx.tissue.area_px()
        return {
            "area_px": round(area_px, 1),
            "area_um2": round(area_px * view.mpp * view.mpp, 3),
            "fraction_of_image": round(min(1.0, area_px / (view.width * view.height)), 6),
        }

    def _write_files(self) -> None:
        """Wait for the writer threads: the masks' and the overlays' last rows, the TIFFs' last pages."""
        try:
            for head in self._heads:
                if head.writer is not None:
                    writer, head.writer = head.writer, None
                    writer.close()
        finally:
            if self._overlays is not None:
                self._overlays.close()  # on error, abort() removes its files
                self._overlays = None

    def _thumbnail(self) -> np.ndarray:
        assert self._ctx is not None
        size = self._overlay_size()
        view = self._ctx.view
        if self._k == 1.0:
            return view.read(view.bounds)
        thumb, _ = thumbnail(view.reader, max(size))
        if (thumb.shape[1], thumb.shape[0]) == size:  # a pyramid level of the overlay's size
            return thumb
        return np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.LANCZOS))

    def _head_stats(self, head: _Head) -> dict[str, Any]:
        assert self._ctx is not None
        mpp = self._ctx.view.mpp
        tissue_um2 = self._ctx.tissue.area_px() * mpp * mpp
        classes = {}
        for name, count in zip(head.classes, head.counts.tolist(), strict=True):
            area = count * mpp * mpp
            classes[name] = {
                "pixels": int(count),
                "area_um2": round(area, 3),
                "tissue_fraction": round(area / tissue_um2, 6) if tissue_um2 > 0 else None,
            }
        return {"classes": classes, "total_pixels": int(head.counts.sum()),
                "colours": [list(c) for c in head.colours]}

    def abort(self) -> None:
        if self._overlays is not None:  # waits for a thumbnail read: the reader may be closed once we return
            self._overlays.abort()
            self._overlays = None
        for head in self._heads:
            if head.writer is not None:
                head.writer.abort()
                head.writer = None
        self._close()

    def _close(self) -> None:
        for head in self._heads:
            if head.store is not None:
                head.store.close()
                head.store = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def class_counts(classes: np.ndarray, n: int) -> np.ndarray:
    """Pixels of each class ``0..n-1`` in a uint8 map (values >= n are not counted).

    One vectorised comparison per class: 5x faster than ``np.bincount``, which widens a block's
    4 Mpx to int64 first (1.5 against 8.7 ms for a 2048² block with five classes).
    """
    return np.array([np.count_nonzero(classes == k) for k in range(n)], dtype=np.int64)
