"""Test helpers: trivial networks with known outputs, and loaded-model wrappers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from model.card import ModelCard, Normalisation
from model.checkpoint import LoadedModel

RAW = Normalisation(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # network sees rgb / 255


class TrivialNet(nn.Module):
    """``fn`` maps the (N, 3, T, T) input to 3 channels; semantic = [y, y[:, :2]], ternary = y."""

    output_stride = 32
    encoder_name = "trivial"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fn(x)
        return torch.cat((y, y[:, :2]), dim=1), y


def loaded(network: nn.Module, *, mpp: float = 0.25, normalisation: Normalisation = RAW,
           encoder: str = "trivial") -> LoadedModel:
    """Wrap a network as the engine expects a loaded checkpoint."""
    card = ModelCard(name="stub", encoder=encoder, mpp=mpp, normalisation=normalisation)
    return LoadedModel(network=network, card=card, path=Path("stub"), sha256="0" * 64,  # type: ignore[arg-type]
                       format="test")
