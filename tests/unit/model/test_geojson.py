"""The streamed GeoJSON writer."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from model.geojson import GeoJSONWriter

SQUARE = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0], [0.0, 0.0]])


def test_features_stream_and_close_renames(tmp_path):
    path = tmp_path / "nuclei.geojson"
    with GeoJSONWriter(path, id_prefix=uuid.UUID(int=0xABC << 80)) as writer:
        ids = [writer.write_detection(SQUARE + k, "lymphocyte", (255, 255, 0), {"area_um2": 6.25, "confidence": 0.9})
               for k in range(3)]
        assert not path.exists() and writer.partial.exists()  # written in place only at the end
    doc = json.loads(path.read_text())
    assert not writer.partial.exists()
    assert len(doc["features"]) == 3 and [f["id"] for f in doc["features"]] == ids
    assert len(set(ids)) == 3 and all(uuid.UUID(i) for i in ids)
    f = doc["features"][1]
    assert f["geometry"] == {"type": "Polygon", "coordinates": [(SQUARE + 1).tolist()]}
    assert f["properties"] == {
        "objectType": "detection",
        "classification": {"name": "lymphocyte", "color": [255, 255, 0]},
        "measurements": {"area_um2": 6.25, "confidence": 0.9},
    }


def test_empty_collection_and_nan_measurement(tmp_path):
    path = tmp_path / "a.geojson"
    GeoJSONWriter(path).close()
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}
    with GeoJSONWriter(path) as writer:
        writer.write_detection(SQUARE, "other", (1, 2, 3), {"confidence": float("nan")})
    assert json.loads(path.read_text())["features"][0]["properties"]["measurements"] == {"confidence": None}


def test_error_inside_the_block_leaves_no_file(tmp_path):
    path = tmp_path / "b.geojson"
    with pytest.raises(RuntimeError), GeoJSONWriter(path) as writer:
        writer.write_detection(SQUARE, "other", (0, 0, 0), {})
        raise RuntimeError("boom")
    assert not path.exists() and not writer.partial.exists()


def test_bad_ring_and_closed_writer_are_refused(tmp_path):
    writer = GeoJSONWriter(tmp_path / "c.geojson")
    with pytest.raises(ValueError, match=r"got shape \(3, 2\)"):
        writer.write_detection(SQUARE[:3], "other", (0, 0, 0), {})
    writer.close()
    with pytest.raises(ValueError, match="already closed"):
        writer.write_detection(SQUARE, "other", (0, 0, 0), {})
