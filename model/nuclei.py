"""The nuclei sink: blocks' nuclei into a streamed GeoJSON and per-class statistics.

Each block's post-processing (``model.postprocess.block_nuclei``) runs in the engine's process
(``EngineOptions.workers == 0``) or in a pool of worker processes (``model.nuclei_pool``); results
are recorded in block order either way, so the GeoJSON and the stats do not depend on the worker count.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.engine import BlockResult, RunContext
from model.errors import OptionsError
from model.geojson import FeatureStyle, GeoJSONWriter, block_features
from model.nuclei_pool import NucleiPool, available_cores, start_server
from model.options import EngineOptions
from model.postprocess import (
    NUCLEUS_MARGIN_UM,
    BlockNuclei,
    BlockPlace,
    PostprocessParams,
    block_nuclei,
    nucleus_margin_px,
    write_instances_png,
)
from model.tiling import Box

OTHER = "other"
OTHER_COLOUR = (160, 160, 160)
LYMPHOCYTE = "lymphocyte"
INSTANCES_MAX_PIXELS = 64_000_000  # instances.png only for images up to this size (uint32: 256 MB)


def nuclei_workers(workers: int | None) -> int:
    """Worker processes for ``EngineOptions.workers``: None = the cores this process may use (none
    when that is one core, or when this process is daemonic, as a Celery prefork pool process is:
    those may not start processes), 0 = none (post-processing in the engine's process)."""
    if workers is None:
        cores = available_cores()
        return cores if cores > 1 and not multiprocessing.current_process().daemon else 0
    if workers and multiprocessing.current_process().daemon:
        raise OptionsError(f"workers={workers}: a daemonic process (a Celery prefork pool process) may not start "
                           "nuclei processes; use workers=0, or a Celery worker with --pool threads or solo")
    return workers


class _Growable:
    """A float32 array that grows by appending chunks (amortised doubling)."""

    def __init__(self) -> None:
        self._data = np.empty(1024, dtype=np.float32)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.size + len(values)
        if need > len(self._data):
            grown = np.empty(max(need, 2 * len(self._data)), dtype=np.float32)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : need] = values
        self.size = need

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]


