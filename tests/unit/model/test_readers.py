"""Readers, the analysis level and tissue detection, on real and generated slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.analysis import make_view
from model.engine import Engine, EngineOptions
from model.errors import SlideTooLargeError, UnreadableSlideError, UnsupportedSlideError
from model.readers import ArrayReader, composite_on_white, open_slide, sniff, thumbnail
from model.tiling import Box
from model.tissue import tissue_from_rgb
from tests.helpers.samples import sample
from tests.helpers.stubs import TrivialNet, loaded
from tests.helpers.synthetic import write_pyramid


def test_alpha_is_flattened_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (100, 50, 0)
    rgba[:4, :, 3] = 255  # top half opaque, bottom half transparent
    rgba[4:6, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    reader = open_slide(tmp_path / "a.png")
    px = reader.read_region(0, 0, 0, 8, 8)
    assert px.dtype == np.uint8 and px.shape == (8, 8, 3)
    assert tuple(px[0, 0]) == (100, 50, 0) and tuple(px[7, 7]) == (255, 255, 255)
    assert tuple(px[4, 0]) == tuple(composite_on_white(rgba[4:5, :1])[0, 0]) == (177, 152, 127)  # (c*128+255*127)/255



def test_compositing_is_the_same_for_contiguous_and_strided_pixels() -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)
    rgba[:32, :, 3] = 255
    strided = np.zeros((64, 96, 4), np.uint8)[:, ::2]
    strided[...] = rgba
    out = composite_on_white(rgba)
    assert out.flags.c_contiguous and out.shape == (64, 48, 3)
    np.testing.assert_array_equal(out, composite_on_white(strided))
    np.testing.assert_array_equal(out[:32], rgba[:32, :, :3])
    a = rgba[32:, :, 3:].astype(np.int64)
    np.testing.assert_array_equal(out[32:], (rgba[32:, :, :3] * a + 255 * (255 - a) + 127) // 255)
    assert composite_on_white(rgba[:0]).shape == (0, 48, 3)

def test_reads_past_the_edge_are_white() -> None:
    reader = ArrayReader(np.zeros((10, 10, 3), np.uint8))
    px = reader.read_region(0, -2, 5, 6, 8)
    assert (px[:5, 2:] == 0).all() and (px[:, :2] == 255).all() and (px[5:] == 255).all()
    slide = open_slide(sample("cmu_small_region.svs"))
    w, h = slide.level_dimensions[0]
    edge = slide.read_region(0, w - 4, h - 4, 8, 8)
    assert (edge[4:, :] == 255).all() and (edge[:, 4:] == 255).all()


def test_pixel_cap_refuses_decompression_bombs(tmp_path: Path) -> None:
    Image.new("RGB", (300, 300), "white").save(tmp_path / "big.png")
    with pytest.raises(SlideTooLargeError, match="big.png"):
        open_slide(tmp_path / "big.png", max_image_pixels=10_000)
    with pytest.raises(SlideTooLargeError, match="cmu_small_region.svs"):
        open_slide(sample("cmu_small_region.svs"), max_slide_pixels=1_000_000)


def test_sniff_ignores_extensions(tmp_path: Path) -> None:
    png = tmp_path / "really_a_png.svs"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    assert sniff(png) == "pillow:png"
    assert sniff(sample("cmu_small_region.svs")) == "openslide:aperio"
    junk = tmp_path / "x.tiff"
    junk.write_bytes(b"GIF89a not supported")
    with pytest.raises(UnsupportedSlideError, match="x.tiff"):
        sniff(junk)
    with pytest.raises(UnreadableSlideError, match="empty"):
        sniff(_touch(tmp_path / "empty.png"))


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def test_real_multilevel_tiff_and_thumbnail() -> None:
    reader = open_slide(sample("boxes.tiff"))
    assert reader.format == "generic-tiff" and len(reader.level_dimensions) == 4
    thumb, ds = thumbnail(reader, 64)
    assert max(thumb.shape[:2]) <= 64 and ds == pytest.approx(reader.level_dimensions[0][0] / thumb.shape[1])


@pytest.mark.parametrize(("slide_mpp", "level", "scale"), [(0.125, 1, 1.0), (0.25, 0, 1.0), (0.2, 0, 1.25),
                                                          (0.0625, 2, 1.0), (0.5, 0, 0.5), (0.26, 0, 1.0)])
def test_view_picks_the_finest_enough_level(tmp_path: Path, slide_mpp: float, level: int, scale: float) -> None:
    slide = write_pyramid(tmp_path / "p.tiff", 2048, 1024, mpp=slide_mpp, levels=3)
    reader = open_slide(slide)
    assert reader.mpp == pytest.approx(slide_mpp, rel=1e-6)
    view = make_view(reader, 0.25)
    assert view.level == level and view.scale == pytest.approx(scale)
    w0 = reader.level_dimensions[0][0]
    assert abs(view.width - w0 * slide_mpp / view.mpp) <= 1
    assert view.read(Box(10, 10, 74, 42)).shape == (32, 64, 3)


def test_missing_mpp_assumes_model_mpp_and_warns() -> None:
    view = make_view(ArrayReader(np.full((64, 64, 3), 200, np.uint8), name="nompp.png"), 0.25)
    assert view.mpp == 0.25 and view.scale == 1.0
    assert any("nompp.png" in w and "no resolution" in w for w in view.warnings)
    override = make_view(ArrayReader(np.full((64, 64, 3), 200, np.uint8)), 0.25, mpp_override=0.5)
    assert override.width == 128


def test_tissue_mask_on_synthetic_rgb() -> None:
    rgb = np.full((100, 100, 3), 245, np.uint8)
    rgb[20:60, 30:80] = (200, 120, 180)
    mask = tissue_from_rgb(rgb)
    assert mask[40, 50] and not mask[90, 10]
    assert abs(int(mask.sum()) - 40 * 50) < 200


def test_tissue_detection_defaults_and_switch(tmp_path: Path) -> None:
    slide = write_pyramid(tmp_path / "glass.tiff", 4096, 4096, tissue_fraction=0.0, cell=1024)
    net = loaded(TrivialNet(lambda x: x))
    on = Engine(net, EngineOptions(device="cpu", precision="fp32", tile_size=256, overlap=0)).run(open_slide(slide))
    assert on.tissue_detection and on.tiles_skipped > 0 and on.tiles_run < on.grid_tiles
    assert on.tiles_run >= 16  # the 1024 px tissue cell holds 16 tiles of 256
    off = Engine(net, EngineOptions(device="cpu", precision="fp32", tile_size=256, overlap=0, tissue=False))
    report = off.run(open_slide(slide))
    assert not report.tissue_detection and report.tiles_skipped == 0 and report.tiles_run == report.grid_tiles
