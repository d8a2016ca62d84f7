"""Streamed GeoJSON FeatureCollection of nucleus detections that QuPath imports.

The file is written feature by feature, so a slide with a million nuclei never holds them all in
memory. It goes to ``<path>.partial`` first and is renamed to ``path`` by ``close()``; a writer left
by an exception removes its partial file.

Each Feature follows RFC 7946 and QuPath's GeoJSON (``File → Import objects from file``):

- ``id``: a UUID string (QuPath ≥ 0.3 reads it as the object's id). Ids share a random 80-bit
  prefix per file and end in a counter, so they are unique within and across files.
- ``geometry``: a ``Polygon`` in level-0 pixel coordinates of the slide (x right, y down, origin at
  the top-left corner of level 0), one closed ring, exterior counter-clockwise in those coordinates
  (RFC 7946 §3.1.6).
- ``properties.objectType = "detection"``, ``properties.classification = {"name", "color": [r, g, b]}``,
  ``properties.measurements = {name: number}`` (QuPath ≥ 0.4 format).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType

import numpy as np

from model.partial import PartialFile
from model.postprocess import BlockNuclei

_HEADER = '{"type":"FeatureCollection","features":[\n'
_FOOTER = "\n]}\n"
_COUNTER_BITS = 48
COORD_DECIMALS = 2


class GeoJSONWriter:
    """Writes detection Features one at a time; use as a context manager or call ``close()``."""

    def __init__(self, path: str | Path, *, id_prefix: uuid.UUID | None = None) -> None:
        self._file = PartialFile(path, "w")
        self.path, self.partial = self._file.path, self._file.partial
        self.count = 0
        base = (id_prefix or uuid.uuid4()).int
        self._id_base = base & ~((1 << _COUNTER_BITS) - 1)
        self._write(_HEADER)

    def write_detection(
        self,
        ring: np.ndarray,
        name: str,
        colour: Sequence[int],
        measurements: Mapping[str, float],
    ) -> str:
        """Append one detection with exterior ``ring`` (``(k, 2)`` x, y; closed); returns its id."""
        return self.write_feature(feature_body(ring, name, colour, measurements))

    def write_feature(self, body: str) -> str:
        """Append one detection whose geometry and properties ``body`` (``feature_body``) holds; returns its id."""
        if self._file.fh is None:
            raise ValueError(f"GeoJSON writer for {str(self.path)!r} is already closed")
        fid = str(uuid.UUID(int=self._id_base | (self.count & ((1 << _COUNTER_BITS) - 1))))
        sep = ",\n" if self.count else ""
        self._write(f'{sep}{{"type":"Feature","id":"{fid}",{body}}}')
        self.count += 1
        return fid

    def _write(self, text: str) -> None:
        assert self._file.fh is not None
        self._file.fh.write(text)

    def close(self) -> None:
        """Finish the collection and move it into place."""
        if self._file.fh is not None:
            self._write(_FOOTER)
            self._file.commit()

    def abort(self) -> None:
        """Drop the partial file."""
        self._file.abort()

    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def feature_body(ring: np.ndarray, name: str, colour: Sequence[int], measurements: Mapping[str, float]) -> str:
    """A detection Feature's geometry and properties, the JSON text after its id (the bytes ``json.dumps``
    writes, floats as their repr, built without it: this runs once per nucleus)."""
    if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 4:
        raise ValueError(f"ring must be (k >= 4, 2) x, y coordinates, got shape {ring.shape}")
    coords = "[" + ",".join([f"[{x!r},{y!r}]" for x, y in np.round(ring, COORD_DECIMALS).tolist()]) + "]"
    values = ",".join(f"{_key(k)}:{_number(v)}" for k, v in measurements.items())
    props = f'{_classification(name, tuple(colour))},"measurements":{{{values}}}}}'
    return f'"geometry":{{"type":"Polygon","coordinates":[{coords}]}},"properties":{props}'


@dataclass(frozen=True)
class FeatureStyle:
    """How a run's nuclei are written: each class index's name and colour."""

    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...]


def block_features(nuclei: BlockNuclei, style: FeatureStyle) -> list[str]:
    """``feature_body`` of each nucleus a block owns."""
    return [feature_body(ring, style.names[k], style.colours[k], {"area_um2": float(area), "confidence": float(c)})
            for ring, k, area, c in zip(nuclei.rings, nuclei.class_index, nuclei.area_um2, nuclei.confidence,
                                        strict=True)]


@lru_cache(maxsize=64)
def _classification(name: str, colour: tuple[int, ...]) -> str:
    """``{"objectType":...,"classification":{...}`` of one class, encoded once."""
    classification = {"name": name, "color": [int(c) for c in colour]}  # numpy integers hash alike
    return f'{{"objectType":"detection","classification":{json.dumps(classification, separators=(",", ":"))}'


def _number(value: float) -> str:
    """A measurement as JSON: rounded to 4 decimals; null for NaN/inf, which JSON has not."""
    value = float(value)
    return repr(round(value, 4)) if math.isfinite(value) else "null"


@lru_cache(maxsize=64)
def _key(name: str) -> str:
    return json.dumps(name)
