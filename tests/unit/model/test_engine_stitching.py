"""Exact stitching: trivial networks over grids of tile x overlap x image size x block size."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import model.engine as engine_module
from model.analysis import make_view
from model.blending import region_maps
from model.engine import CollectSink, Engine, EngineOptions, read_reflected
from model.readers import ArrayReader
from model.tiling import Box, TileGrid, plan_blocks
from tests.helpers.stubs import TrivialNet, loaded

TILE_OVERLAPS = ((32, 0), (32, 8), (64, 24), (96, 40))
SIZES = ((32, 32), (37, 100), (191, 257), (64, 65))
FNS = {
    "constant": (lambda x: x * 0 + 0.375, lambda img: np.full((*img.shape[:2], 3), 0.375, np.float32)),
    "identity": (lambda x: x, lambda img: img.astype(np.float32) / 255.0),
    "x_plus_1": (lambda x: x + 1.0, lambda img: img.astype(np.float32) / 255.0 + 1.0),
}


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _run(image: np.ndarray, fn_name: str, tile: int, overlap: int, block: int) -> CollectSink:
    engine = Engine(loaded(TrivialNet(FNS[fn_name][0])),
                    EngineOptions(tile_size=tile, overlap=overlap, block_size=block, batch_size=3,
                                  precision="fp32", device="cpu", tissue=False))
    sink = CollectSink()
    engine.run(ArrayReader(image, mpp=0.25), [sink])
    return sink


def _expected(image: np.ndarray, fn_name: str) -> np.ndarray:
    rgb = FNS[fn_name][1](image).transpose(2, 0, 1)
    return np.concatenate((rgb, rgb[:2], rgb))


@pytest.mark.parametrize(("tile", "overlap"), TILE_OVERLAPS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fn_name", sorted(FNS))
def test_blend_equals_analytic_and_blocks_equal_whole(tile: int, overlap: int, size: tuple[int, int],
                                                        fn_name: str) -> None:
    image = _image(*size)
    whole = _run(image, fn_name, tile, overlap, block=4096)
    assert whole.covered is not None and whole.covered.all(), "every pixel must be covered"
    np.testing.assert_allclose(whole.logits, _expected(image, fn_name), atol=1e-5, rtol=0)
    for block in (17, 50):
        blocked = _run(image, fn_name, tile, overlap, block=block)
        np.testing.assert_allclose(blocked.logits, whole.logits, atol=1e-5, rtol=0)


def test_position_dependent_network_blends_identically_across_blocks() -> None:
    """A network whose output depends on the position inside the tile: blocks must not matter."""

    def ramp(x):  # type: ignore[no-untyped-def]
        import torch

        t = x.shape[-1]
        pos = torch.arange(t, dtype=x.dtype).view(1, 1, 1, t) / t
        return x * 0.5 + pos

    image = _image(150, 170, seed=3)
    opts = dict(tile_size=64, overlap=24, batch_size=5, precision="fp32", device="cpu", tissue=False)
    sinks = []
    for block in (4096, 33, 70):
        engine = Engine(loaded(TrivialNet(ramp)), EngineOptions(block_size=block, **opts))  # type: ignore[arg-type]
        sink = CollectSink()
        engine.run(ArrayReader(image, mpp=0.25), [sink])
        sinks.append(sink)
    for other in sinks[1:]:
        np.testing.assert_allclose(other.logits, sinks[0].logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("width", "height", "tile", "overlap"), [(1, 1, 32, 8), (500, 33, 64, 16), (257, 1000, 96, 0)])
def test_grid_covers_image_and_tiles_touching_is_exact(width: int, height: int, tile: int, overlap: int) -> None:
    grid = TileGrid(tile, overlap, width, height)
    last = grid.tile_box(grid.n_x - 1, grid.n_y - 1)
    assert last.x1 >= width and last.y1 >= height
    assert grid.n_x == 1 or grid.tile_box(grid.n_x - 2, 0).x1 < width
    for block in plan_blocks(width, height, 45):
        touching = set(grid.tiles_touching(block))
        brute = {(tx, ty) for ty in range(grid.n_y) for tx in range(grid.n_x)
                 if grid.tile_box(tx, ty).intersect(block) is not None}
        assert touching == brute


def test_blocks_partition_the_image() -> None:
    blocks = plan_blocks(101, 57, 20)
    cover = np.zeros((57, 101), dtype=int)
    for b in blocks:
        cover[b.y0 : b.y1, b.x0 : b.x1] += 1
    assert (cover == 1).all()
    assert Box(0, 0, 10, 10).intersect(Box(10, 0, 20, 10)) is None


@pytest.mark.parametrize("cache_mb", [0, 1, 512])
def test_tile_cache_runs_each_tile_once_and_changes_nothing(cache_mb: int) -> None:
    image = _image(300, 410, seed=5)

    def run(mb: int) -> tuple[CollectSink, int, int, int]:
        engine = Engine(loaded(TrivialNet(lambda x: x * 3 - 1)),
                        EngineOptions(tile_size=64, overlap=24, block_size=70, margin=9, precision="fp32",
                                      device="cpu", tissue=False, tile_cache_mb=mb))
        sink = CollectSink()
        report = engine.run(ArrayReader(image, mpp=0.25), [sink])
        return sink, report.tiles_run, report.tiles_reused, report.grid_tiles

    base, run0, reused0, grid = run(0)
    sink, tiles_run, reused, _ = run(cache_mb)
    rgb = (image.astype(np.float32) / 255 * 3 - 1).transpose(2, 0, 1)  # without a cache, every shared
    np.testing.assert_allclose(base.logits, np.concatenate((rgb, rgb[:2], rgb)), atol=1e-5)  # tile is read again
    np.testing.assert_allclose(sink.logits, base.logits, atol=1e-5, rtol=0)
    assert tiles_run + reused == run0 and reused0 == 0
    if cache_mb == 512:
        assert tiles_run == grid, "with room for every shared tile, each grid tile runs exactly once"
    elif cache_mb == 1:
        assert reused > 0 and tiles_run > grid


def test_bf16_logits_are_cached_in_half_the_bytes_and_blend_the_same() -> None:
    """A network run in bf16 gives logits that bf16 holds exactly: the cache keeps twice as many
    tiles in a budget, and the blend is the same to the bit whichever tiles it held."""
    image = _image(300, 410, seed=9)

    def run(mb: int, precision: str) -> tuple[CollectSink, int]:
        engine = Engine(loaded(TrivialNet(lambda x: x * 3 - 1)),
                        EngineOptions(tile_size=64, overlap=24, block_size=70, margin=9, precision=precision,
                                      device="cpu", tissue=False, tile_cache_mb=mb))
        sink = CollectSink()
        report = engine.run(ArrayReader(image, mpp=0.25), [sink])
        return sink, report.tiles_run

    uncached, all_run = run(0, "bf16")
    cached, bf16_run = run(1, "bf16")  # 1 MB: 16 tiles' bf16 logits, 8 tiles' float32 ones
    _, fp32_run = run(1, "fp32")
    assert uncached.logits is not None and cached.logits is not None
    np.testing.assert_array_equal(cached.logits, uncached.logits)
    assert bf16_run < fp32_run < all_run


def test_slow_maps_on_the_sinks_thread_leave_every_block_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block's maps are made on the sinks' thread while the next blocks are blended: maps made
    slowly (so that blending runs well ahead) give the same logits and class maps as the analytic
    blend, so no block is blended into a workspace whose maps are still being made."""
    image = _image(260, 330, seed=8)

    def slow_maps(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)
        return region_maps(*args, **kwargs)

    monkeypatch.setattr(engine_module, "region_maps", slow_maps)
    engine = Engine(loaded(TrivialNet(lambda x: x * 2 - 0.5)),
                    EngineOptions(tile_size=32, overlap=8, block_size=40, margin=5, batch_size=3,
                                  precision="fp32", device="cpu", tissue=False))
    sink = CollectSink(logits=False)
    report = engine.run(ArrayReader(image, mpp=0.25), [sink])
    assert report.blocks == 63 and report.timings["maps"] >= 63 * 0.02
    rgb = (image.astype(np.float32) / 255 * 2 - 0.5).transpose(2, 0, 1)
    expected = np.stack((rgb.argmax(0), rgb.argmax(0)))
    assert sink.classes is not None
    np.testing.assert_array_equal(sink.classes, expected)


