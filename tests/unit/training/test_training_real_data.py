"""The XML reader on the real MoNuSeg files; skipped where ../shared/data is absent (CI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data.sources import CONSEP_CLASS_MAP, load_instance_folder
from training.data.xml_reader import parse_regions, read_xml

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "monuseg").is_dir(), reason="../shared/data is not available")


def test_monuseg_test_xmls_hold_every_nucleus() -> None:
    files = sorted((DATA / "monuseg" / "test" / "annotations").glob("*.xml"))
    assert len(files) == 14
    assert sum(len(parse_regions(f)) for f in files) == 6697  # the README's count


def test_monuseg_train_xml_rasterises_sensibly() -> None:
    path = sorted((DATA / "monuseg" / "train" / "annotations").glob("*.xml"))[0]
    out = read_xml(path, (1000, 1000), classes={})
    rep = out.report
    assert rep.kept >= 0.99 * rep.regions and out.instances.max() == rep.kept
    fraction = (out.ternary > 0).mean()
    assert 0.05 < fraction < 0.6
    assert (out.semantic[out.ternary > 0] == -1).all() and (out.semantic[out.ternary == 0] == 0).all()
    assert (out.ternary == 2).sum() > 0.2 * (out.ternary > 0).sum()


def test_consep_tiles_group_by_source_image() -> None:
    samples = load_instance_folder(DATA / "consep_tiles" / "test", class_map=CONSEP_CLASS_MAP)[:16]
    assert len({s.group for s in samples}) == 1
    assert all(set(np.unique(s.semantic)) <= {0, 1, 2} for s in samples)


def test_monusac_class_masks_hold_nine_patients_and_their_neutrophils() -> None:
    from training.data.sources import load_monusac

    samples = load_monusac(DATA / "monusac")
    assert len(samples) == 37 and len({s.group for s in samples}) == 9
    neutrophil_cells = sum(len(np.unique(s.instances[s.semantic == 3])) for s in samples if s.instances is not None)
    assert 40 <= neutrophil_cells <= 70  # 56 connected components
    for s in samples:
        assert ((s.ternary > 0) <= (s.semantic > 0)).all()  # the ternary head's nuclei are labelled cells
