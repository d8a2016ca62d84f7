"""Load and save checkpoints, in the original project's format and in ours.

Formats read:

- ``.pt``/``.pth``: ``torch.save`` of a dict with ``model_state`` (the original project's format),
  optionally with ``model_card`` (ours). Loaded with ``weights_only=True``.
- ``.safetensors``: tensors (fp16 or fp32) with the card as JSON in the header metadata
  (``model_card``) or in a sidecar ``<stem>.json``.

Nothing is ever downloaded. Every load records the file's sha256 and can check it against an
expected value.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from model.card import ModelCard
from model.errors import CancelledError, CheckpointError
from model.network import TwoHeadUnet

_RESNET_BLOCKS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference, with where it came from."""

    network: TwoHeadUnet
    card: ModelCard
    path: Path
    sha256: str
    format: str


def sha256_file(path: Path, chunk: int = 4 << 20, should_stop: Callable[[], bool] | None = None) -> str:
    """Hex sha256 of a file, read in chunks; raises ``CancelledError`` once ``should_stop()`` is true."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            if should_stop is not None and should_stop():
                raise CancelledError(f"stopped while hashing {path.name!r}")
    return digest.hexdigest()


def load_model(path: str | Path, *, expected_sha256: str | None = None) -> LoadedModel:
    """Load a checkpoint into a fresh network in eval mode.

    Raises ``CheckpointError`` naming the file and the reason: missing file, sha256 mismatch,
    unsafe pickle content, an invalid model card, missing/unexpected keys or wrong shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise CheckpointError(
            f"checkpoint {str(path)!r} has sha256 {digest}, expected {expected_sha256.lower()}"
        )
    try:
        state, card, fmt = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model card: {where}: {first['msg']}") from exc
    network = TwoHeadUnet(card.encoder)
    _load_state(network, state, path)
    network.eval()
    return LoadedModel(network=network, card=card, path=path, sha256=digest, format=fmt)


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], ModelCard, str]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds pickled Python objects that weights_only=True refuses "
            f"({_first_line(exc)}); re-save it with only tensors and plain types "
            "(python -m training.export converts a trusted file)"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch file: {exc}") from exc
    if not isinstance(blob, dict) or "model_state" not in blob:
        keys = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no 'model_state' entry (found {keys}); "
            "expected the original project's format {'model_state': state_dict, ...}"
        )
    state = blob["model_state"]
    if "model_card" in blob:
        card = ModelCard.model_validate(blob["model_card"])
        return state, card, "torch+card"
    card = ModelCard(name=path.stem, encoder=infer_encoder(state), notes="original-format checkpoint")
    return state, card, "torch-original"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], ModelCard, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {key: fh.get_tensor(key).float() for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {exc}") from exc
    if "model_card" in meta:
        return state, ModelCard.model_validate_json(meta["model_card"]), "safetensors"
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        return state, ModelCard.model_validate_json(sidecar.read_text()), "safetensors"
    raise CheckpointError(
        f"safetensors checkpoint {str(path)!r} has no 'model_card' metadata and no sidecar {sidecar.name!r}"
    )


def infer_encoder(state: dict[str, torch.Tensor]) -> str:
    """Guess the ResNet depth of an original-format state dict from its block counts."""
    counts: list[int] = []
    for layer in range(1, 5):
        pattern = re.compile(rf"^base\.encoder\.layer{layer}\.(\d+)\.")
        ids = {int(m.group(1)) for key in state if (m := pattern.match(key))}
        counts.append(len(ids))
    if any(key.endswith("conv3.weight") for key in state if key.startswith("base.encoder.layer")):
        deep = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
        return deep.get((counts[0], counts[1], counts[2], counts[3]), "resnet50")
    return _RESNET_BLOCKS.get((counts[0], counts[1], counts[2], counts[3]), "resnet34")


def _load_state(network: TwoHeadUnet, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{key}: file {tuple(state[key].shape)} vs network {tuple(expected[key].shape)}"
        for key in set(state) & set(expected)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit TwoHeadUnet({network.encoder_name!r}): "
            f"missing keys {_few(missing)}; unexpected keys {_few(unexpected)}; wrong shapes {_few(wrong)}"
        )
    network.load_state_dict(state, strict=True)


def save_checkpoint(network: TwoHeadUnet, card: ModelCard | None, path: str | Path, **extra: Any) -> Path:
    """Save ``{'model_state', 'model_card'?, **extra}``; ``card=None`` gives the original format."""
    path = Path(path)
    blob: dict[str, Any] = {"model_state": network.state_dict(), **extra}
    if card is not None:
        blob["model_card"] = card.public()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def save_safetensors(network: TwoHeadUnet, card: ModelCard, path: str | Path, *, fp16: bool = True) -> Path:
    """Write the release format: (fp16) safetensors with the card in the header metadata."""
    path = Path(path)
    dtype = torch.float16 if fp16 else torch.float32
    state = {
        key: (t.to(dtype) if t.is_floating_point() else t).contiguous()
        for key, t in network.state_dict().items()
    }
    save_file(state, str(path), metadata={"model_card": json.dumps(card.public())})
    path.chmod(0o644)  # safetensors creates the file 0600; a release file is meant to be read by all
    return path


def _few(items: list[str], limit: int = 6) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