class _CountingReader(ArrayReader):
    """Counts the pixels read."""

    pixels = 0

    def read_region(self, level: int, l0_x: int, l0_y: int, w: int, h: int) -> np.ndarray:
        self.pixels += w * h
        return super().read_region(level, l0_x, l0_y, w, h)


def test_blocks_read_only_the_pixels_of_tiles_no_earlier_block_ran() -> None:
    """Tiles shared with earlier blocks come from the tile cache: their pixels are not read again."""
    image = _image(300, 410, seed=6)
    opts = EngineOptions(tile_size=64, overlap=24, block_size=100, margin=20, precision="fp32", device="cpu",
                         tissue=False)
    engine = Engine(loaded(TrivialNet(lambda x: x * 2)), opts)
    reader = _CountingReader(image, mpp=0.25)
    sink = CollectSink()
    report = engine.run(reader, [sink])
    grid, bounds = TileGrid(64, 24, 410, 300), Box(0, 0, 410, 300)
    every_tile = 0  # what reading all the tiles of each block's region would cost
    for block in plan_blocks(410, 300, 100):
        union = grid.union_box(grid.tiles_touching(block.expand(20, bounds)))
        every_tile += union.width * union.height
    assert report.tiles_run == report.grid_tiles
    assert image.shape[0] * image.shape[1] <= reader.pixels < 0.8 * every_tile
    rgb = (image.astype(np.float32) / 255 * 2).transpose(2, 0, 1)
    np.testing.assert_allclose(sink.logits, np.concatenate((rgb, rgb[:2], rgb)), atol=1e-5)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 3), (37, 100)])
