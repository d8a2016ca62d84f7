"""Checkpoint formats: the original's, ours, safetensors; clear failures."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from model.card import ModelCard
from model.checkpoint import infer_encoder, load_model, save_checkpoint, save_safetensors, sha256_file
from model.errors import CheckpointError
from model.network import build_network
from tests.helpers.service_stack import TEST_RECIPE_VALIDATION


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(7)
    return build_network("resnet18").eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k].float(), sb[k].float(), atol=atol) for k in sa)


def test_original_format_round_trips_strict(tmp_path: Path, network: torch.nn.Module) -> None:
    path = tmp_path / "original.pth"
    torch.save({"model_state": network.state_dict(), "epoch": 12, "best_miou": 0.61}, path)
    loaded = load_model(path)
    assert loaded.format == "torch-original"
    assert loaded.card.encoder == "resnet18"  # inferred from the block layout
    assert loaded.sha256 == sha256_file(path)
    assert _same_weights(loaded.network, network)
    keys = set(network.state_dict())
    assert {k.split(".")[0] for k in keys} == {"base", "sem_head", "ter_head"}


def test_our_format_keeps_the_card(tmp_path: Path, network: torch.nn.Module) -> None:
    card = ModelCard(name="ours", encoder="resnet18", mpp=0.5, tile_size=512)
    loaded = load_model(save_checkpoint(network, card, tmp_path / "ours.pt", epoch=3))
    assert loaded.card == card and loaded.format == "torch+card"
    assert _same_weights(loaded.network, network)


def test_safetensors_fp16_release(tmp_path: Path, network: torch.nn.Module) -> None:
    card = ModelCard(name="release", encoder="resnet18")
    path = save_safetensors(network, card, tmp_path / "m.safetensors")
    loaded = load_model(path, expected_sha256=sha256_file(path))
    assert loaded.card == card
    assert _same_weights(loaded.network, network, atol=1e-2)
    assert path.stat().st_size < 30 * 1024**2


def test_recipe_validation_round_trips_with_its_extra_figures(tmp_path: Path, network: torch.nn.Module) -> None:
    held_out = {**TEST_RECIPE_VALIDATION, "mpq": 0.444}  # a figure the card's model does not name is kept
    card = ModelCard.model_validate({"name": "release", "recipe_validation": held_out})
    loaded = load_model(save_safetensors(network, card, tmp_path / "m.safetensors"))
    rv = loaded.card.recipe_validation
    assert rv is not None and rv.classes["macrophage"].det_f1_ci == (0.0, 0.296)
    assert loaded.card.public()["recipe_validation"] == json.loads(json.dumps(held_out))


def test_an_invalid_card_is_a_checkpoint_error_naming_the_field(tmp_path: Path, network: torch.nn.Module) -> None:
    path = save_checkpoint(network, ModelCard(name="ok"), tmp_path / "bad.pt")
    blob = torch.load(path, weights_only=True)
    bad = {"macrophage": {"gt_cells": "many"}}
    blob["model_card"]["recipe_validation"] = {**TEST_RECIPE_VALIDATION, "classes": bad}
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"invalid model card: recipe_validation\.classes\.macrophage"):
        load_model(path)


def test_sha256_mismatch_is_refused(tmp_path: Path, network: torch.nn.Module) -> None:
    path = save_checkpoint(network, None, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="expected 0000"):
        load_model(path, expected_sha256="0" * 64)


def test_missing_keys_and_wrong_shapes_are_named(tmp_path: Path, network: torch.nn.Module) -> None:
    state = dict(network.state_dict())
    del state["sem_head.0.bias"]
    state["ter_head.0.weight"] = torch.zeros(4, 16, 3, 3)
    path = tmp_path / "broken.pt"
    torch.save({"model_state": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "sem_head.0.bias" in message and "ter_head.0.weight" in message and "(4, 16, 3, 3)" in message


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_pickled_objects_are_refused_with_a_reason(tmp_path: Path, network: torch.nn.Module) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model_state": network.state_dict(), "extra": _Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(path)


@pytest.mark.parametrize(("content", "match"), [(b"", "not a readable torch file"),
                                                 (pickle.dumps([1, 2]), "weights_only")])
def test_garbage_files_fail_clearly(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_torch_file_without_model_state(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"no 'model_state' entry .*state_dict"):
        load_model(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_infer_encoder_resnet34() -> None:
    state = build_network("resnet34").state_dict()
    assert infer_encoder(state) == "resnet34"
