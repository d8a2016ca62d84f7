"""The inference engine: blocks over one global tile grid, Gaussian blending, bounded memory.

``Engine.run(reader, sinks)`` walks the analysis level block by block. Each block's region is the
block plus an optional margin for post-processing; for each block it runs exactly the grid tiles
that touch its region, blends them into a region-sized accumulator on the network's device
(``model.blending``) and hands every sink the region's uint8 class maps (and, to sinks that need
them, the uint8 nuclei maps or the blended float32 logits). Because every pixel is the weighted mean
over the same global tiles, the output does not depend on the block size; and since every forward
pass has ``batch_size`` tiles (``TileRunner``) and each block adds its tiles in one fixed order, it
does not depend on which tiles the cache held either, to the last bit. So the parts of a region
that the block to its left and the block above already made are taken from their maps, not blended
again (``model.seams``; not when a sink wants the logits themselves). Memory is two blocks of
accumulators, a block row's strip of maps (held only while it is smaller than one of them) and the
model, whatever the slide's size.

Sinks (``BlockSink``) do everything after blending: masks, overlays, stats, nuclei. They run on a
thread of their own (``_SinkThread``), a block behind the blending, which first turns each blended
block into its maps (from the second of two accumulator workspaces), so reading
(``reader_threads``), the network with the blending, and the host work overlap; every hand-over
is a bounded queue, so a slow stage holds the others back and memory stays flat.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from model.analysis import AnalysisView, make_view
from model.blending import Accumulator, Workspace, gaussian_weights, region_maps
from model.blockplan import BlockJob, TileUses, add_sources, share_maps, strip_bytes
from model.card import ModelCard
from model.checkpoint import LoadedModel
from model.device import TileRunner, emulation_warning, resolve_device, resolve_precision, torch_threads
from model.errors import CancelledError, OptionsError
from model.nuclei_pool import available_cores
from model.options import EngineOptions
from model.readers import ArrayReader, SlideReader
from model.seams import SharedMaps
from model.stain import StainTransform, fit_stain
from model.tilecache import BlockIndex, TileCache
from model.tiling import Box, TileGrid, TileKey, iter_batches, plan_blocks
from model.tissue import TissueMask, detect_tissue, full_tissue, slide_thumbnail

log = logging.getLogger(__name__)
N_SEMANTIC = 5
N_CHANNELS = 8  # 5 semantic + 3 ternary logits
MAX_READERS = 4  # block reader threads, at most (fewer on fewer cores)
WORKSPACES = 2  # accumulators: one being blended, one being turned into maps


@dataclass
class BlockResult:
    """One blended block over ``region`` (``inner`` plus margin); all None for a no-tissue block.

    ``classes`` (uint8, semantic then ternary argmax, 0 where not covered) always comes back from
    the device; ``probs`` (uint8 ``nucleus_maps``) and the float32 ``logits`` only when a sink needs
    them (``BlockSink.needs_probs``, ``BlockSink.needs_logits``). On a CPU ``classes``, ``covered``
    and ``probs`` lie in storage the next block's maps reuse: valid while the sinks take this block.
    """

    index: int
    inner: Box
    region: Box
    logits: np.ndarray | None
    covered: np.ndarray | None
    classes: np.ndarray | None = None
    probs: np.ndarray | None = None

    @property
    def sem_logits(self) -> np.ndarray | None:
        return None if self.logits is None else self.logits[:N_SEMANTIC]

    @property
    def ter_logits(self) -> np.ndarray | None:
        return None if self.logits is None else self.logits[N_SEMANTIC:]

    def inner_slices(self) -> tuple[slice, slice]:
        """Row and column slices of ``inner`` within ``region``."""
        y0, x0 = self.inner.y0 - self.region.y0, self.inner.x0 - self.region.x0
        return slice(y0, y0 + self.inner.height), slice(x0, x0 + self.inner.width)


@dataclass
class RunContext:
    """What sinks learn before the first block."""

    view: AnalysisView
    tissue: TissueMask
    blocks: list[Box]
    card: ModelCard
    options: EngineOptions
    tissue_detection: bool = False  # ``tissue`` was detected (else every pixel counts as tissue)
    stain: StainTransform | None = None  # applied to every block's pixels as they are read


def run_context(reader: SlideReader, card: ModelCard, options: EngineOptions) -> RunContext:
    """The analysis view, tissue mask, stain transform and block plan of a slide: deterministic, no inference."""
    view = make_view(reader, card.mpp, mpp_override=options.mpp)
    use_tissue = options.tissue if options.tissue is not None else len(reader.level_dimensions) > 1
    thumb = slide_thumbnail(view) if use_tissue or options.stain != "none" else None
    tissue = detect_tissue(view, thumb) if use_tissue else full_tissue(view)
    stain, warning = fit_stain(options.stain, card.stain_reference, thumb[0]) if thumb is not None else (None, None)
    if warning:
        view.warnings.append(warning)
    blocks = plan_blocks(view.width, view.height, options.block_size)
    return RunContext(view, tissue, blocks, card, options, use_tissue, stain)


def _selected(blocks: range | None, total: int) -> range:
    if blocks is None:
        return range(total)
    if blocks.step != 1 or not 0 <= blocks.start <= blocks.stop <= total:
        raise OptionsError(f"blocks must be a contiguous range within range(0, {total}), got {blocks}")
    return blocks


class BlockSink(Protocol):
    """Consumes blended blocks; ``finish`` returns its contribution to the stats."""

    needs_logits: bool  # the blended float32 logits, not only the class maps
    needs_probs: bool  # the uint8 nuclei maps (``model.blending.nucleus_maps``)

    def start(self, ctx: RunContext) -> None: ...

    def add(self, block: BlockResult) -> None:
        """Take a block; its arrays are valid until this returns (copy what is kept)."""

    def finish(self) -> dict[str, Any]: ...

    def abort(self) -> None:
        """The run stopped early (cancel, error): release what ``start`` took, keep no partial files."""


@dataclass
class RunReport:
    """Counts and timings of one run."""

    tiles_run: int = 0
    tiles_reused: int = 0
    tiles_skipped: int = 0
    tiles_shared: int = 0  # tiles run here that blocks before the run's first block also need (shards)
    px_shared: int = 0  # region pixels whose maps a block took from its neighbours (``model.seams``; this run's)
    grid_tiles: int = 0
    blocks: int = 0
    blocks_skipped: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    analysis_mpp: float = 0.0
    analysis_size: tuple[int, int] = (0, 0)
    level: int = 0
    tissue_detection: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sinks: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def clock(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name`` (reader threads clock too)."""
        with self._lock:
            self.timings[name] = self.timings.get(name, 0.0) + seconds


