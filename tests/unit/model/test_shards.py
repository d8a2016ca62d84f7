"""A slide run as shards and merged gives the files of a single run, with the shipped model.

The slide is a real H&E region (the CMU sample at 0.25 µm/px) with a patch of glass, written as a
small pyramidal TIFF, so tissue detection runs and skips blocks; small tiles and blocks keep it fast.
The glass lies above the rows where the shards meet, so nuclei cross those seams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from model.analysis import make_view
from model.checkpoint import LoadedModel, load_model
from model.device import TileRunner
from model.engine import CollectSink, Engine
from model.errors import CancelledError, OptionsError, ShardError
from model.options import OUTPUT_GROUPS, EngineOptions, Stats, result_files
from model.pipeline import predict_reader
from model.readers import ArrayReader, SlideReader, open_slide
from model.shards import CLASSES, MARKER, NUCLEI, merge_shards, run_shard, shard_plan
from model.tiling import Box
from tests.helpers.samples import sample
from tests.helpers.stubs import TrivialNet, loaded

ROOT = Path(__file__).resolve().parents[3]
WEIGHTS = ROOT / "model" / "weights" / "nucseg-default.safetensors"
OPTIONS = EngineOptions(tile_size=128, overlap=32, block_size=128, batch_size=2, precision="fp32", device="cpu",
                        workers=0)
OUTPUTS = frozenset(OUTPUT_GROUPS)
WIDTH, HEIGHT = 512, 640  # 4 x 5 blocks
SHARD_BLOCKS = {1: 20, 2: 12, 3: 8}  # shards -> shard_blocks giving that many


def _write_slide(path: Path) -> Path:
    reader = open_slide(sample("cmu_small_region.svs"))
    try:
        image = make_view(reader, 0.25).read(Box(1600, 1800, 1600 + WIDTH, 1800 + HEIGHT)).copy()
    finally:
        reader.close()
    image[:320, 160:] = 242  # glass: a block without tissue (top right), tissue across the seams below
    res = 1e4 / 0.25  # pixels per cm
    with tifffile.TiffWriter(path) as tif:
        for level in range(3):
            scale = 2**level
            level_image = np.asarray(Image.fromarray(image).resize((WIDTH // scale, HEIGHT // scale)))
            tif.write(level_image, tile=(256, 256), photometric="rgb", compression="zlib",
                      resolution=(res / scale, res / scale), resolutionunit="CENTIMETER",
                      subfiletype=0 if level == 0 else 1)
    return path


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(WEIGHTS)


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlideReader]:
    slide = open_slide(_write_slide(tmp_path_factory.mktemp("slide") / "he.tiff"))
    yield slide
    slide.close()


@pytest.fixture(scope="module")
def single(reader: SlideReader, model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Stats]:
    out = tmp_path_factory.mktemp("single")
    return out, predict_reader(reader, out, model, OPTIONS, outputs=OUTPUTS)


@pytest.fixture(scope="module")
def parts(reader: SlideReader, model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[Path]]:
    """Part folders per shard count, run once for the module."""
    made: dict[int, list[Path]] = {}
    for k, shard_blocks in SHARD_BLOCKS.items():
        plan = shard_plan(reader, model, OPTIONS, outputs=OUTPUTS, shard_blocks=shard_blocks)
        assert len(plan.shards) == k
        base = tmp_path_factory.mktemp(f"parts{k}")
        made[k] = [base / f"part{i}" for i in range(k)]
        for part_dir, blocks in zip(made[k], plan.shards, strict=True):
            seen: list[tuple[int, int]] = []
            run_shard(reader, part_dir, model, OPTIONS, outputs=OUTPUTS, blocks=blocks,
                      on_progress=lambda done, total, into=seen: into.append((done, total)))
            assert seen[-1] == (len(blocks), len(blocks))
            assert sorted(p.name for p in part_dir.iterdir()) == sorted([CLASSES, NUCLEI, MARKER])
    return made


def _pixels(path: Path) -> list[np.ndarray]:
    if path.suffix == ".tiff":
        with tifffile.TiffFile(path) as tif:
            return [page.asarray() for page in tif.pages]
    with Image.open(path) as img:
        return [np.asarray(img)]


def _features(path: Path) -> list[dict[str, Any]]:
    features = json.loads(path.read_text())["features"]
    return [{k: v for k, v in f.items() if k != "id"} for f in features]  # ids are random per file


def _spans(feature: dict[str, Any], y: int) -> bool:
    """Whether a nucleus's outline reaches both sides of row ``y``."""
    ys = [point[1] for point in feature["geometry"]["coordinates"][0]]
    return min(ys) < y < max(ys)


