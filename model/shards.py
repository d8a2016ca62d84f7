"""One slide run as shards of whole block rows, merged into the files a single run writes.

``shard_plan`` cuts the analysis view's block grid into ranges of whole block rows. ``run_shard``
runs the engine over one range and records, per block, what the sinks were given: the inner class
maps (and coverage) for ``ClassMapSink``, the owned nuclei (``BlockNuclei``) for ``NucleusSink``.
Each shard recomputes the tiles it shares with its neighbours, so shards need nothing from each
other and the merge never runs the network. ``merge_shards`` replays the records through the normal
sinks in block order: the masks, overlays, GeoJSON and stats equal those of ``predict_reader``
except the tile counters (the shared tiles run once per shard) and the timings.

A part folder is flat: ``classes.rec`` and ``nuclei.rec`` (records, below) and ``shard.json``,
written last, which marks the part complete and holds the other files' sizes and sha256. Files are
written under a temporary name and renamed when complete; a cancelled shard leaves no part file behind.

Bit-identical results need the shards to run on one kind of device, precision and software (the
merge checks device and precision); within that, the engine makes each tile's logits independent of
its batch and each block's blend independent of the cache (``model.engine``).

A record file is a sequence of records: an 8-byte little-endian header length, a JSON header
(``index``, ``meta``, and ``[name, dtype, shape, nbytes]`` per array), then each array's bytes,
zlib-compressed. No pickle anywhere.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from model.analysis import make_view
from model.checkpoint import LoadedModel, sha256_file
from model.engine import BlockResult, Engine, RunContext, RunReport, new_report, run_context
from model.errors import ShardError
from model.maps import ClassMapSink
from model.nuclei import NucleusSink
from model.options import STATS_FILE, EngineOptions, Stats, result_files
from model.partial import PartialFile, write_whole
from model.pipeline import build_sinks, build_stats, sink_options
from model.postprocess import BlockNuclei
from model.readers import SlideReader
from model.tiling import Box, plan_blocks

FORMAT = 1
MARKER = "shard.json"
CLASSES = "classes.rec"
NUCLEI = "nuclei.rec"
_LEN = struct.Struct("<Q")
_COUNTERS = ("tiles_run", "tiles_reused", "tiles_skipped", "tiles_shared", "blocks_skipped")
_UNCHECKED_OPTIONS = ("workers", "tile_cache_mb")  # change neither pixels nor nuclei


@dataclass(frozen=True)
class ShardPlan:
    """The analysis view's block grid cut into ranges of whole block rows, in row-major order."""

    blocks_total: int
    blocks_per_row: int
    shards: list[range]


