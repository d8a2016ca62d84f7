"""Aperio ImageScope XML (MoNuSAC / MoNuSeg layout) to instance, semantic and ternary maps.

Layout: ``Annotations/Annotation`` (one per class; ``Attributes/Attribute@Name`` is the class),
``Regions/Region/Vertices/Vertex@X,@Y`` (one region per nucleus). Classes not in the class table
(MoNuSeg's ``Description``) give nuclei of unknown class: ``semantic = IGNORE`` on them.
``Ambiguous`` regions become an ignore mask in both maps.

Quirks of the real files that are handled, and counted in :class:`ReadReport`: vertices outside
the image (clipped), regions with fewer than 3 vertices or non-finite coordinates (skipped),
duplicate regions (identical vertices, kept once), regions that cover no pixel centre, and
empty annotations (all background).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data.rasterise import polygon_mask, ternary_from_instances
from training.data.sample import IGNORE

MONUSAC_CLASSES: dict[str, int] = {"epithelial": 1, "lymphocyte": 2, "neutrophil": 3, "macrophage": 4}
AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class Region:
    """One annotated polygon: vertices ``(N, 2)`` as ``(x, y)`` and the annotation's class name."""

    label: str
    xy: np.ndarray


@dataclass
class ReadReport:
    """What the reader kept and skipped, for logs and tests."""

    regions: int = 0
    kept: int = 0
    too_few_points: int = 0
    non_finite: int = 0
    duplicates: int = 0
    empty: int = 0
    ambiguous: int = 0
    labels: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Rasterised:
    """Label maps of one image: ``instances`` int32 (0 = background), ``semantic``/``ternary`` int64."""

    instances: np.ndarray
    semantic: np.ndarray
    ternary: np.ndarray
    report: ReadReport


def parse_regions(path: str | Path) -> list[Region]:
    """Every region of the file, in file order, labelled by its annotation's class name."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"annotation file {str(path)!r} is not valid XML: {exc}") from exc
    regions: list[Region] = []
    for annotation in root.iter("Annotation"):
        label = _annotation_label(annotation)
        for region in annotation.iter("Region"):
            regions.append(Region(label, _vertices(region)))
    return regions


def _annotation_label(annotation: ET.Element) -> str:
    attr = annotation.find("Attributes/Attribute")
    return (attr.get("Name") or "").strip() if attr is not None else ""


def _vertices(region: ET.Element) -> np.ndarray:
    pts = []
    for vertex in region.iter("Vertex"):
        try:
            pts.append((float(vertex.get("X", "nan")), float(vertex.get("Y", "nan"))))
        except ValueError:
            pts.append((math.nan, math.nan))
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def rasterise(
    regions: list[Region],
    shape: tuple[int, int],
    *,
    classes: dict[str, int] | None = None,
    unknown_class: int = IGNORE,
    boundary_width: int = 2,
) -> Rasterised:
    """Rasterise regions to maps of ``shape``; the first region to claim a pixel keeps it."""
    classes = MONUSAC_CLASSES if classes is None else classes
    report = ReadReport(regions=len(regions))
    instances = np.zeros(shape, dtype=np.int32)
    semantic = np.zeros(shape, dtype=np.int64)
    ambiguous = np.zeros(shape, dtype=bool)
    seen: set[bytes] = set()
    for region in regions:
        if not _usable(region, report, seen):
            continue
        rows, cols = polygon_mask(region.xy, shape)
        if region.label.lower() == AMBIGUOUS:
            report.ambiguous += 1
            ambiguous[rows, cols] = True
            continue
        free = instances[rows, cols] == 0
        rows, cols = rows[free], cols[free]
        if rows.size == 0:
            report.empty += 1
            continue
        report.kept += 1
        report.labels[region.label] = report.labels.get(region.label, 0) + 1
        instances[rows, cols] = report.kept
        semantic[rows, cols] = classes.get(region.label.lower(), unknown_class)
    ternary = ternary_from_instances(instances, boundary_width)
    semantic[ambiguous] = IGNORE
    ternary[ambiguous] = IGNORE
    return Rasterised(instances, semantic, ternary, report)


def _usable(region: Region, report: ReadReport, seen: set[bytes]) -> bool:
    if len(region.xy) < 3:
        report.too_few_points += 1
        return False
    if not np.isfinite(region.xy).all():
        report.non_finite += 1
        return False
    key = region.label.lower().encode() + np.round(region.xy, 3).tobytes()
    if key in seen:
        report.duplicates += 1
        return False
    seen.add(key)
    return True


def read_xml(path: str | Path, shape: tuple[int, int], **kwargs: object) -> Rasterised:
    """Parse and rasterise one annotation file (keyword arguments as for :func:`rasterise`)."""
    return rasterise(parse_regions(path), shape, **kwargs)  # type: ignore[arg-type]
