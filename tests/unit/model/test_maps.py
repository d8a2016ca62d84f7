"""Mask and overlay files (written on threads while blocks arrive) hold exactly the argmax of the blended logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from isal import isal_zlib
from PIL import Image

from model.engine import BlockResult, CollectSink, Engine, EngineOptions, RunContext
from model.maps import ClassMapSink, class_counts
from model.readers import ArrayReader
from model.writers import MASK_DEFLATE_LEVEL, ClassMapStore, PngWriter, overlay, write_tiff_from_store
from tests.helpers.stubs import TrivialNet, loaded


def _wavy(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[:, :1], x[:, 1:2] * 0.9 + 0.05, x[:, 2:] * 1.1 - 0.05), dim=1)


def _engine(block: int) -> Engine:
    return Engine(loaded(TrivialNet(_wavy)), EngineOptions(tile_size=64, overlap=16, block_size=block, batch_size=16,
                                                          precision="fp32", device="cpu", tissue=False))


class _Fails:
    """A sink that raises on its ``n``-th block."""

    needs_logits = False
    needs_probs = False

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def start(self, ctx: RunContext) -> None: ...

    def add(self, block: BlockResult) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise RuntimeError("sink failed")

    def finish(self) -> dict[str, Any]:
        return {}

    def abort(self) -> None: ...


@pytest.mark.parametrize("block", [150, 4096])
def test_mask_files_equal_the_argmax(tmp_path: Path, block: int) -> None:
    image = np.random.default_rng(2).integers(0, 256, (1100, 700, 3), dtype=np.uint8)
    collect = CollectSink()
    _engine(block).run(ArrayReader(image, mpp=0.25), [ClassMapSink(tmp_path, overlays=False), collect])
    assert collect.logits is not None
    expected = {"semantic": collect.logits[:5].argmax(0), "ternary": collect.logits[5:].argmax(0)}
    for name, classes in expected.items():
        with Image.open(tmp_path / f"{name}.png") as png:
            assert png.mode == "P"
            np.testing.assert_array_equal(np.asarray(png), classes)
        with tifffile.TiffFile(tmp_path / f"{name}.tiff") as tif:
            np.testing.assert_array_equal(tif.pages[0].asarray(), classes)
            np.testing.assert_array_equal(tif.pages[1].asarray(), classes[1::2, 1::2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["semantic.png", "semantic.tiff", "ternary.png",
                                                           "ternary.tiff"]


@pytest.mark.parametrize("overlays", [False, True])
def test_a_failed_run_leaves_no_mask_files(tmp_path: Path, overlays: bool) -> None:
    image = np.random.default_rng(3).integers(0, 256, (700, 500, 3), dtype=np.uint8)
    sink = ClassMapSink(tmp_path, overlays=overlays, overlay_max_side=200)
    with pytest.raises(RuntimeError, match="sink failed"):
        _engine(150).run(ArrayReader(image, mpp=0.25), [sink, _Fails(5)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("max_side", "block"), [(97, 64), (4096, 64), (12, 8)])
def test_overlays_written_as_rows_arrive_blend_the_thumbnail_with_the_sampled_classes(tmp_path: Path,
                                                                                      max_side: int,
                                                                                      block: int) -> None:
    """Overlay pixel (u, v) shows analysis pixel (floor((u + 0.5) k), floor((v + 0.5) k)); its rows are
    streamed block row by block row (many block rows, most overlay bands cut by one; with k = 25.8
    the first block row holds no sampled row at all)."""
    image = np.random.default_rng(4).integers(0, 256, (310, 250, 3), dtype=np.uint8)
    collect = CollectSink(logits=False)
    engine = _engine(block)
    engine.run(ArrayReader(image, mpp=0.25), [ClassMapSink(tmp_path, masks=False, overlay_max_side=max_side),
                                              collect])
    assert collect.classes is not None
    with Image.open(tmp_path / "thumbnail.png") as png:
        thumb = np.asarray(png.convert("RGB"))
    k = max(1.0, 310 / max_side)
    assert thumb.shape == (round(310 / k), round(250 / k), 3)
    if k == 1.0:
        np.testing.assert_array_equal(thumb, image)
    rows = np.floor((np.arange(thumb.shape[0]) + 0.5) * k).astype(int)
    cols = np.floor((np.arange(thumb.shape[1]) + 0.5) * k).astype(int)
    heads = {"semantic": engine.card.semantic_colours, "ternary": engine.card.ternary_colours}
    for i, (name, colours) in enumerate(heads.items()):
        small = collect.classes[i][np.ix_(rows, cols)]
        with Image.open(tmp_path / f"overlay_{name}.png") as png:
            assert png.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(png), overlay(thumb, small, colours))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay_semantic.png", "overlay_ternary.png",
                                                           "thumbnail.png"]


@pytest.mark.parametrize("palette", [None, [(0, 0, 0), (255, 0, 0), (0, 255, 0)]])
def test_png_rows_written_in_bands_decode_to_the_image(tmp_path: Path, palette: list | None) -> None:
    """RGB rows are filtered against the row above, across band boundaries too."""
    rng = np.random.default_rng(5)
    shape = (41, 37) if palette else (41, 37, 3)
    image = rng.integers(0, len(palette) if palette else 256, shape, dtype=np.uint8)
    image[10:20] = image[9]  # runs of equal rows: what the "Up" filter turns into zeros
    with PngWriter(tmp_path / "x.png", 37, 41, palette) as png:
        for y0, y1 in ((0, 1), (1, 8), (8, 8), (8, 40), (40, 41)):
            png.write_rows(image[y0:y1])
    with Image.open(tmp_path / "x.png") as decoded:
        assert decoded.mode == ("P" if palette else "RGB")
        np.testing.assert_array_equal(np.asarray(decoded), image)


def test_reduced_pages_encoded_while_rows_arrive_equal_those_written_at_the_end(tmp_path: Path) -> None:
    """The store is filled only as far as the writer has waited for: a reduced tile encoded before
    its rows were final would hold zeros there."""
    rng = np.random.default_rng(0)
    height, width = 3000, 2100
    img = (rng.random((height // 7 + 1, width // 7 + 1)) * 5).astype(np.uint8).repeat(7, 0).repeat(7, 1)
    img = np.ascontiguousarray(img[:height, :width])
    palette = [(i * 40, i * 20, i) for i in range(5)]
    whole = ClassMapStore(tmp_path / "whole.raw", width, height)
    whole.write_block(0, 0, img)
    write_tiff_from_store(whole, tmp_path / "end.tiff", palette, tile=256)
    growing = ClassMapStore(tmp_path / "growing.raw", width, height)
    filled = [0]

    def arrive(y: int) -> None:  # rows [0, y) become final only now
        growing.write_block(0, filled[0], img[filled[0] : y])
        filled[0] = max(filled[0], y)

    write_tiff_from_store(growing, tmp_path / "run.tiff", palette, tile=256, wait_rows=arrive)
    with tifffile.TiffFile(tmp_path / "end.tiff") as end, tifffile.TiffFile(tmp_path / "run.tiff") as run:
        assert len(end.pages) == len(run.pages) == 5
        for a, b in zip(end.pages, run.pages, strict=True):
            np.testing.assert_array_equal(a.asarray(), b.asarray())
    # every tile is the mask deflate's stream of its pixels, whichever encoder tifffile would have
    # picked (with imagecodecs installed it deflates with other bytes)
    assert (tmp_path / "end.tiff").read_bytes() == (tmp_path / "run.tiff").read_bytes()
    with tifffile.TiffFile(tmp_path / "run.tiff") as run, open(tmp_path / "run.tiff", "rb") as raw:
        page = run.pages[0]
        for index, (offset, size) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
            raw.seek(offset)
            ty, tx = divmod(index, -(-width // 256))
            tile = np.zeros((256, 256), np.uint8)
            part = img[ty * 256 : (ty + 1) * 256, tx * 256 : (tx + 1) * 256]
            tile[: part.shape[0], : part.shape[1]] = part
            assert raw.read(size) == isal_zlib.compress(tile.tobytes(), MASK_DEFLATE_LEVEL)


def test_overlay_blends_each_class_colour_over_the_image() -> None:
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, (130, 70, 3), dtype=np.uint8)
    classes = rng.integers(0, 5, (130, 70), dtype=np.uint8)
    colours = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (12, 34, 250), (255, 255, 0)]
    alpha = np.float32(0.45)
    mixed = base.astype(np.float32) * (np.float32(1) - alpha) + np.asarray(colours, np.float32)[classes] * alpha
    expected = np.where(classes[..., None] > 0, np.clip(mixed + np.float32(0.5), 0, 255).astype(np.uint8), base)
    np.testing.assert_array_equal(overlay(base, classes, colours), expected)


def test_class_counts_equal_bincount_on_strided_maps() -> None:
    classes = np.random.default_rng(6).integers(0, 7, (2, 300, 200), dtype=np.uint8)
    inner = classes[1, 10:290, 5:195]  # a block's inner part: not contiguous
    np.testing.assert_array_equal(class_counts(inner, 5), np.bincount(inner.ravel(), minlength=5)[:5])
