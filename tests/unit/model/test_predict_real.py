"""Real slides end to end: resampling geometry, broken files, CLI exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.card import ModelCard
from model.checkpoint import save_checkpoint
from model.engine import EngineOptions
from model.network import build_network
from model.options import result_files
from model.pipeline import run_prediction
from tests.helpers.samples import sample
from tests.helpers.service_stack import TEST_RECIPE_VALIDATION
from tests.helpers.stubs import TrivialNet, loaded

NUCSEG = [sys.executable, "-m", "cli.main"]



def _darkness(x: torch.Tensor) -> torch.Tensor:
    """Cheap stand-in network: darker pixels score higher on channel 1."""
    dark = 1.0 - x.mean(dim=1, keepdim=True)
    return torch.cat((1 - dark, dark, dark * 0.5), dim=1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    card = ModelCard.model_validate({"name": "tiny", "encoder": "resnet18",
                                     "recipe_validation": TEST_RECIPE_VALIDATION})
    return save_checkpoint(build_network("resnet18"), card, path)


def test_cmu_20x_is_resampled_to_model_mpp(tmp_path: Path) -> None:
    slide = sample("cmu_small_region.svs")
    stats = run_prediction(slide, tmp_path, loaded(TrivialNet(_darkness)),
                           EngineOptions(device="cpu", precision="fp32", tissue=False),
                           outputs=frozenset({"masks", "overlays"}))
    w0, h0 = stats["slide"]["dimensions"]
    assert stats["slide"]["mpp"] == pytest.approx(0.499)
    expected = (w0 * 0.499 / 0.25, h0 * 0.499 / 0.25)
    for name in ("semantic.png", "ternary.png"):
        with Image.open(tmp_path / name) as img:
            assert img.mode == "P"
            assert abs(img.width - expected[0]) <= 1 and abs(img.height - expected[1]) <= 1, img.size
            counts = np.bincount(np.asarray(img).ravel(), minlength=5)
        head = stats[name.removesuffix(".png")]["classes"]
        assert [c["pixels"] for c in head.values()] == counts[: len(head)].tolist()
    assert stats["analysis"]["mpp"] == 0.25 and stats["analysis"]["mpp_source"] == "slide"
    assert stats["model"]["held_out"] is None  # the stub's card has no held-out figures
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(result_files({"masks", "overlays"}))
    with Image.open(tmp_path / "overlay_semantic.png") as ov:
        assert max(ov.size) <= 4096


def test_cli_predict_small_svs_json(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([*NUCSEG, "predict", str(sample("small.svs")), "--out", str(out), "--model",
                           str(tiny_checkpoint), "--json", "--quiet", "--outputs", "masks,overlays"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["model"]["encoder"] == "resnet18" and len(stats["model"]["sha256"]) == 64
    # the card's figures, beside the result
    assert stats["model"]["held_out"] == json.loads(json.dumps(TEST_RECIPE_VALIDATION))
    assert stats["analysis"]["width"] == 32  # 16 px at 0.499 -> 32 px at 0.25
    assert (out / "semantic.png").is_file() and (out / "stats.json").is_file()


def _broken_inputs(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n" * 20)
    truncated = tmp_path / "truncated.svs"
    data = sample("cmu_small_region.svs").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    copies = {}
    for name in ("unopenable.tiff", "unreadable.svs"):
        copies[name] = tmp_path / name
        shutil.copy(sample(name), copies[name])
    return {"empty": empty, "text": text, "truncated": truncated, **copies}


def test_cli_summary_gives_each_type_its_held_out_iou(tmp_path: Path, tiny_checkpoint: Path) -> None:
    proc = subprocess.run([*NUCSEG, "predict", str(sample("small.svs")), "--out", str(tmp_path / "out"),
                           "--model", str(tiny_checkpoint), "--outputs", "masks"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert lines["macrophage"].endswith("(held-out IoU 0.13)")
    assert "held-out" not in lines["lymphocyte"]  # no figure in the card: none printed


@pytest.mark.parametrize("case", ["empty", "text", "truncated", "unopenable.tiff", "unreadable.svs"])
def test_cli_broken_slides_exit_3(tmp_path: Path, tiny_checkpoint: Path, case: str) -> None:
    slide = _broken_inputs(tmp_path)[case]
    proc = subprocess.run([*NUCSEG, "predict", str(slide), "--out", str(tmp_path / "o"), "--model",
                           str(tiny_checkpoint), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert slide.name in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_usage_exit_2(tmp_path: Path, tiny_checkpoint: Path) -> None:
    slide = sample("small.svs")
    bad_tile = subprocess.run([*NUCSEG, "predict", str(slide), "--out", str(tmp_path), "--model",
                               str(tiny_checkpoint), "--tile", "100"], capture_output=True, text=True, timeout=120)
    assert bad_tile.returncode == 2 and "tile_size" in bad_tile.stderr and "100" in bad_tile.stderr
    no_model = subprocess.run([*NUCSEG, "predict", str(slide), "--out", str(tmp_path), "--model",
                               str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=120)
    assert no_model.returncode == 2 and "missing.pt" in no_model.stderr
    no_args = subprocess.run([*NUCSEG, "predict"], capture_output=True, text=True, timeout=120)
    assert no_args.returncode == 2


def test_client_commands_say_what_they_need_when_the_client_is_not_installed() -> None:
    """The images do not install nucseg-client: ``nucseg submit`` says so instead of not existing."""
    code = ("import sys; sys.modules['nucseg_client'] = None; from cli.main import main; "
            "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "submit", "slide.svs", "--wait"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "pip install ./client" in out.stderr and "nucseg submit" in out.stderr
    assert "Traceback" not in out.stderr
    with_client = subprocess.run([*NUCSEG, "submit", "--help"], capture_output=True, text=True, timeout=120)
    assert with_client.returncode == 0 and "--wait" in with_client.stdout