def test_reads_past_the_edge_mirror_the_image_as_numpy_reflect(size: tuple[int, int]) -> None:
    h, w = size
    image = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    view = make_view(ArrayReader(image, mpp=0.25), 0.25)
    pad = 2 * max(h, w) + 3  # several mirror images a side where the image is small
    mirrored = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    for x0, y0, x1, y1 in [(0, 0, w, h), (-1, 0, w, h), (-(w - 1), -(h - 1), w + w - 1, h + h - 1),
                           (-w, -h, 2 * w, 2 * h), (-pad, 2, w + pad, h + 3), (1, -pad, 2, -pad + 1)]:
        got = read_reflected(view, Box(x0, y0, x1, y1))
        np.testing.assert_array_equal(got, mirrored[pad + y0 : pad + y1, pad + x0 : pad + x1])


class _RecordSink:
    """Keeps every block's region maps as the engine hands them over."""

    needs_probs = True

    def __init__(self, *, logits: bool) -> None:
        self.needs_logits = logits
        self.blocks: dict[int, tuple[Box, np.ndarray | None, np.ndarray | None, np.ndarray | None]] = {}

    def start(self, ctx: Any) -> None:
        pass

    def add(self, block: Any) -> None:  # the arrays are valid during ``add`` only: copied
        self.blocks[block.index] = (block.region, *(None if a is None else a.copy()
                                                    for a in (block.classes, block.covered, block.probs)))

    def finish(self) -> dict[str, Any]:
        return {}

    def abort(self) -> None:
        pass


def _regions(width: int, height: int, block: int, margin: int) -> list[Box]:
    bounds = Box(0, 0, width, height)
    return [b.expand(margin, bounds) for b in plan_blocks(width, height, block)]


@pytest.mark.parametrize(("size", "block", "margin", "tissue"),
                         [((230, 310), 70, 9, False), ((230, 310), 64, 30, False), ((230, 500), 90, 12, True),
                          ((90, 3000), 40, 15, False), ((300, 130), 40, 45, False)])
def test_parts_shared_with_the_blocks_before_are_the_maps_they_would_have_made(
        size: tuple[int, int], block: int, margin: int, tissue: bool) -> None:
    """A block takes the parts of its region that the block to its left and the block above hold
    from their maps (``model.seams``): every block's class maps, covered mask and nuclei maps are the
    bytes it makes blending its whole region (as when a sink wants the logits, which shares nothing).
    Without tissue to skip, the parts blended are the image, once; a block row's strip wider than a
    workspace is not held, and then only the columns are shared. With tissue, a block whose own part
    has no tissue tiles blends its whole region; with a margin wider than a block, regions clipped at
    the image's edge overlap more than their neighbours' (and are blended whole)."""
    height, width = size
    image = _image(height, width, seed=11)
    if tissue:  # a white band (no tissue) between tissue: some tiles skipped, one block has only shared ones
        image[:, 160:400] = 255
    engine = Engine(loaded(TrivialNet(lambda x: x * 3 - 1)),
                    EngineOptions(tile_size=64, overlap=24, block_size=block, margin=margin, precision="fp32",
                                  device="cpu", tissue=tissue, batch_size=3))
    shared, whole = _RecordSink(logits=False), _RecordSink(logits=True)
    report = engine.run(ArrayReader(image, mpp=0.25), [shared])
    assert engine.run(ArrayReader(image, mpp=0.25), [whole]).px_shared == 0
    regions = _regions(width, height, block, margin)
    rows_held = width < 1000
    blended = width * height if rows_held else sum(r.height * width for r in regions if r.x0 == 0)
    if tissue or margin > block:
        assert 0 < report.px_shared < sum(r.area for r in regions) - blended
    else:
        assert report.px_shared == sum(r.area for r in regions) - blended
    assert shared.blocks.keys() == whole.blocks.keys()
    for index, (region, *maps) in whole.blocks.items():
        assert shared.blocks[index][0] == region
        for got, expected in zip(shared.blocks[index][1:], maps, strict=True):
            assert (got is None) == (expected is None), index
            if expected is not None:
                np.testing.assert_array_equal(got, expected, err_msg=f"block {index}")
