"""One slide in, result files out: the code path shared by ``nucseg predict`` and the worker."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from model.checkpoint import LoadedModel
from model.engine import BlockSink, Engine, RunReport
from model.maps import ClassMapSink
from model.nuclei import NucleusSink
from model.options import GROUP_FILES, OUTPUT_GROUPS, STATS_FILE, EngineOptions, Stats, result_files
from model.postprocess import engine_margin
from model.readers import SlideReader, open_slide

NUCSEG_VERSION = "0.1.0"


def build_sinks(
    out_dir: Path, outputs: frozenset[str], options: EngineOptions, *, model_mpp: float
) -> tuple[list[BlockSink], EngineOptions]:
    """The sinks for the requested outputs, and the engine options they need (e.g. a margin)."""
    sinks: list[BlockSink] = [ClassMapSink(out_dir, masks="masks" in outputs, overlays="overlays" in outputs)]
    if "nuclei" in outputs:
        sinks.append(NucleusSink(out_dir / GROUP_FILES["nuclei"][0]))
        NucleusSink.prepare(options)
    return sinks, sink_options(options, outputs, model_mpp=model_mpp)


def sink_options(options: EngineOptions, outputs: frozenset[str], *, model_mpp: float) -> EngineOptions:
    """The engine options the sinks of these outputs need (the nuclei's margin)."""
    if "nuclei" in outputs:
        return replace(options, margin=max(options.margin, engine_margin(model_mpp)))
    return options


def run_prediction(
    slide_path: Path,
    out_dir: Path,
    model: LoadedModel,
    options: EngineOptions,
    *,
    outputs: frozenset[str] = frozenset(OUTPUT_GROUPS),
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    max_image_pixels: int = 200_000_000,
    max_slide_pixels: int = 20_000_000_000,
) -> Stats:
    """Open the slide, run the engine, write the result files into ``out_dir``; return the stats."""
    reader = open_slide(slide_path, max_image_pixels=max_image_pixels, max_slide_pixels=max_slide_pixels)
    try:
        return predict_reader(reader, out_dir, model, options, outputs=outputs,
                              on_progress=on_progress, should_cancel=should_cancel)
    finally:
        reader.close()


def predict_reader(
    reader: SlideReader,
    out_dir: Path,
    model: LoadedModel,
    options: EngineOptions,
    *,
    outputs: frozenset[str] = frozenset(OUTPUT_GROUPS),
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Stats:
    """Like ``run_prediction`` for an already open reader."""
    result_files(outputs)  # validates the names
    out_dir.mkdir(parents=True, exist_ok=True)
    sinks, options = build_sinks(out_dir, outputs, options, model_mpp=model.card.mpp)
    engine = Engine(model, options)
    started = datetime.now(UTC)
    report = engine.run(reader, sinks, on_progress=on_progress, should_cancel=should_cancel)
    stats = build_stats(reader, model, engine.options, report, outputs, started)
    tmp = out_dir / f".{STATS_FILE}.tmp"
    tmp.write_text(json.dumps(stats, indent=2))
    tmp.replace(out_dir / STATS_FILE)
    return stats


def build_stats(reader: SlideReader, model: LoadedModel, options: EngineOptions, report: RunReport,
                outputs: frozenset[str], started: datetime) -> Stats:
    """The content of ``stats.json``."""
    width, height = report.analysis_size
    mpp = report.analysis_mpp
    stats: dict[str, Any] = {
        "slide": {
            "name": reader.name,
            "format": reader.format,
            "dimensions": list(reader.level_dimensions[0]),
            "levels": len(reader.level_dimensions),
            "mpp": reader.mpp,
        },
        "analysis": {"mpp": mpp, "width": width, "height": height, "level": report.level,
                     "mpp_source": _mpp_source(reader, options)},
        "tissue": {"detection": report.tissue_detection, **report.sinks.pop("tissue", {})},
        **report.sinks,
        "tiles": {"run": report.tiles_run, "reused": report.tiles_reused, "skipped": report.tiles_skipped,
                  "grid": report.grid_tiles},
        "blocks": {"total": report.blocks, "skipped": report.blocks_skipped},
        "model": {"name": model.card.name, "version": model.card.version, "encoder": model.card.encoder,
                  "sha256": model.sha256, "format": model.format, "mpp": model.card.mpp,
                  "held_out": _held_out(model)},
        "parameters": {**asdict(options), "outputs": sorted(outputs)},
        "device": report.device,
        "precision": report.precision,
        "timings_s": {k: round(v, 4) for k, v in report.timings.items()},
        "started_at": started.isoformat(),
        "warnings": report.warnings,
        "versions": versions(),
    }
    return cast(Stats, stats)  # the sinks' parts (semantic, ternary, nuclei) are checked by the tests


def _held_out(model: LoadedModel) -> dict[str, Any] | None:
    """The card's figures of the model's recipe on patients it never trained on, if it has them."""
    rv = model.card.recipe_validation
    return rv.model_dump(mode="json") if rv is not None else None


def _mpp_source(reader: SlideReader, options: EngineOptions) -> str:
    if options.mpp is not None:
        return "override"
    return "slide" if reader.mpp is not None else "assumed_model_mpp"


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    import numpy
    import openslide
    import segmentation_models_pytorch
    import torch

    return {
        "nucseg": NUCSEG_VERSION,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "segmentation_models_pytorch": segmentation_models_pytorch.__version__,
        "openslide": openslide.__library_version__,
        "openslide_python": openslide.__version__,
        "numpy": numpy.__version__,
        "host": os.uname().nodename if hasattr(os, "uname") else platform.node(),
    }
