"""Aperio XML reading and rasterisation on hand-written files (no real data needed).

Vertices sit on half-integers so that no pixel centre lies on a polygon edge: a square from
x=9.5..19.5, y=4.5..14.5 covers exactly columns 10..19 and rows 5..14 (100 pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data.rasterise import ternary_from_instances
from training.data.xml_reader import parse_regions, read_xml

HEADER = '<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.25">\n'


def rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def region(points: list[tuple[float, float]], rid: int = 1) -> str:
    verts = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in points)
    return f'<Region Id="{rid}"><Attributes/><Vertices>{verts}</Vertices></Region>'


def annotation(label: str, regions: list[str]) -> str:
    return (f'<Annotation Id="1"><Attributes><Attribute Name="{label}" Id="0" Value=""/></Attributes>'
            f'<Regions>{"".join(regions)}</Regions></Annotation>')


def write(tmp_path: Path, *annotations: str) -> Path:
    path = tmp_path / "a.xml"
    path.write_text(HEADER + "".join(annotations) + "</Annotations>")
    return path


def test_square_exact_pixels_and_inner_boundary(tmp_path: Path) -> None:
    path = write(tmp_path, annotation("Epithelial", [region(rect(9.5, 4.5, 19.5, 14.5))]))
    out = read_xml(path, (40, 40))
    assert (out.instances > 0).sum() == 100
    assert out.instances[5:15, 10:20].all()
    assert (out.semantic == 1).sum() == 100 and (out.semantic == 0).sum() == 1500
    # boundary width 2 (Chebyshev): a 10x10 square keeps a 6x6 inside
    assert (out.ternary == 1).sum() == 36
    assert (out.ternary == 2).sum() == 64
    assert (out.ternary[7:13, 12:18] == 1).all()


def test_classes_and_unknown_class(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        annotation("Lymphocyte", [region(rect(0.5, 0.5, 5.5, 5.5))]),
        annotation("Macrophage", [region(rect(10.5, 10.5, 15.5, 15.5))]),
        annotation("Description", [region(rect(20.5, 20.5, 25.5, 25.5))]),
    )
    out = read_xml(path, (30, 30))
    assert (out.semantic == 2).sum() == 25
    assert (out.semantic == 4).sum() == 25
    assert (out.semantic == -1).sum() == 25  # MoNuSeg-style nucleus of unknown class
    assert out.instances.max() == 3


def test_touching_nuclei_get_a_boundary(tmp_path: Path) -> None:
    left = region(rect(4.5, 4.5, 14.5, 14.5), 1)
    right = region(rect(14.5, 4.5, 24.5, 14.5), 2)  # shares the edge x = 14.5
    out = read_xml(write(tmp_path, annotation("Epithelial", [left, right])), (30, 30))
    assert set(np.unique(out.instances[5:15, 5:25])) == {1, 2}
    # columns 13,14 (left) and 15,16 (right) are boundary on every row of the pair
    assert (out.ternary[5:15, 13:17] == 2).all()
    inside = out.ternary == 1
    assert not (inside[:, 14] | inside[:, 15]).any()
    assert (out.ternary == 1).sum() == 2 * 36


def test_ambiguous_region_is_ignored(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        annotation("Epithelial", [region(rect(4.5, 4.5, 9.5, 9.5))]),
        annotation("Ambiguous", [region(rect(19.5, 19.5, 29.5, 29.5))]),
    )
    out = read_xml(path, (40, 40))
    assert (out.semantic == -1).sum() == 100 and (out.ternary == -1).sum() == 100
    assert (out.semantic[20:30, 20:30] == -1).all()
    assert out.instances.max() == 1 and out.report.ambiguous == 1


def test_quirks_outside_short_duplicate(tmp_path: Path) -> None:
    square = rect(-5.5, -5.5, 4.5, 4.5)  # extends outside the image: clipped to 5x5
    regions = [
        region(square, 1),
        region(square, 2),  # duplicate
        region([(10.0, 10.0), (12.0, 12.0)], 3),  # fewer than 3 points
        region([], 4),  # no vertices at all
        region(rect(100.5, 100.5, 110.5, 110.5), 5),  # entirely outside
    ]
    out = read_xml(write(tmp_path, annotation("Neutrophil", regions)), (20, 20))
    assert (out.instances > 0).sum() == 25
    assert (out.semantic == 3).sum() == 25
    rep = out.report
    assert (rep.regions, rep.kept, rep.duplicates, rep.too_few_points, rep.empty) == (5, 1, 1, 2, 1)


def test_empty_annotation_and_bad_xml(tmp_path: Path) -> None:
    out = read_xml(write(tmp_path), (8, 8))
    assert not out.instances.any() and (out.semantic == 0).all() and (out.ternary == 0).all()
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Annotation>")
    with pytest.raises(ValueError, match=r"bad\.xml"):
        parse_regions(bad)


def test_ternary_from_instances_width_and_image_edge() -> None:
    inst = np.zeros((10, 10), dtype=np.int32)
    inst[:, :5] = 1  # touches the image edge on three sides
    ter = ternary_from_instances(inst, boundary_width=1)
    assert (ter[:, 4] == 2).all() and (ter[:, :4] == 1).all()  # only the side facing background
    assert (ternary_from_instances(inst, 0) == (inst > 0)).all()
    with pytest.raises(ValueError, match="-1"):
        ternary_from_instances(inst, -1)