def _comparable(stats: Stats) -> dict[str, Any]:
    """The stats without what differs between any two runs (timings, start) or by design (tile counts)."""
    drop = ("tiles", "timings_s", "started_at", "shards")
    kept = {k: v for k, v in stats.items() if k not in drop}
    kept["nuclei"] = {k: v for k, v in stats["nuclei"].items() if k != "timings"}
    return kept


@pytest.mark.parametrize("k", sorted(SHARD_BLOCKS))
def test_merged_shards_equal_the_single_run(k: int, reader: SlideReader, model: LoadedModel,
                                            single: tuple[Path, Stats], parts: dict[int, list[Path]],
                                            tmp_path: Path) -> None:
    single_dir, single_stats = single
    stats = merge_shards(reader, parts[k], tmp_path, model, OPTIONS, outputs=OUTPUTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(result_files(OUTPUTS))
    for name in result_files(OUTPUTS):
        if name.endswith((".png", ".tiff")):
            for ours, theirs in zip(_pixels(tmp_path / name), _pixels(single_dir / name), strict=True):
                np.testing.assert_array_equal(ours, theirs, err_msg=name)
    features = _features(tmp_path / "nuclei.geojson")
    assert features == _features(single_dir / "nuclei.geojson") and len(features) >= 20  # not a vacuous match
    plan = shard_plan(reader, model, OPTIONS, outputs=OUTPUTS, shard_blocks=SHARD_BLOCKS[k])
    seams = [r.start // plan.blocks_per_row * OPTIONS.block_size for r in plan.shards[1:]]
    assert k == 1 or any(_spans(f, y) for f in features for y in seams)  # a nucleus two shards share
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert _comparable(stats) == _comparable(single_stats)
    assert stats["blocks"]["skipped"] > 0  # the glass
    tiles, recomputed = stats["tiles"], stats["shards"]["tiles_recomputed"]
    assert stats["shards"]["count"] == k and (recomputed > 0) == (k > 1)
    assert tiles["run"] == single_stats["tiles"]["run"] + recomputed
    added, single_added = (t["run"] + t["reused"] for t in (tiles, single_stats["tiles"]))
    assert added >= single_added and (k > 1 or added == single_added)  # a shard's first block row blends the
    # rows it shares with the row above itself (``model.seams``), so it adds their tiles too
    assert (tiles["skipped"], tiles["grid"]) == (single_stats["tiles"]["skipped"], single_stats["tiles"]["grid"])


@pytest.mark.parametrize("shard_blocks", [1, 4, 5, 7, 12, 100])
def test_plan_covers_every_block_once_in_whole_rows(shard_blocks: int, reader: SlideReader,
                                                    model: LoadedModel) -> None:
    plan = shard_plan(reader, model, OPTIONS, outputs=OUTPUTS, shard_blocks=shard_blocks)
    assert plan.blocks_total == 20 and plan.blocks_per_row == 4
    assert [i for r in plan.shards for i in r] == list(range(20))
    assert all(r.start % 4 == 0 and r.stop % 4 == 0 and len(r) >= 4 for r in plan.shards)
    with pytest.raises(ShardError, match="shard_blocks"):
        shard_plan(reader, model, OPTIONS, outputs=OUTPUTS, shard_blocks=0)


def test_cancelled_shard_leaves_nothing_a_merge_accepts(reader: SlideReader, model: LoadedModel,
                                                        parts: dict[int, list[Path]], tmp_path: Path) -> None:
    part = tmp_path / "part1"
    blocks = shard_plan(reader, model, OPTIONS, outputs=OUTPUTS, shard_blocks=SHARD_BLOCKS[3]).shards[1]
    with pytest.raises(CancelledError):
        run_shard(reader, part, model, OPTIONS, outputs=OUTPUTS, blocks=blocks, should_cancel=lambda: True)
    assert list(part.iterdir()) == []
    with pytest.raises(ShardError, match="incomplete"):
        merge_shards(reader, [parts[3][0], part, parts[3][2]], tmp_path / "out", model, OPTIONS, outputs=OUTPUTS)


def test_merge_refuses_missing_misordered_foreign_or_damaged_parts(
        reader: SlideReader, model: LoadedModel, parts: dict[int, list[Path]], tmp_path: Path) -> None:
    p0, p1, p2 = parts[3]
    cases = {
        "start at block 8": [p0, p2],
        "start at block 0": [p1, p0, p2],
        "cover blocks 0..15 of 20": [p0, p1],
        "no shard parts": [],
    }
    for message, dirs in cases.items():
        with pytest.raises(ShardError, match=message):
            merge_shards(reader, dirs, tmp_path / "out", model, OPTIONS, outputs=OUTPUTS)
    with pytest.raises(ShardError, match="options"):
        merge_shards(reader, parts[3], tmp_path / "out", model, replace(OPTIONS, overlap=64), outputs=OUTPUTS)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in p1.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    data = (damaged / CLASSES).read_bytes()
    for changed in (data[: len(data) // 2], data[:-1] + bytes([data[-1] ^ 1])):
        (damaged / CLASSES).write_bytes(changed)
        with pytest.raises(ShardError, match="not the file the shard wrote"):
            merge_shards(reader, [p0, damaged, p2], tmp_path / "out", model, OPTIONS, outputs=OUTPUTS)
    (damaged / CLASSES).write_bytes(data)
    (damaged / NUCLEI).unlink()
    with pytest.raises(ShardError, match="nuclei.rec is missing"):
        merge_shards(reader, [p0, damaged, p2], tmp_path / "out", model, OPTIONS, outputs=OUTPUTS)
    assert not (tmp_path / "out" / "stats.json").exists()


def test_pool_postprocessing_records_the_same_nuclei(reader: SlideReader, model: LoadedModel,
                                                     single: tuple[Path, Stats], parts: dict[int, list[Path]],
                                                     tmp_path: Path) -> None:
    """A shard whose nuclei are post-processed by a worker process records what an in-process one does."""
    blocks = shard_plan(reader, model, OPTIONS, outputs=OUTPUTS, shard_blocks=SHARD_BLOCKS[3]).shards[1]
    pooled = tmp_path / "part1"
    run_shard(reader, pooled, model, replace(OPTIONS, workers=1), outputs=OUTPUTS, blocks=blocks)
    p0, _, p2 = parts[3]
    merge_shards(reader, [p0, pooled, p2], tmp_path / "out", model, OPTIONS, outputs=OUTPUTS)
    assert _features(tmp_path / "out" / "nuclei.geojson") == _features(single[0] / "nuclei.geojson")


def test_engine_over_block_ranges_equals_the_whole_run() -> None:
    """``Engine.run(blocks=...)``: the ranges' blocks together are the whole run's, progress counts the range."""
    image = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    engine = Engine(loaded(TrivialNet(lambda x: x * 2.0)), EngineOptions(
        tile_size=64, overlap=16, block_size=40, batch_size=3, precision="fp32", device="cpu", tissue=False))
    whole = CollectSink()
    report = engine.run(ArrayReader(image, mpp=0.25), [whole])
    assert whole.logits is not None and report.blocks == 20 and report.tiles_shared == 0
    for ranges in ([range(0, 10), range(10, 20)], [range(0, 5), range(5, 15), range(15, 20)]):
        merged = np.zeros_like(whole.logits)
        shared = 0
        for blocks in ranges:
            part, seen = CollectSink(), []
            part_report = engine.run(ArrayReader(image, mpp=0.25), [part], blocks=blocks,
                                     on_progress=lambda done, total, into=seen: into.append((done, total)))
            assert part.logits is not None and seen[-1] == (len(blocks), len(blocks))
            rows = slice(blocks.start // 5 * 40, blocks.stop // 5 * 40)
            merged[:, rows] = part.logits[:, rows]
            shared += part_report.tiles_shared
            assert part_report.blocks == 20
        np.testing.assert_array_equal(merged, whole.logits)
        assert shared > 0
    with pytest.raises(OptionsError, match="blocks"):
        engine.run(ArrayReader(image, mpp=0.25), [], blocks=range(15, 25))


def test_a_tiles_logits_do_not_depend_on_its_batch(reader: SlideReader, model: LoadedModel) -> None:
    """Every forward pass has ``batch`` tiles, so a tile alone, in a pair or in a full batch gives the same bits
    (unpadded, fp32 on a CPU gave a tile alone other logits here)."""
    view = make_view(reader, model.card.mpp)
    image = view.read(Box(0, 0, 4 * 128, 128))
    tiles = np.stack([image[:, x : x + 128] for x in range(0, 4 * 128, 128)])
    runner = TileRunner(model.network, model.card, torch.device("cpu"), "fp32", batch=4)
    full = runner(tiles).numpy()
    for i in range(4):
        np.testing.assert_array_equal(runner(tiles[i : i + 1]).numpy()[0], full[i])
    np.testing.assert_array_equal(runner(tiles[2:0:-1]).numpy(), full[2:0:-1])
