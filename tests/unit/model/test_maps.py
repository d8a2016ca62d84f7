"""Mask files (written on a thread while blocks arrive) hold exactly the argmax of the blended logits."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from model.engine import BlockResult, CollectSink, Engine, EngineOptions, RunContext
from model.maps import ClassMapSink
from model.readers import ArrayReader
from model.writers import MASK_ZLIB_LEVEL, ClassMapStore, write_tiff_from_store
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


def test_a_failed_run_leaves_no_mask_files(tmp_path: Path) -> None:
    image = np.random.default_rng(3).integers(0, 256, (700, 500, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="sink failed"):
        _engine(150).run(ArrayReader(image, mpp=0.25), [ClassMapSink(tmp_path, overlays=False), _Fails(5)])
    assert list(tmp_path.iterdir()) == []


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
    # every tile is Python's zlib stream of its pixels, whichever encoder tifffile would have picked
    # (with imagecodecs installed it deflates with other bytes), so the same map makes the same file
    # on any machine
    assert (tmp_path / "end.tiff").read_bytes() == (tmp_path / "run.tiff").read_bytes()
    with tifffile.TiffFile(tmp_path / "run.tiff") as run, open(tmp_path / "run.tiff", "rb") as raw:
        page = run.pages[0]
        for index, (offset, size) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
            raw.seek(offset)
            ty, tx = divmod(index, -(-width // 256))
            tile = np.zeros((256, 256), np.uint8)
            part = img[ty * 256 : (ty + 1) * 256, tx * 256 : (tx + 1) * 256]
            tile[: part.shape[0], : part.shape[1]] = part
            assert raw.read(size) == zlib.compress(tile.tobytes(), MASK_ZLIB_LEVEL)
