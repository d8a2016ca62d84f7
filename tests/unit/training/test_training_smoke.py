"""Smoke training run on generated images: loss goes down, checkpoints are written and loadable,
training resumes, and the checkpoint runs through the engine when it exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from model.checkpoint import load_model
from training.config import load_config
from training.synthetic import synthetic_tile, write_instance_folder
from training.train import Trainer

pytestmark = pytest.mark.slow


def smoke_config(tmp_path: Path, epochs: int) -> Path:
    data = write_instance_folder(tmp_path / "data", n_images=6, size=96, n_nuclei=14, seed=1)
    cfg = {
        "name": "smoke", "out_dir": str(tmp_path / "run"), "seed": 3, "encoder": "resnet18",
        "data": {"val_fraction": 0.34, "sources": [
            {"kind": "instance_folder", "name": "synth", "root": str(data),
             "class_map": {0: 0, 1: 0, 2: 2, 3: 1, 4: 0}}]},
        "patches": {"size": 64, "per_epoch": 48, "foreground_bias": 0.7},
        "train": {"epochs": epochs, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0.2, "threads": 2, "ema": 0.9,
                  "score_metrics": ["val_synth_nucleus_dice"]},
        "card": {"name": "smoke", "licence": "test"},
    }
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("smoke")
    path = smoke_config(tmp, epochs=2)
    Trainer(load_config(path), config_path=str(path), quiet=True).run()
    return path, tmp / "run"


def test_loss_goes_down_and_logs_written(trained: tuple[Path, Path]) -> None:
    _, run = trained
    history = json.loads((run / "log.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    for name in ("last.pt", "best.pt", "ema.pt", "log.csv", "dashboard.png", "split.json"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())["synth"]
    assert split["val_groups"] and not set(split["val_groups"]) & set(split["train_groups"])


def test_checkpoint_loads_with_card(trained: tuple[Path, Path]) -> None:
    _, run = trained
    loaded = load_model(run / "last.pt")
    assert loaded.card.encoder == "resnet18" and loaded.format == "torch+card"
    training = loaded.card.model_dump()["training"]
    assert training["epoch"] == 2 and "git_commit" in training and training["command"].startswith("python -m")
    with torch.inference_mode():
        sem, ter = loaded.network(torch.zeros(1, 3, 64, 64))
    assert sem.shape == (1, 5, 64, 64) and ter.shape == (1, 3, 64, 64)


def test_weight_average_written_beside_the_network(trained: tuple[Path, Path]) -> None:
    _, run = trained
    last, ema = load_model(run / "last.pt"), load_model(run / "ema.pt")
    steps = last.card.model_dump()["training"]["steps"]
    assert ema.card.model_dump()["training"]["weights"] == f"exponential average, decay 0.9, {steps} updates"
    key = "base.encoder.conv1.weight"
    assert not torch.equal(ema.network.state_dict()[key], last.network.state_dict()[key])


def test_resume_continues_from_last(trained: tuple[Path, Path]) -> None:
    path, _ = trained
    base = load_config(path)
    cfg = base.model_copy(update={"train": base.train.model_copy(update={"epochs": 3})})
    trainer = Trainer(cfg, config_path=str(path), quiet=True)
    assert trainer.state.epoch == 2 and len(trainer.state.history) == 2 and trainer.state.step > 0
    assert trainer.average is not None and trainer.average.updates == trainer.state.step
    state = trainer.run()
    assert state.epoch == 3 and [r["epoch"] for r in state.history] == [1, 2, 3]


def test_engine_runs_checkpoint(trained: tuple[Path, Path]) -> None:
    from model import engine as engine_mod

    _, run = trained
    loaded = load_model(run / "best.pt")
    opts = engine_mod.EngineOptions(tile_size=64, overlap=16, batch_size=4, precision="fp32", device="cpu",
                                    tissue=False)
    engine = engine_mod.Engine(loaded, opts)
    image, _, _ = synthetic_tile(150, 20, np.random.default_rng(0))
    sem, ter = engine.predict_array(image)
    assert sem.shape == (5, 150, 150) and ter.shape == (3, 150, 150)
    assert np.isfinite(sem).all() and np.isfinite(ter).all()


def test_evaluate_and_export(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from training.evaluate import main as evaluate_main
    from training.export import export

    _, run = trained
    data = write_instance_folder(tmp_path / "test", n_images=2, size=80, n_nuclei=10, seed=9)
    out, digest = export(run / "best.pt", tmp_path / "w" / "m.safetensors", sets={"version": "9"})
    assert (tmp_path / "w" / "m.safetensors.sha256").read_text().split()[0] == digest
    loaded = load_model(out, expected_sha256=digest)
    assert loaded.card.version == "9" and loaded.card.model_dump()["exported_from_sha256"]
    assert next(iter(loaded.network.state_dict().values())).dtype == torch.float32
    assert evaluate_main(["--checkpoint", str(out), "--data", str(data), "--out", str(tmp_path / "e"),
                          "--tile-size", "64", "--overlap", "16", "--precision", "fp32"]) == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    consep = report["datasets"]["consep"]
    assert consep["images"] == 2 and 0 <= consep["nucleus_dice"] <= 1
    assert "| nucleus_dice |" in (tmp_path / "e" / "eval.md").read_text()
    m = np.asarray(consep["sem_confusion"])  # rows: labelled, columns: predicted; the IoUs come from it
    assert m.shape == (5, 5) and m[0, 0] / (m[0].sum() + m[:, 0].sum() - m[0, 0]) == consep["sem_iou_background"]
    assert evaluate_main(["--checkpoint", str(out), "--data", str(data), "--out", str(tmp_path / "t"),
                          "--tile-size", "64", "--overlap", "16", "--precision", "fp32", "--tta"]) == 0
    tta = json.loads((tmp_path / "t" / "eval.json").read_text())
    assert tta["engine"]["tta"] is True and tta["datasets"]["consep"]["images"] == 2
    assert "test-time augmentation" in (tmp_path / "t" / "eval.md").read_text()
    out2, _ = export(run / "best.pt", tmp_path / "w" / "m2.safetensors",
                     eval_path=tmp_path / "e" / "eval.json")
    assert "test_metrics" in load_model(out2).card.model_dump()


def test_nucseg_predict_runs_checkpoint(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    from cli import main as cli

    _, run = trained
    image, _, _ = synthetic_tile(128, 12, np.random.default_rng(5))
    Image.fromarray(image).save(tmp_path / "tile.png")
    code = cli.main(["predict", str(tmp_path / "tile.png"), "--out", str(tmp_path / "out"), "--model",
                     str(run / "best.pt"), "--tile", "64", "--overlap", "16", "--mpp", "0.25",
                     "--precision", "fp32", "--quiet"])
    assert code == 0
    assert any((tmp_path / "out").iterdir())
