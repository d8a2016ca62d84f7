"""NucleusSink in the real engine: block-edge consistency, exact counts/classes/areas, level-0 coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from model.blending import nucleus_inputs
from model.engine import Engine, EngineOptions
from model.errors import OptionsError
from model.metrics import overlaps
from model.nuclei import NucleusSink
from model.pipeline import predict_reader
from model.postprocess import engine_margin, find_nuclei, nucleus_margin_px, read_instances_png
from model.readers import ArrayReader
from tests.helpers.nuclei_stubs import CodeNet, Nucleus, encode, exact_logits, paint, scatter
from tests.helpers.stubs import loaded

CELL_NAMES = ("epithelial", "lymphocyte", "neutrophil", "macrophage", "other")


def _engine(mpp: float, block: int, margin: int | None = None) -> Engine:
    options = EngineOptions(tile_size=64, overlap=16, block_size=block, batch_size=32, precision="fp32",
                            device="cpu", margin=nucleus_margin_px(mpp) if margin is None else margin)
    return Engine(loaded(CodeNet(), mpp=mpp), options)


def _run(engine: Engine, image: np.ndarray, tmp_path: Path, *, mpp: float | None = None,
         instances: bool = True) -> tuple[dict, Path, Path]:
    geojson, inst = tmp_path / "nuclei.geojson", tmp_path / "instances.png"
    sink = NucleusSink(geojson, instances_path=inst if instances else None)
    report = engine.run(ArrayReader(image, mpp=mpp or engine.card.mpp), [sink])
    return report.sinks["nuclei"], geojson, inst


def _straddling(block: int, size: int, rng: np.random.Generator) -> list[Nucleus]:
    """Clusters of touching, overlapping ellipses on every block edge and corner."""
    nuclei = []
    for gy in range(block, size, block):
        for gx in range(block, size, block):
            for dx, dy in ((-7, -6), (6, -5), (-5, 7), (8, 8)):  # 4 touching nuclei around a corner
                nuclei.append(Nucleus(gx + dx, gy + dy, rng.uniform(6, 9), rng.uniform(6, 9),
                                      rng.uniform(0, np.pi), int(rng.integers(0, 5))))
            nuclei.append(Nucleus(gx - block / 2 + 3, gy, 12, 6, 0.3, 1))  # across a horizontal edge
            nuclei.append(Nucleus(gx, gy - block / 2 - 2, 6, 14, 1.2, 2))  # across a vertical edge
    return nuclei


def test_blocks_equal_whole_image(tmp_path):
    mpp, block, size = 0.5, 128, 512  # margin 64 px
    rng = np.random.default_rng(7)
    nuclei = _straddling(block, size, rng) + scatter(rng, size, size, 40, (5, 9))
    labels = paint(size, size, nuclei)
    whole = find_nuclei(*nucleus_inputs(*exact_logits(labels, nuclei)), mpp=mpp)
    stats, _, inst = _run(_engine(mpp, block), encode(labels, nuclei), tmp_path)
    blocks = read_instances_png(inst)
    assert stats["count"] == whole.n == int(blocks.max()) > 60
    ov = overlaps(whole.labels, blocks)
    gt, _, iou = ov.matches()
    assert len(gt) == whole.n and iou.min() >= 0.95
    assert stats["oversized"] == 0


def _exact_slide(rng: np.random.Generator, size: int) -> list[Nucleus]:
    nuclei = scatter(rng, size, size, 36, (8, 18))
    nuclei = [n for n in nuclei if not (size / 2 - 60 < n.cx < size / 2 + 60)]  # room for touching pairs
    for k, y in enumerate(range(40, size - 40, 60)):  # touching pairs across the vertical block edge
        r1, r2 = 9 + k % 4, 11 - k % 3
        x = size / 2 - r1
        nuclei += [Nucleus(x, y, r1, r1, 0, k % 5), Nucleus(x + r1 + r2, y, r2, r2, 0, (k + 2) % 5)]
    return nuclei


def test_generated_slide_exact_counts_classes_areas(tmp_path):
    """Through the real pipeline: stats.json and nuclei.geojson on disk."""
    mpp, size = 0.25, 512
    nuclei = _exact_slide(np.random.default_rng(11), size)
    labels = paint(size, size, nuclei)
    true_area = np.bincount(labels.ravel())[1:] * mpp**2
    true_cls = np.array([(n.sem - 1) % 5 for n in nuclei])  # semantic 0 (background) -> other
    options = EngineOptions(tile_size=64, overlap=16, block_size=256, batch_size=32, precision="fp32", device="cpu")
    predict_reader(ArrayReader(encode(labels, nuclei), mpp=mpp), tmp_path, loaded(CodeNet(), mpp=mpp), options,
                   outputs=frozenset({"nuclei", "masks"}))
    saved = json.loads((tmp_path / "stats.json").read_text())
    stats, geojson = saved["nuclei"], tmp_path / "nuclei.geojson"
    assert saved["parameters"]["margin"] == engine_margin(mpp) >= nucleus_margin_px(mpp)

    assert stats["count"] == len(nuclei)
    tissue_mm2 = size * size * mpp**2 / 1e6
    for k, name in enumerate(CELL_NAMES):
        got, want = stats["classes"][name], true_area[true_cls == k]
        assert got["count"] == len(want) > 0, name
        assert got["density_per_mm2"] == pytest.approx(len(want) / tissue_mm2)
        assert got["mean_area_um2"] == pytest.approx(want.mean(), rel=0.02)
        assert got["median_area_um2"] == pytest.approx(np.median(want), rel=0.02)
    assert stats["lymphocyte_fraction"] == pytest.approx((true_cls == 1).sum() / len(nuclei))

    features = json.loads(geojson.read_text())["features"]
    assert len(features) == len(nuclei)
    centres = np.array([[n.cx, n.cy] for n in nuclei])
    for f in features:
        poly = shapely.geometry.shape(f["geometry"])
        k = int(np.argmin(np.hypot(*(centres - [poly.centroid.x, poly.centroid.y]).T)))
        assert f["properties"]["classification"]["name"] == CELL_NAMES[true_cls[k]]
        assert f["properties"]["measurements"]["area_um2"] == pytest.approx(true_area[k], rel=0.02)
        assert f["properties"]["measurements"]["confidence"] == pytest.approx(1.0, abs=1e-3)
        assert poly.area * mpp**2 == pytest.approx(true_area[k], rel=0.1)  # the contour cuts corners


def test_geojson_is_valid_and_lands_on_nuclei_in_level0(tmp_path):
    """A 20x slide (0.5 µm/px) analysed at 0.25 µm/px: coordinates are level-0 pixels."""
    level0_mpp, size = 0.5, 200
    rng = np.random.default_rng(5)
    nuclei = scatter(rng, size, size, 14, (6, 10), classes=(1, 2, 3, 4))
    labels = paint(size, size, nuclei)
    image = encode(labels, nuclei)
    image[labels > 0, 0] = 100  # all inside: resampling blurs the rims anyway
    stats, geojson, inst = _run(_engine(0.25, 128), image, tmp_path, mpp=level0_mpp)
    assert stats["mpp"] == pytest.approx(0.25) and stats["count"] == len(nuclei)
    assert read_instances_png(inst).shape == (2 * size, 2 * size)  # analysis pixels

    doc = json.loads(geojson.read_text())
    assert doc["type"] == "FeatureCollection"
    for f in doc["features"]:
        assert f["type"] == "Feature" and isinstance(f["id"], str) and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "detection"
        assert set(f["properties"]["classification"]) == {"name", "color"}
        ring = f["geometry"]["coordinates"][0]
        assert len(f["geometry"]["coordinates"]) == 1 and ring[0] == ring[-1] and len(ring) >= 4
        assert shapely.LinearRing(ring).is_ccw
        poly = shapely.Polygon(ring)
        assert poly.is_valid
        k = int(np.argmin([np.hypot(n.cx - poly.centroid.x, n.cy - poly.centroid.y) for n in nuclei]))
        n = nuclei[k]
        assert np.hypot(n.cx - poly.centroid.x, n.cy - poly.centroid.y) < 1.0  # level-0 pixels
        assert poly.area == pytest.approx(np.pi * n.rx * n.ry, rel=0.12)
        assert f["properties"]["classification"]["name"] == CELL_NAMES[n.sem - 1]
    assert len({f["id"] for f in doc["features"]}) == len(nuclei)


def test_margin_too_small_is_refused(tmp_path):
    image = np.full((256, 256, 3), 255, dtype=np.uint8)
    with pytest.raises(OptionsError, match=r"margin >= 128 px .* got 16"):
        _run(_engine(0.25, 128, margin=16), image, tmp_path)


def test_empty_slide_gives_zero_counts_and_empty_collection(tmp_path):
    stats, geojson, _ = _run(_engine(0.25, 128), np.full((200, 300, 3), 255, np.uint8), tmp_path)
    assert stats["count"] == 0 and stats["lymphocyte_fraction"] is None
    assert stats["classes"]["other"] == {"count": 0, "density_per_mm2": 0.0, "mean_area_um2": None,
                                         "median_area_um2": None}
    assert json.loads(geojson.read_text()) == {"type": "FeatureCollection", "features": []}