def new_report(ctx: RunContext, device: str, precision: str) -> RunReport:
    """An empty report of a run over ``ctx``."""
    view, opts = ctx.view, ctx.options
    grid = TileGrid(opts.tile_size, opts.overlap, view.width, view.height)
    return RunReport(
        grid_tiles=grid.n_x * grid.n_y, blocks=len(ctx.blocks), device=device, precision=precision,
        analysis_mpp=view.mpp, analysis_size=(view.width, view.height), level=view.level,
        tissue_detection=ctx.tissue_detection, warnings=list(view.warnings),
    )


ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class Engine:
    """Runs a loaded model over a slide, block by block."""

    def __init__(self, model: LoadedModel, options: EngineOptions | None = None) -> None:
        options = options or EngineOptions()
        options.validate(model.network.output_stride)
        self.card = model.card
        self.device = resolve_device(options.device)
        self.options = options.for_device(str(self.device))  # what ran, for the stats
        batch, cache_mb = self.options.batch_size, self.options.tile_cache_mb
        assert batch is not None and cache_mb is not None, "for_device fills both"
        self.batch_size, self.cache_bytes = batch, cache_mb << 20
        self.precision = resolve_precision(self.options.precision, self.device)
        self.runner = TileRunner(model.network, model.card, self.device, self.precision,
                                 batch=self.batch_size, tta=self.options.tta)
        self.weights = gaussian_weights(self.options.tile_size, self.options.sigma_scale, str(self.device))
        self.network_threads = torch.get_num_threads()  # the forward pass's; blending on a CPU runs on one

    def _host_threads(self) -> AbstractContextManager[None]:
        """Blending on a CPU uses one core: the readers, sinks and nuclei processes have the others."""
        return torch_threads(1) if self.device.type == "cpu" else nullcontext()

    def run(
        self,
        reader: SlideReader,
        sinks: Sequence[BlockSink] = (),
        *,
        blocks: range | None = None,
        on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> RunReport:
        """Process the slide; sinks receive every block in row-major order.

        ``blocks`` limits the run to those block indices (a shard of the slide): sinks still learn
        the whole block list, progress counts only these, and the tiles they touch all run here.
        """
        started = time.perf_counter()
        ctx = run_context(reader, self.card, self.options)
        todo = _selected(blocks, len(ctx.blocks))
        grid = TileGrid(self.options.tile_size, self.options.overlap, ctx.view.width, ctx.view.height)
        report = new_report(ctx, str(self.device), self.precision)
        if warning := emulation_warning(self.precision, self.device):
            report.warnings.append(warning)
        report.clock("setup", time.perf_counter() - started)
        try:
            self._run_blocks(ctx, grid, todo, report, sinks, on_progress, should_cancel)
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
        report.clock("total", time.perf_counter() - started)
        return report

    def _run_blocks(self, ctx: RunContext, grid: TileGrid, blocks: range, report: RunReport,
                    sinks: Sequence[BlockSink], on_progress: ProgressFn | None, should_cancel: CancelFn | None) -> None:
        for sink in sinks:
            sink.start(ctx)
        wants = _Wants(any(s.needs_logits for s in sinks), any(s.needs_probs for s in sinks))
        spaces, held, storage = _Workspaces(self.device), SharedMaps(), _MapStorage(self.device)
        feeder = _SinkThread(sinks, report, len(blocks), on_progress, should_cancel,
                             prepare=lambda blended: self._maps(blended, wants, report, spaces, held, storage))
        share = not wants.logits  # the blended logits of every region pixel: nothing shared
        try:
            for done, blended in enumerate(self._blocks(ctx, grid, blocks, report, spaces, feeder.check, share),
                                           start=1):
                feeder.put(done, blended)
            feeder.close()
        except BaseException:
            feeder.abort()
            raise
        t0 = time.perf_counter()
        for sink in sinks:
            report.sinks.update(sink.finish())
        report.clock("finish", time.perf_counter() - t0)

    def predict_array(self, image: np.ndarray, *, mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Blended ``(5, H, W)`` and ``(3, H, W)`` logits of an in-memory RGB image.

        The image is taken to be at the model's resolution unless ``mpp`` says otherwise.
        """
        reader = ArrayReader(image, mpp=mpp if mpp is not None else self.card.mpp)
        sink = CollectSink()
        self.run(reader, [sink])
        assert sink.logits is not None
        return sink.logits[:N_SEMANTIC], sink.logits[N_SEMANTIC:]

    def _blocks(
        self, ctx: RunContext, grid: TileGrid, blocks: range, report: RunReport, spaces: _Workspaces,
        check: Callable[[], None], share: bool,
    ) -> Iterator[_Blended]:
        """Blend each block, reading the next blocks' pixels on helper threads meanwhile; with
        ``share``, the parts of its region that blocks before it hold are not blended again."""
        view = ctx.view
        index = BlockIndex(view.width, self.options.block_size, self.options.margin, start=blocks.start)
        jobs = [self._block_job(i, ctx.blocks[i], view, grid, ctx.tissue, report) for i in blocks]
        shared, uses = complete_plan(jobs, grid, index.n_x, view.width, self.options.margin, share=share)
        report.px_shared += shared
        tiles = _Tiles(grid, index, uses, TileCache(self.cache_bytes))
        spaces.reserve(_workspace_floats(jobs))

        def read(box: Box) -> np.ndarray:
            return self._read(view, box, report, ctx.stain)

        def read_ahead(job: BlockJob) -> np.ndarray | None:
            return None if job.source is None else read(job.source)

        for job, pixels in _prefetch(jobs, read_ahead, reader_threads()):
            if not job.tiles:
                report.blocks_skipped += 1
                yield _Blended(job)
            else:
                yield self._blend(job, _Pixels(job.source, pixels, read), tiles, report, spaces.take(check))
            tiles.cache.retire(job.index)
        report.tiles_reused = tiles.cache.hits

    def _block_job(self, index: int, inner: Box, view: AnalysisView, grid: TileGrid, tissue: TissueMask,
                   report: RunReport) -> BlockJob:
        """The block with the tissue tiles its region touches (``model.blockplan`` completes its plan)."""
        region = inner.expand(self.options.margin, view.bounds)
        touching = grid.tiles_touching(region)
        tiles = [t for t in touching if tissue.any_in(_clip(grid.tile_box(*t), view.bounds))]
        report.tiles_skipped += len(touching) - len(tiles)
        return BlockJob(index, inner, region, tiles)

    def _read(self, view: AnalysisView, box: Box, report: RunReport, stain: StainTransform | None) -> np.ndarray:
        """The pixels of ``box`` (stain-normalised when asked), mostly on a reader thread."""
        t0 = time.perf_counter()
        pixels = read_reflected(view, box)
        report.clock("read", time.perf_counter() - t0)
        if stain is not None:
            t0 = time.perf_counter()
            pixels = stain(pixels)
            report.clock("stain", time.perf_counter() - t0)
        return pixels

    @torch.inference_mode()
    def _blend(self, job: BlockJob, pixels: _Pixels, tiles: _Tiles, report: RunReport,
               workspace: Workspace) -> _Blended:
        """The block's tiles run (or taken from the cache) and added into an accumulator over ``workspace``."""
        grid, cache = tiles.grid, tiles.cache
        with self._host_threads():
            acc = Accumulator(job.share.own_part(job.region), N_CHANNELS, self.device, workspace)
            cached = {t: hit for t in job.tiles if (hit := cache.get(t)) is not None}  # held: offers may evict
            to_run = [t for t in job.tiles if t not in cached]
            pixels.cover([grid.tile_box(*t) for t in to_run])  # tiles the cache no longer holds: read now
            batches = iter_batches(to_run, self.batch_size)
            ready: dict[TileKey, torch.Tensor] = {}
            t0, forward = time.perf_counter(), report.timings.get("forward", 0.0)
            for tile in job.tiles:  # one fixed order, whatever was cached: float sums depend on their order
                tile_logits = cached.get(tile)
                if tile_logits is None:
                    if tile not in ready:
                        ready = self._forward(next(batches), job, pixels, tiles, report)
                    tile_logits = ready.pop(tile)
                acc.add(grid.tile_box(*tile), tile_logits, self.weights)
            report.clock("blend", time.perf_counter() - t0 - (report.timings.get("forward", 0.0) - forward))
        return _Blended(job, acc, workspace)

    @torch.inference_mode()
    def _maps(self, blended: _Blended, wants: _Wants, report: RunReport, spaces: _Workspaces,
              held: SharedMaps, storage: _MapStorage) -> BlockResult:
        """What the sinks receive of a blended block (on the sinks' thread, in ``storage``); gives its
        workspace back. The parts of its region that blocks before it made come from ``held``; those
        that blocks after it take are kept there."""
        job, acc = blended.job, blended.acc
        if acc is None or blended.workspace is None:
            return BlockResult(job.index, job.inner, job.region, None, None)
        t0 = time.perf_counter()
        try:
            with self._host_threads():
                maps = storage.take(job.region, wants.probs)  # classes, covered[, probs]
                held.fill(job.region, job.share, maps)
                own = [m[..., job.share.rows :, job.share.cols :] for m in maps]
                values, weights, covered = acc.sums(own[1])
                host = None
                if wants.logits:  # the blended logits themselves: divided whole, copied (the workspace is reused)
                    host = values.div_(weights).to("cpu", copy=True).numpy()
                region_maps(values, covered, N_SEMANTIC, probs=wants.probs, weights=None if wants.logits else weights,
                            out=(own[0], own[2] if wants.probs else None))
                held.keep(job.region, job.lent_cols, job.lent_rows, maps)
                classes, whole, *probs = (m.cpu().numpy() for m in maps)
                return BlockResult(job.index, job.inner, job.region, host, whole, classes, probs[0] if probs else None)
        finally:
            spaces.give(blended.workspace)
            report.clock("maps", time.perf_counter() - t0)

    def _forward(self, batch: list[TileKey], job: BlockJob, pixels: _Pixels, tiles: _Tiles,
                 report: RunReport) -> dict[TileKey, torch.Tensor]:
        """Run one batch of tiles; offer their logits to the cache."""
        boxes = [tiles.grid.tile_box(*t) for t in batch]
        stacked = np.stack([pixels.cut(b) for b in boxes])
        t0 = time.perf_counter()
        with torch_threads(self.network_threads):
            out = self.runner(stacked)
        for tile, box, tile_logits in zip(batch, boxes, out, strict=True):
            tiles.cache.offer(tile, tile_logits, tiles.uses.of(tile), job.index, self.runner.exact_dtype)
            report.tiles_shared += tiles.index.needed_before(box)
        report.tiles_run += len(batch)
        report.clock("forward", time.perf_counter() - t0)
        return dict(zip(batch, out, strict=True))


class _MapStorage:
    """One block's maps at a time in storage kept from block to block: uint8 class maps
    ``(2, h, w)``, the covered mask ``(h, w)`` and, with ``probs``, uint8 nuclei maps
    ``(N_SEMANTIC + 1, h, w)``. Fresh maps for each block are pages touched for the first time:
    on an 8,192 px slide the sinks' thread faulted 110-170 k pages a run with them, 86-95 k without
    (the sinks copy what they keep: ``BlockSink.add``)."""

    def __init__(self, device: torch.device) -> None:
        self._flat = torch.empty(0, dtype=torch.uint8, device=device)

    def take(self, region: Box, probs: bool) -> list[torch.Tensor]:
        """Views for ``region``'s maps over the storage (its earlier views are overwritten)."""
        shapes = _map_shapes(region.height, region.width, probs)
        sizes = [math.prod(shape) for shape in shapes]
        if self._flat.numel() < sum(sizes):
            self._flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self._flat.device)
        maps = [part.view(shape) for part, shape in zip(self._flat[: sum(sizes)].split(sizes), shapes, strict=True)]
        maps[1] = maps[1].view(torch.bool)
        return maps


def _map_shapes(h: int, w: int, probs: bool) -> list[tuple[int, ...]]:
    """A block's uint8 maps: class maps, covered mask and, with ``probs``, nuclei maps."""
    return [(2, h, w), (h, w)] + [(N_SEMANTIC + 1, h, w)] * probs


@dataclass
class _Blended:
    """A block added up in an accumulator, whose maps the sinks' thread makes (no tiles: no accumulator)."""

    job: BlockJob
    acc: Accumulator | None = None
    workspace: Workspace | None = None


class _Workspaces:
    """``WORKSPACES`` accumulator workspaces, taken in turn: the engine's thread blends a block into
    one while the sinks' thread makes the previous block's maps from another. Each is held from
    ``take`` (blending) to ``give`` (its maps made), so memory stays at that many regions."""

    def __init__(self, device: torch.device) -> None:
        self._all = [Workspace(device) for _ in range(WORKSPACES)]
        self._free: queue.Queue[Workspace] = queue.Queue()
        for workspace in self._all:
            self._free.put(workspace)

    def reserve(self, n: int) -> None:
        for workspace in self._all:
            workspace.reserve(n)

    def take(self, check: Callable[[], None]) -> Workspace:
        """A free workspace, waiting while all are held; ``check`` raises if the sinks' thread failed."""
        while True:
            check()
            with suppress(queue.Empty):
                return self._free.get(timeout=0.05)

    def give(self, workspace: Workspace) -> None:
        """``workspace``'s maps are made: it may take the next block."""
        self._free.put(workspace)


@dataclass(frozen=True)
class _Wants:
    """What the sinks need besides the class maps."""

    logits: bool
    probs: bool


def complete_plan(jobs: list[BlockJob], grid: TileGrid, per_row: int, width: int, margin: int, *,
                  share: bool) -> tuple[int, TileUses]:
    """Complete the plan of a run's ``jobs`` (``model.blockplan``): with ``share``, what each block takes
    of its neighbours' maps (the rows above too, while a block row's strip of maps fits in one more
    accumulator workspace), then what each reads ahead and which blocks add each tile. Returns the
    region pixels shared and the tiles' uses."""
    shared = 0
    if share:
        map_bytes = sum(math.prod(shape) for shape in _map_shapes(1, 1, probs=True))
        rows = strip_bytes(width, margin, per_row, map_bytes) <= _workspace_floats(jobs) * 4
        shared = share_maps(jobs, grid, per_row, rows=rows)
    add_sources(jobs, grid)
    return shared, TileUses(jobs)


def _workspace_floats(jobs: list[BlockJob]) -> int:
    """The floats of one accumulator workspace: every channel and the weights over the largest region."""
    return max((job.region.area for job in jobs), default=0) * (N_CHANNELS + 1)


@dataclass(frozen=True)
class _Tiles:
    """The tile grid of a run, which blocks need each tile, and the tiles' logits kept for them."""

    grid: TileGrid
    index: BlockIndex  # the blocks before a shard's first (``BlockIndex.needed_before``)
    uses: TileUses
    cache: TileCache


class _Pixels:
    """A block's pixels: the box read ahead, and boxes read later for tiles the cache dropped."""

    def __init__(self, box: Box | None, pixels: np.ndarray | None, read: Callable[[Box], np.ndarray]) -> None:
        self._parts = [(box, pixels)] if box is not None and pixels is not None else []
        self._read = read

    def cover(self, boxes: list[Box]) -> None:
        """Read, in one box, the pixels of those ``boxes`` not held yet."""
        missing = [b for b in boxes if self._holding(b) is None]
        if missing:
            box = Box.around(missing)
            self._parts.append((box, self._read(box)))

    def cut(self, box: Box) -> np.ndarray:
        """The pixels of ``box`` (a view)."""
        part = self._holding(box)
        if part is None:
            raise KeyError(f"no pixels read for {box}")
        origin, pixels = part
        return pixels[box.y0 - origin.y0 : box.y1 - origin.y0, box.x0 - origin.x0 : box.x1 - origin.x0]

    def _holding(self, box: Box) -> tuple[Box, np.ndarray] | None:
        return next(((o, p) for o, p in self._parts if o.contains(box)), None)


def _clip(box: Box, bounds: Box) -> Box:
    return box.intersect(bounds) or Box(bounds.x0, bounds.y0, bounds.x0, bounds.y0)


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices ``start..stop-1`` mapped into ``[0, n)`` by mirror reflection (numpy's 'reflect')."""
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def read_reflected(view: AnalysisView, box: Box) -> np.ndarray:
    """Pixels of ``box``; parts past the image are the image mirrored at its edge."""
    inside = Box(max(box.x0, 0), max(box.y0, 0), min(box.x1, view.width), min(box.y1, view.height))
    if inside == box:
        return view.read(box)
    top, left, bottom, right = inside.y0 - box.y0, inside.x0 - box.x0, box.y1 - inside.y1, box.x1 - inside.x1
    if max(top, bottom) < inside.height and max(left, right) < inside.width:
        # one mirror image a side: OpenCV's BORDER_REFLECT_101 is 'reflect', 50x faster than a gather
        return cv2.copyMakeBorder(view.read(inside), top, bottom, left, right, cv2.BORDER_REFLECT_101)
    ys = reflect_indices(box.y0, box.y1, view.height)
    xs = reflect_indices(box.x0, box.x1, view.width)
    src = Box(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return view.read(src).take(ys - src.y0, axis=0).take(xs - src.x0, axis=1)


def reader_threads() -> int:
    """Threads reading blocks ahead: OpenSlide reads are thread-safe and decoding runs without the GIL."""
    return min(MAX_READERS, available_cores())


def _prefetch(jobs: list[BlockJob], read: Callable[[BlockJob], np.ndarray | None],
              threads: int = 1) -> Iterator[tuple[BlockJob, np.ndarray | None]]:
    """Yield ``(job, read(job))`` in order, reading up to ``threads`` blocks ahead, one per thread.

    Bounded: a slow consumer holds the readers back (at most ``threads`` blocks read ahead of it).
    On exit every read still running is waited for, so the slide may be closed afterwards.
    """
    pool = ThreadPoolExecutor(threads, thread_name_prefix="nucseg-block-reader")
    pending: deque[tuple[BlockJob, Future[np.ndarray | None]]] = deque()
    todo = iter(jobs)
    try:
        for job in itertools.islice(todo, threads):
            pending.append((job, pool.submit(read, job)))
        while pending:
            job, future = pending.popleft()
            pixels = future.result()
            for nxt in itertools.islice(todo, 1):
                pending.append((nxt, pool.submit(read, nxt)))
            yield job, pixels
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _SinkThread:
    """The sinks, on a thread of their own, so that the next block is read, run and blended while
    they work on this one. Blocks reach them in order through a queue of one (a slow sink holds the
    engine back); ``prepare`` turns each into the sinks' ``BlockResult`` first (its maps); progress and
    cancel are checked after each block; the first error ends the run.
    """

    def __init__(self, sinks: Sequence[BlockSink], report: RunReport, total: int, on_progress: ProgressFn | None,
                 should_cancel: CancelFn | None, prepare: Callable[[_Blended], BlockResult]) -> None:
        self.sinks, self.report, self.total = sinks, report, total
        self.on_progress, self.should_cancel, self.prepare = on_progress, should_cancel, prepare
        self._queue: queue.Queue[tuple[int, _Blended] | None] = queue.Queue(1)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="nucseg-sinks", daemon=True)
        self._thread.start()

    def put(self, done: int, blended: _Blended) -> None:
        """Hand over block number ``done`` (1-based), waiting while the sinks are a block behind."""
        self._offer((done, blended))

    def close(self) -> None:
        """Every block handed over: wait until the sinks have taken them all."""
        self._offer(None)
        self._thread.join()
        self.check()

    def abort(self) -> None:
        """Stop after the block in the sinks' hands (if any); the sinks are idle when this returns."""
        self._stop.set()
        with suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join()

    def _offer(self, item: tuple[int, _Blended] | None) -> None:
        while True:
            self.check()
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        """Raise the sinks' error, if one ended their thread."""
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            while (item := self._queue.get()) is not None and not self._stop.is_set():
                self._add(*item)
        except BaseException as exc:  # handed to the engine's thread
            self._error = exc

    def _add(self, done: int, blended: _Blended) -> None:
        result = self.prepare(blended)
        t0 = time.perf_counter()
        for sink in self.sinks:
            sink.add(result)
        self.report.clock("sinks", time.perf_counter() - t0)
        if self.on_progress is not None:
            self.on_progress(done, self.total)
        if self.should_cancel is not None and done < self.total and self.should_cancel():
            raise CancelledError(f"cancelled after block {done} of {self.total}")


class CollectSink:
    """Keeps the whole image's class maps, and with ``logits`` its blended logits, in memory: for
    small images, tests and benchmarks only."""

    needs_probs = False

    def __init__(self, *, logits: bool = True) -> None:
        self.needs_logits = logits
        self.logits: np.ndarray | None = None
        self.classes: np.ndarray | None = None
        self.covered: np.ndarray | None = None

    def start(self, ctx: RunContext) -> None:
        shape = (ctx.view.height, ctx.view.width)
        self.logits = np.zeros((N_CHANNELS, *shape), dtype=np.float32) if self.needs_logits else None
        self.classes = np.zeros((2, *shape), dtype=np.uint8)
        self.covered = np.zeros(shape, dtype=bool)

    def add(self, block: BlockResult) -> None:
        assert self.classes is not None and self.covered is not None
        if block.covered is None:
            return
        rows, cols = block.inner_slices()
        b = block.inner
        inner = np.s_[b.y0 : b.y1, b.x0 : b.x1]
        self.covered[inner] = block.covered[rows, cols]
        if block.classes is not None:
            self.classes[:, inner[0], inner[1]] = block.classes[:, rows, cols]
        if self.logits is not None and block.logits is not None:
            self.logits[:, inner[0], inner[1]] = block.logits[:, rows, cols]

    def finish(self) -> dict[str, Any]:
        return {}

    def abort(self) -> None:
        self.logits = self.classes = self.covered = None


def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads (None leaves the default)."""
    if n:
        torch.set_num_threads(n)
