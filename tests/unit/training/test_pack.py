"""Training packs (``training.pack``): what goes in comes out, a config's sources are checked against
how they were packed, and training reads its sources from a pack as from their folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from training.config import SourceConfig, load_config
from training.pack import Pack, PackError, write_pack
from training.synthetic import write_instance_folder
from training.train import Trainer, load_data, load_source

CLASS_MAP = {0: 0, 1: 0, 2: -2, 3: 1, 4: 0}  # as the CoNSeP source: inflammatory is a partial label


def _source(tmp_path: Path) -> SourceConfig:
    root = write_instance_folder(tmp_path / "data", n_images=4, size=96, n_nuclei=14, seed=2)
    return SourceConfig(kind="instance_folder", name="synth", root=str(root), class_map=CLASS_MAP)


def test_labels_come_back_exact_and_images_close(tmp_path: Path) -> None:
    """Generated tiles carry per-pixel noise, JPEG's worst case (mean error 8 here; about 1 to 4 grey
    levels, PSNR 33 to 45 dB, on the real training images)."""
    src = _source(tmp_path)
    samples = load_source(src, 2)
    write_pack(tmp_path / "p.zip", [(src, samples)], 2, instances=True)
    back = Pack.open(tmp_path / "p.zip").samples(src, 2)
    assert [(s.name, s.group, s.dataset) for s in back] == [(s.name, s.group, s.dataset) for s in samples]
    for a, b in zip(samples, back, strict=True):
        assert np.array_equal(a.semantic, b.semantic) and np.array_equal(a.ternary, b.ternary)
        assert a.instances is not None and b.instances is not None and np.array_equal(a.instances, b.instances)
        assert set(np.unique(a.semantic)) >= {-2, 0}  # the partial label and ignore survive the offsets
        error = np.abs(a.image.astype(int) - b.image.astype(int))  # JPEG: close, not equal
        assert b.image.dtype == np.uint8 and error.mean() < 10 and not np.array_equal(a.image, b.image)


def test_a_pack_refuses_a_source_read_another_way(tmp_path: Path) -> None:
    src = _source(tmp_path)
    write_pack(tmp_path / "p.zip", [(src, load_source(src, 2))], 2)
    pack = Pack.open(tmp_path / "p.zip")
    assert pack.sources == ["synth"] and all(s.instances is None for s in pack.samples(src, 2))
    with pytest.raises(PackError, match="boundary_width"):
        pack.samples(src, 3)
    with pytest.raises(PackError, match="class_map"):
        pack.samples(src.model_copy(update={"class_map": {**CLASS_MAP, 2: 2}}), 2)
    with pytest.raises(PackError, match="holds no source 'other'"):
        pack.samples(src.model_copy(update={"name": "other"}), 2)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(PackError, match="not a training pack"):
        Pack.open(tmp_path / "bad.zip")


@pytest.mark.slow
def test_training_from_a_pack_splits_and_trains_as_from_folders(tmp_path: Path) -> None:
    src = _source(tmp_path)
    write_pack(tmp_path / "p.zip", [(src, load_source(src, 2))], 2)
    cfg = {"name": "packed", "out_dir": str(tmp_path / "run"), "seed": 3, "encoder": "resnet18",
           "data": {"val_fraction": 0.25, "sources": [src.model_dump(mode="json", exclude_none=True)]},
           "patches": {"size": 64, "per_epoch": 16, "rotate": True},
           "train": {"epochs": 1, "batch_size": 8, "threads": 2, "score_metrics": ["val_synth_nucleus_dice"]},
           "card": {"name": "packed", "licence": "test"}}
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(path)
    folders, packed = load_data(config), load_data(config, Pack.open(tmp_path / "p.zip"))
    assert [s.name for s in packed[0]] == [s.name for s in folders[0]] and packed[1] == folders[1]
    assert [s.name for s in packed[2]] == [s.name for s in folders[2]]
    state = Trainer(config, config_path=str(path), quiet=True, pack=str(tmp_path / "p.zip")).run()
    assert state.step == 2 and (tmp_path / "run" / "last.pt").is_file()
