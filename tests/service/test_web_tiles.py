"""Deep Zoom tiles: the pyramidal mask TIFF, the slide and overlay DZIs, alignment, colours, ETag, 404s."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from api.deepzoom import MASK_TILE, SLIDE_OVERLAP, SLIDE_TILE, MaskPyramid, dz_level_size, dz_levels
from core.storage import LocalStorage
from model.writers import ClassMapStore, mask_pyramid_sizes, write_tiff_from_store
from tests.helpers.service_stack import Stack, tissue_image

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 200, 0)]
NS = "{http://schemas.microsoft.com/deepzoom/2008}"
# 600 x 400 px image stated at 0.5 µm/px: the model (0.25 µm/px) sees it at 1200 x 800
WIDE = {"tile_size": 64, "overlap": 0, "block_size": 256, "batch_size": 16, "mpp": 0.5, "outputs": ["masks"]}


# ---------------------------------------------------------------- the TIFF writer and reader


@pytest.mark.parametrize(("width", "height", "tile"), [(1500, 1100, 512), (300, 700, 256), (16, 16, 256)])
def test_mask_tiff_is_a_tiled_pyramid_read_tile_by_tile(tmp_path: Path, width: int, height: int, tile: int) -> None:
    rng = np.random.default_rng(width)
    full = rng.integers(0, len(PALETTE), (height, width)).astype(np.uint8)
    store = ClassMapStore(tmp_path / "m.raw", width, height)
    store.write_block(0, 0, full)
    write_tiff_from_store(store, tmp_path / "m.tiff", PALETTE, tile=tile)
    store.close()
    sizes = mask_pyramid_sizes(width, height, tile)
    with tifffile.TiffFile(tmp_path / "m.tiff") as tif:
        assert len(tif.pages) == len(sizes)
        for page, (scale, w, h) in zip(tif.pages, sizes, strict=True):
            assert page.shape == (h, w) and page.is_tiled and page.tilewidth == tile
            centre = full[scale // 2 :: scale, scale // 2 :: scale]
            expected = np.pad(centre, ((0, h - centre.shape[0]), (0, w - centre.shape[1])), mode="edge")
            np.testing.assert_array_equal(page.asarray(), expected)
    mask = MaskPyramid(LocalStorage(tmp_path), "m.tiff")
    top = dz_levels(width, height) - 1
    cols, rows = -(-width // MASK_TILE), -(-height // MASK_TILE)
    for col, row in [(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)]:
        got = mask.tile(top, col, row)
        np.testing.assert_array_equal(got, full[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256])
    assert mask.tile(top - 1, 0, 0).shape == tuple(min(256, s) for s in dz_level_size(width, height, top - 1)[::-1])
    assert mask.tile(0, 0, 0).shape == (1, 1)
    assert not mask.valid(top + 1, 0, 0) and not mask.valid(top, cols, 0) and not mask.valid(top, 0, rows)


# ---------------------------------------------------------------- the live API


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tissue_image(width, height, seed=7)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def wide_job(stack: Stack) -> dict[str, Any]:
    resp = stack.submit_upload(_png(600, 400), filename="wide.png", options=WIDE)
    assert resp.status_code == 202, resp.text
    job = stack.wait(resp.json()["id"], timeout_s=180)
    assert job["status"] == "succeeded", job
    return job


def _dzi(stack: Stack, url: str) -> tuple[int, int, int, int, str]:
    resp = stack.client.get(url)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(resp.text)
    size = root.find(f"{NS}Size")
    assert root.tag == f"{NS}Image" and size is not None
    return (int(size.attrib["Width"]), int(size.attrib["Height"]), int(root.attrib["TileSize"]),
            int(root.attrib["Overlap"]), root.attrib["Format"])


@pytest.mark.service
def test_dzi_descriptors_and_viewer_info(stack: Stack, wide_job: dict[str, Any]) -> None:
    base = f"/v1/jobs/{wide_job['id']}/dzi"
    assert _dzi(stack, f"{base}/slide.dzi") == (600, 400, SLIDE_TILE, SLIDE_OVERLAP, "jpeg")
    for name in ("semantic", "ternary"):
        assert _dzi(stack, f"{base}/{name}.dzi") == (1200, 800, MASK_TILE, 0, "png")
    info = stack.client.get(base).json()
    assert info["slide"] == {"dzi": f"{base}/slide.dzi", "width": 600, "height": 400}
    assert [o["name"] for o in info["overlays"]] == ["semantic", "ternary"]
    semantic = info["overlays"][0]
    # analysis px x level-0 px per analysis px (0.25 / 0.5) = the slide's width: viewport width 1
    assert semantic["viewport_width"] == pytest.approx(1.0)
    assert semantic["classes"][0]["name"] == "background" and semantic["classes"][1]["colour"].startswith("#")
    names = {r["name"]: r for r in wide_job["results"]}
    assert names["semantic.tiff"]["content_type"] == "image/tiff"


def _error(tile: np.ndarray, source: np.ndarray, x0: int, y0: int) -> float:
    """Mean absolute difference of ``tile`` and ``source`` at ``(x0, y0)`` over their common part."""
    part = source[y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]]
    return float(np.abs(tile[: part.shape[0], : part.shape[1]] - part).mean())


@pytest.mark.service
def test_slide_tiles_have_deep_zoom_sizes_and_positions(stack: Stack, wide_job: dict[str, Any]) -> None:
    base = f"/v1/jobs/{wide_job['id']}/dzi/slide_files"
    source = tissue_image(600, 400, seed=7).astype(np.int16)
    top = dz_levels(600, 400) - 1
    for col, row in [(0, 0), (1, 1), (2, 1)]:
        resp = stack.client.get(f"{base}/{top}/{col}_{row}.jpeg")
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
        tile = np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB")).astype(np.int16)
        x0, y0 = max(0, col * SLIDE_TILE - SLIDE_OVERLAP), max(0, row * SLIDE_TILE - SLIDE_OVERLAP)
        x1 = min(600, (col + 1) * SLIDE_TILE + SLIDE_OVERLAP)
        y1 = min(400, (row + 1) * SLIDE_TILE + SLIDE_OVERLAP)
        assert tile.shape == (y1 - y0, x1 - x0, 3)
        here = _error(tile, source, x0, y0)
        assert here < 8 and all(here < 0.8 * _error(tile, source, x0 + dx, y0 + dy)  # JPEG, but this place
                                for dx, dy in ((3, 0), (0, 3), (-3, 0), (0, -3)) if x0 + dx >= 0 and y0 + dy >= 0)
    small = Image.open(io.BytesIO(stack.client.get(f"{base}/0/0_0.jpeg").content))
    assert small.size == (1, 1)


@pytest.mark.service
def test_overlay_tiles_align_with_the_mask_and_use_its_colours(stack: Stack, wide_job: dict[str, Any]) -> None:
    job_id = wide_job["id"]
    stats = json.loads(stack.client.get(f"/v1/jobs/{job_id}/results/stats.json").content)
    top = dz_levels(1200, 800) - 1
    for name in ("semantic", "ternary"):
        classes = np.asarray(Image.open(io.BytesIO(stack.client.get(f"/v1/jobs/{job_id}/results/{name}.png").content)))
        colours = np.asarray(stats[name]["colours"], np.uint8)
        for col, row in [(0, 0), (3, 2), (4, 3)]:
            resp = stack.client.get(f"/v1/jobs/{job_id}/dzi/{name}_files/{top}/{col}_{row}.png")
            assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
            rgba = np.asarray(Image.open(io.BytesIO(resp.content)))
            want = classes[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256]
            assert rgba.shape == (*want.shape, 4)
            np.testing.assert_array_equal(rgba[..., 3], np.where(want > 0, 255, 0))
            np.testing.assert_array_equal(rgba[..., :3][want > 0], colours[want[want > 0]])
        half = np.asarray(Image.open(io.BytesIO(
            stack.client.get(f"/v1/jobs/{job_id}/dzi/{name}_files/{top - 1}/0_0.png").content)))
        assert half.shape == (256, 256, 4)
        np.testing.assert_array_equal(half[..., 3], np.where(classes[1:512:2, 1:512:2] > 0, 255, 0))


@pytest.mark.service
def test_tiles_carry_an_etag_and_answer_304(stack: Stack, wide_job: dict[str, Any]) -> None:
    for url in (f"/v1/jobs/{wide_job['id']}/dzi/slide_files/9/1_0.jpeg",
                f"/v1/jobs/{wide_job['id']}/dzi/semantic_files/10/2_1.png"):
        first = stack.client.get(url)
        etag = first.headers["etag"]
        assert first.status_code == 200 and "max-age" in first.headers["cache-control"]
        again = stack.client.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert stack.client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


@pytest.mark.service
@pytest.mark.parametrize("path", ["slide_files/99/0_0.jpeg", "slide_files/9/7_0.jpeg", "slide_files/9/0_7.jpeg",
                                  "slide_files/x/0_0.jpeg", "slide_files/9/0_0.png", "slide_files/9/a_b.jpeg",
                                  "semantic_files/12/0_0.png", "semantic_files/10/5_0.png",
                                  "semantic_files/10/0_0.jpeg", "nuclei_files/1/0_0.png", "nuclei.dzi"])
def test_bad_tiles_are_404_json(stack: Stack, wide_job: dict[str, Any], path: str) -> None:
    resp = stack.client.get(f"/v1/jobs/{wide_job['id']}/dzi/{path}")
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["code"] in ("tile_not_found", "image_not_found") and error["message"]


@pytest.mark.service
def test_tiles_of_an_unknown_job_are_404(stack: Stack) -> None:
    unknown = "0" * 32
    for path in ("", "/slide.dzi", "/slide_files/0/0_0.jpeg", "/semantic_files/0/0_0.png"):
        resp = stack.client.get(f"/v1/jobs/{unknown}/dzi{path}")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "job_not_found", resp.text