def shard_plan(reader: SlideReader, model: LoadedModel, options: EngineOptions, *, outputs: frozenset[str],
               shard_blocks: int) -> ShardPlan:
    """Shards of about ``shard_blocks`` blocks each (at least one block row); no inference."""
    result_files(outputs)
    if shard_blocks < 1:
        raise ShardError(f"shard_blocks must be >= 1, got {shard_blocks}")
    view = make_view(reader, model.card.mpp, mpp_override=options.mpp)
    blocks = plan_blocks(view.width, view.height, options.block_size)
    per_row = -(-view.width // options.block_size)
    rows = max(1, round(shard_blocks / per_row))
    step = rows * per_row
    return ShardPlan(len(blocks), per_row, [range(i, min(i + step, len(blocks))) for i in range(0, len(blocks), step)])


def run_shard(reader: SlideReader, part_dir: Path, model: LoadedModel, options: EngineOptions, *,
              outputs: frozenset[str], blocks: range, on_progress: Callable[[int, int], None] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> None:
    """Run the engine over ``blocks`` and write the shard's part files into ``part_dir``.

    Raises ``CancelledError`` like ``Engine.run``, leaving no part file behind.
    """
    result_files(outputs)
    part_dir.mkdir(parents=True, exist_ok=True)
    (part_dir / MARKER).unlink(missing_ok=True)
    options = sink_options(options, outputs, model_mpp=model.card.mpp)
    engine = Engine(model, options)
    sinks: list[Any] = [_ClassRecorder(part_dir / CLASSES)]
    if "nuclei" in outputs:
        sinks.append(_NucleiRecorder(part_dir / NUCLEI))
    report = engine.run(reader, sinks, blocks=blocks, on_progress=on_progress, should_cancel=should_cancel)
    marker = {
        "format": FORMAT,
        "blocks": [blocks.start, blocks.stop],
        "blocks_total": report.blocks,
        "slide": _slide_key(reader),
        "analysis": {"width": report.analysis_size[0], "height": report.analysis_size[1],
                     "mpp": report.analysis_mpp, "level": report.level},
        "model_sha256": model.sha256,
        "options": _checked_options(options),
        "outputs": sorted(outputs),
        "device": report.device,
        "precision": report.precision,
        "counters": {name: getattr(report, name) for name in _COUNTERS},
        "timings": report.timings,
        "files": {name: _digest(part_dir / name) for name in _part_files(outputs)},
    }
    write_whole(part_dir / MARKER, json.dumps(marker, indent=1).encode())


def merge_shards(reader: SlideReader, part_dirs: Sequence[Path], out_dir: Path, model: LoadedModel,
                 options: EngineOptions, *, outputs: frozenset[str]) -> Stats:
    """Replay the shards' parts (in shard order) through the normal sinks into ``out_dir``.

    Writes the files ``predict_reader`` writes, and ``stats.json``; returns the stats. Raises
    ``ShardError`` when a part is missing, incomplete, or from another slide, model or options.
    """
    result_files(outputs)
    started, t0 = datetime.now(UTC), time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    sinks, options = build_sinks(out_dir, outputs, options, model_mpp=model.card.mpp)
    options.validate(model.network.output_stride)
    ctx = run_context(reader, model.card, options)
    markers = [_check_part(Path(d), ctx, reader, model, options, outputs) for d in part_dirs]
    _check_cover(markers, len(ctx.blocks))
    report = new_report(ctx, markers[0]["device"], markers[0]["precision"])
    options = options.for_device(report.device)  # as the shards ran
    report.clock("setup", time.perf_counter() - t0)
    _replay(ctx, [Path(d) for d in part_dirs], [range(*m["blocks"]) for m in markers], sinks, report)
    _add_counters(report, markers)
    report.clock("merge", time.perf_counter() - t0)
    stats = build_stats(reader, model, options, report, outputs, started)
    stats["shards"] = {"count": len(markers), "tiles_recomputed": report.tiles_shared}
    write_whole(out_dir / STATS_FILE, json.dumps(stats, indent=2).encode())
    return stats


# ---------------------------------------------------------------- recording (run_shard)


class _Records:
    """Appends records to ``<path>.partial``; ``close`` renames it to ``path``, ``abort`` removes it."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._file = PartialFile(path)

    def write(self, index: int, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        fh = self._file.fh
        assert fh is not None
        payloads = [zlib.compress(np.ascontiguousarray(a).tobytes(), 1) for a in arrays.values()]
        specs = [[name, a.dtype.str, list(a.shape), len(p)] for (name, a), p in zip(arrays.items(), payloads,
                                                                                     strict=True)]
        header = json.dumps({"index": index, "meta": meta, "arrays": specs}, separators=(",", ":")).encode()
        fh.write(_LEN.pack(len(header)) + header)
        for payload in payloads:
            fh.write(payload)

    def close(self) -> None:
        self._file.commit()

    def abort(self) -> None:
        self._file.abort()


class _ClassRecorder:
    """BlockSink: each block's inner class maps and coverage (nothing for a no-tissue block)."""

    needs_logits = False
    needs_probs = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: _Records | None = None

    def start(self, ctx: RunContext) -> None:
        self._out = _Records(self.path)

    def add(self, block: BlockResult) -> None:
        assert self._out is not None
        if block.classes is None or block.covered is None:
            self._out.write(block.index, {"skipped": True}, {})
            return
        rows, cols = block.inner_slices()
        self._out.write(block.index, {"skipped": False},
                        {"classes": block.classes[:, rows, cols], "covered": block.covered[rows, cols]})

    def finish(self) -> dict[str, Any]:
        assert self._out is not None
        self._out.close()
        return {}

    def abort(self) -> None:
        if self._out is not None:
            self._out.abort()


class _NucleiRecorder(NucleusSink):
    """NucleusSink that records each block's ``BlockNuclei`` instead of writing GeoJSON and stats."""

    def __init__(self, path: Path) -> None:
        super().__init__(None)
        self.path = path
        self._out: _Records | None = None

    def start(self, ctx: RunContext) -> None:
        super().start(ctx)
        self._out = _Records(self.path)

    def record(self, result: BlockNuclei) -> None:
        assert self._out is not None
        self._out.write(-1, *_nuclei_record(result))

    def finish(self) -> dict[str, Any]:
        super().finish()
        assert self._out is not None
        self._out.close()
        return {}

    def abort(self) -> None:
        super().abort()
        if self._out is not None:
            self._out.abort()


def _nuclei_record(result: BlockNuclei) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    r = result.region
    coords = np.concatenate(result.rings) if result.rings else np.zeros((0, 2), np.float64)
    meta = {"region": [r.x0, r.y0, r.x1, r.y1], "oversized": result.oversized, "timings": result.timings}
    return meta, {"coords": coords, "ring_sizes": np.array([len(x) for x in result.rings], np.int64),
                  "class_index": result.class_index, "area_um2": result.area_um2, "confidence": result.confidence}


def _nuclei_result(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> BlockNuclei:
    ends = np.cumsum(arrays["ring_sizes"])
    rings = np.split(arrays["coords"], ends[:-1]) if len(ends) else []
    return BlockNuclei(Box(*meta["region"]), rings, arrays["class_index"], arrays["area_um2"],
                       arrays["confidence"], int(meta["oversized"]), dict(meta["timings"]))


def part_names(marker: bytes) -> list[str]:
    """The files of a shard part, from its marker's bytes (the marker itself last)."""
    return [*json.loads(marker)["files"], MARKER]


def _part_files(outputs: frozenset[str]) -> list[str]:
    return [CLASSES, NUCLEI] if "nuclei" in outputs else [CLASSES]


def _digest(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------- replay (merge_shards)


def _read_records(path: Path) -> Iterator[tuple[int, dict[str, Any], dict[str, np.ndarray]]]:
    """The records of a file, one at a time; ``ShardError`` on a truncated or corrupt file."""
    try:
        with path.open("rb") as fh:
            while head := fh.read(_LEN.size):
                header = json.loads(_exact(fh, _LEN.unpack(head)[0]))
                arrays = {
                    name: np.frombuffer(zlib.decompress(_exact(fh, size)), dtype=_plain(dtype)).reshape(shape)
                    for name, dtype, shape, size in header["arrays"]
                }
                yield header["index"], header["meta"], arrays
    except (OSError, ValueError, KeyError, struct.error, zlib.error) as exc:
        raise ShardError(f"shard part {path} cannot be read: {type(exc).__name__}: {exc}") from exc


def _plain(dtype: str) -> np.dtype[Any]:
    """A numeric dtype (never an object one)."""
    found = np.dtype(dtype)
    if found.kind not in "biuf":
        raise ValueError(f"unexpected dtype {dtype!r}")
    return found


def _exact(fh: IO[bytes], size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise ValueError(f"truncated: {len(data)} of {size} bytes")
    return data


def _replay(ctx: RunContext, part_dirs: list[Path], shards: list[range], sinks: Sequence[Any],
            report: RunReport) -> None:
    maps = next(s for s in sinks if isinstance(s, ClassMapSink))
    nuclei = next((s for s in sinks if isinstance(s, NucleusSink)), None)
    try:
        for sink in sinks:
            sink.start(ctx)
        for part, blocks in zip(part_dirs, shards, strict=True):
            found = _read_records(part / NUCLEI) if nuclei is not None else iter(())
            at = blocks.start
            for index, meta, arrays in _read_records(part / CLASSES):
                if index != at or at >= blocks.stop:
                    raise ShardError(f"shard part {part}: record of block {index}, expected block {at}")
                at += 1
                block = _block(ctx, index, meta, arrays)
                maps.add(block)
                if nuclei is not None and block.classes is not None:
                    nuclei.record(_next_nuclei(found, block, ctx, part))
            if at != blocks.stop:
                raise ShardError(f"shard part {part}: records end at block {at}, expected {blocks.stop}")
            if next(found, None) is not None:
                raise ShardError(f"shard part {part}: more nuclei records than blocks")
        for sink in sinks:
            report.sinks.update(sink.finish())
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def _block(ctx: RunContext, index: int, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> BlockResult:
    inner = ctx.blocks[index]
    if meta["skipped"]:
        return BlockResult(index, inner, inner, None, None)
    classes, covered = arrays["classes"], arrays["covered"]
    if classes.shape != (2, inner.height, inner.width) or covered.shape != (inner.height, inner.width):
        raise ShardError(f"block {index}: class maps of shape {classes.shape}, expected "
                         f"{(2, inner.height, inner.width)}")
    return BlockResult(index, inner, inner, None, covered, classes)


def _next_nuclei(found: Iterator[tuple[int, dict[str, Any], dict[str, np.ndarray]]], block: BlockResult,
                 ctx: RunContext, part: Path) -> BlockNuclei:
    item = next(found, None)
    if item is None:
        raise ShardError(f"shard part {part}: no nuclei record for block {block.index}")
    result = _nuclei_result(item[1], item[2])
    expected = block.inner.expand(ctx.options.margin, ctx.view.bounds)
    if result.region != expected:
        raise ShardError(f"shard part {part}: nuclei record of region {result.region}, block {block.index} "
                         f"has {expected}")
    return result


def _add_counters(report: RunReport, markers: list[dict[str, Any]]) -> None:
    for marker in markers:
        for name in _COUNTERS:
            setattr(report, name, getattr(report, name) + int(marker["counters"][name]))
        for name, seconds in marker["timings"].items():
            report.clock(name, float(seconds))


# ---------------------------------------------------------------- checks


def _checked_options(options: EngineOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if k not in _UNCHECKED_OPTIONS}


def _slide_key(reader: SlideReader) -> dict[str, Any]:
    return {"name": reader.name, "dimensions": [list(d) for d in reader.level_dimensions]}


def _check_part(part: Path, ctx: RunContext, reader: SlideReader, model: LoadedModel, options: EngineOptions,
                outputs: frozenset[str]) -> dict[str, Any]:
    """The part's marker, once it proves the part complete and made for this merge."""
    try:
        marker = json.loads((part / MARKER).read_text())
    except FileNotFoundError as exc:
        raise ShardError(f"shard part {part} is incomplete: no {MARKER} (the shard did not finish)") from exc
    except (OSError, ValueError) as exc:
        raise ShardError(f"shard part {part}: unreadable {MARKER}: {exc}") from exc
    view = ctx.view
    expected = {
        "format": FORMAT,
        "blocks_total": len(ctx.blocks),
        "slide": _slide_key(reader),
        "analysis": {"width": view.width, "height": view.height, "mpp": view.mpp, "level": view.level},
        "model_sha256": model.sha256,
        "options": json.loads(json.dumps(_checked_options(options))),
        "outputs": sorted(outputs),
    }
    for key, value in expected.items():
        if marker.get(key) != value:
            raise ShardError(f"shard part {part} was made for another run: {key} is {marker.get(key)!r}, "
                             f"this merge needs {value!r}")
    for name in _part_files(outputs):
        recorded = marker["files"].get(name)
        if not (part / name).is_file() or recorded is None:
            raise ShardError(f"shard part {part}: {name} is missing")
        if _digest(part / name) != recorded:
            raise ShardError(f"shard part {part}: {name} is not the file the shard wrote ({recorded['bytes']} bytes, "
                             f"sha256 {recorded['sha256'][:12]}...)")
    return dict(marker)


def _check_cover(markers: list[dict[str, Any]], total: int) -> None:
    """The parts' block ranges follow each other from block 0 to the last, with one device and precision."""
    if not markers:
        raise ShardError("no shard parts to merge")
    at = 0
    for i, marker in enumerate(markers):
        start, stop = marker["blocks"]
        if start != at:
            raise ShardError(f"shard {i} covers blocks {start}..{stop - 1}, expected it to start at block {at}")
        at = stop
        if (marker["device"], marker["precision"]) != (markers[0]["device"], markers[0]["precision"]):
            raise ShardError(f"shard {i} ran on {marker['device']}/{marker['precision']}, shard 0 on "
                             f"{markers[0]['device']}/{markers[0]['precision']}")
    if at != total:
        raise ShardError(f"the shards cover blocks 0..{at - 1} of {total}")