class NucleusSink:
    """BlockSink: nuclei of each block into a streamed GeoJSON, stats into ``finish()["nuclei"]``.

    ``geojson_path`` None keeps stats only. ``instances_path`` writes a uint32 label image (PNG,
    RGBA bytes of the little-endian label: decode with ``np.asarray(img).view('<u4')[..., 0]``),
    label ``k`` being the ``k``-th GeoJSON feature; refused over ``INSTANCES_MAX_PIXELS``.
    """

    needs_logits = False
    needs_probs = True

    def __init__(
        self,
        geojson_path: str | Path | None = None,
        *,
        params: PostprocessParams = PostprocessParams(),
        instances_path: str | Path | None = None,
    ) -> None:
        params.validate()
        self.params = params
        self.geojson_path = Path(geojson_path) if geojson_path is not None else None
        self.instances_path = Path(instances_path) if instances_path is not None else None
        self._writer: GeoJSONWriter | None = None
        self._instances: np.ndarray | None = None
        self._pool: NucleiPool | None = None
        self.timings = {"postprocess_s": 0.0, "polygons_s": 0.0, "geojson_s": 0.0, "write_s": 0.0, "handoff_s": 0.0}

    @staticmethod
    def prepare(options: EngineOptions) -> None:
        """Before a run: start the fork server its worker processes will fork from, which loads their
        libraries while the engine opens the slide and finds its tissue."""
        if nuclei_workers(options.workers):
            start_server()

    def start(self, ctx: RunContext) -> None:
        classes = ctx.card.semantic_classes
        if len(classes) < 2 or len(ctx.card.semantic_colours) != len(classes):
            raise OptionsError(f"model card needs background + cell types with colours, got {classes}")
        self.mpp = ctx.view.mpp
        self.scale = ctx.view.l0_per_px
        self.bounds = ctx.view.bounds
        self.margin = ctx.options.margin
        required = nucleus_margin_px(self.mpp)
        if self.margin < required and len(ctx.blocks) > 1:
            raise OptionsError(
                f"NucleusSink needs EngineOptions.margin >= {required} px ({NUCLEUS_MARGIN_UM} µm at "
                f"{self.mpp:.4g} µm/px), got {self.margin}"
            )
        self.names = (*classes[1:], OTHER)
        self.style = FeatureStyle(self.names, (*ctx.card.semantic_colours[1:], OTHER_COLOUR))
        self.tissue_mm2 = ctx.tissue.area_px() * self.mpp**2 / 1e6
        self.areas = [_Growable() for _ in self.names]
        self.oversized = 0
        self._writer = GeoJSONWriter(self.geojson_path) if self.geojson_path is not None else None
        self.workers = nuclei_workers(ctx.options.workers)
        self._pool = None  # started by the first block to post-process
        if self.instances_path is not None:
            self._instances = self._allocate_instances(ctx.view.width, ctx.view.height)

    def _allocate_instances(self, width: int, height: int) -> np.ndarray:
        if width * height > INSTANCES_MAX_PIXELS:
            raise OptionsError(
                f"instances.png is for small images: {width}x{height} = {width * height} analysis "
                f"pixels, over the cap of {INSTANCES_MAX_PIXELS}"
            )
        return np.zeros((height, width), dtype=np.uint32)

    def add(self, block: BlockResult) -> None:
        if block.classes is None or block.probs is None:
            return
        place = BlockPlace(block.region, block.inner, self.bounds, self.mpp, self.scale, self.params,
                           keep_labels=self._instances is not None)
        if not self.workers:
            self.record(block_nuclei(place, block.classes[1], block.probs))
            return
        if self._pool is None:
            self._pool = NucleiPool(self.workers, self.style if self._writer is not None else None)
        t0 = time.perf_counter()
        done = self._pool.submit(block.index, place, block.classes[1], block.probs)
        self.timings["handoff_s"] += time.perf_counter() - t0
        for result in done:
            self.record(result)

    def record(self, result: BlockNuclei) -> None:
        """Take one block's nuclei (in block order): from ``add``, or replayed from a record of a run."""
        t0 = time.perf_counter()
        for key, seconds in result.timings.items():
            self.timings[key] += seconds
        self.oversized += result.oversized
        cls = result.class_index
        for k in range(len(self.names)):
            self.areas[k].extend(result.area_um2[cls == k])
        first_label = sum(a.size for a in self.areas) - len(cls) + 1
        if self._writer is not None:
            features = result.features
            if features is None:  # post-processed here, or replayed from a record
                features = block_features(result, self.style)
            for body in features:
                self._writer.write_feature(body)
        if self._instances is not None and result.labels is not None and result.ids is not None and len(cls):
            self._paint(result.labels, result.ids, first_label, result.region)
        self.timings["write_s"] += time.perf_counter() - t0

    def _paint(self, labels: np.ndarray, ids: np.ndarray, first_label: int, region: Box) -> None:
        assert self._instances is not None
        lut = np.zeros(int(labels.max()) + 1, dtype=np.uint32)
        lut[ids] = np.arange(first_label, first_label + len(ids), dtype=np.uint32)
        out = self._instances[region.y0 : region.y1, region.x0 : region.x1]
        painted = lut[labels]
        np.copyto(out, painted, where=painted > 0)

    def finish(self) -> dict[str, Any]:
        if self._pool is not None:
            for result in self._pool.drain():
                self.record(result)
            self._pool.close()
            self._pool = None
        if self._writer is not None:
            self._writer.close()
        if self._instances is not None and self.instances_path is not None:
            write_instances_png(self.instances_path, self._instances)
            self._instances = None
        return {"nuclei": self.stats()}

    def abort(self) -> None:
        """Stop the workers and drop the partial GeoJSON."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._writer is not None:
            self._writer.abort()
        self._instances = None

    def stats(self) -> dict[str, Any]:
        """Counts, densities and areas per class, and the lymphocyte fraction."""
        total = sum(a.size for a in self.areas)
        per_class = {
            name: _class_stats(a.values, self.tissue_mm2) for name, a in zip(self.names, self.areas, strict=True)
        }
        lymph = per_class[LYMPHOCYTE]["count"] if LYMPHOCYTE in per_class else None
        return {
            "count": total,
            "classes": per_class,
            # lymphocytes / all nuclei: a simple tumour-infiltrating-lymphocyte (TIL) indicator,
            # not a validated TIL score (no stroma/tumour compartments).
            "lymphocyte_fraction": (lymph / total) if lymph is not None and total else None,
            "lymphocyte_fraction_definition": "lymphocyte nuclei / all nuclei; a simple TIL indicator",
            "density_unit": "nuclei per mm² of tissue",
            "tissue_area_mm2": self.tissue_mm2,
            "min_area_um2": self.params.min_area_um2,
            "mpp": self.mpp,
            "margin_px": self.margin,
            "oversized": self.oversized,
            "workers": self.workers,
            "geojson": self.geojson_path.name if self.geojson_path is not None else None,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def _class_stats(areas: np.ndarray, tissue_mm2: float) -> dict[str, Any]:
    n = len(areas)
    return {
        "count": n,
        "density_per_mm2": n / tissue_mm2 if tissue_mm2 > 0 else None,
        "mean_area_um2": float(areas.mean(dtype=np.float64)) if n else None,
        "median_area_um2": float(np.median(areas)) if n else None,
    }


