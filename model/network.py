"""The two-head U-Net.

Module names (``base``, ``sem_head``, ``ter_head``) match the original project's checkpoints, so
their ``model_state`` loads with ``strict=True``. ``base`` is a plain ``smp.Unet`` whose own
``segmentation_head`` (1 class) is kept only for that reason and never run.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import SegmentationHead
from torch import nn

# The class lists live in the contract module; training imports them from here too.
from model.options import DEFAULT_ENCODER, SEMANTIC_CLASSES, TERNARY_CLASSES

__all__ = ["DECODER_CHANNELS", "SEMANTIC_CLASSES", "TERNARY_CLASSES", "TwoHeadUnet", "build_network"]

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class TwoHeadUnet(nn.Module):
    """U-Net with a semantic head (5 classes) and a ternary head (3 classes) on one decoder."""

    def __init__(
        self,
        encoder_name: str = DEFAULT_ENCODER,
        n_semantic: int = len(SEMANTIC_CLASSES),
        n_ternary: int = len(TERNARY_CLASSES),
    ) -> None:
        super().__init__()
        self.encoder_name = encoder_name
        # encoder_weights=None: weights only ever come from our own checkpoints, never a hub.
        self.base = smp.Unet(
            encoder_name,
            encoder_weights=None,
            classes=1,
            decoder_channels=DECODER_CHANNELS,
        )
        width = DECODER_CHANNELS[-1]
        self.sem_head = SegmentationHead(width, n_semantic, kernel_size=3)
        self.ter_head = SegmentationHead(width, n_ternary, kernel_size=3)

    @property
    def output_stride(self) -> int:
        """Input sides must be multiples of this (the encoder's total downsampling)."""
        return 32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(semantic_logits, ternary_logits)`` for a batch ``(N, 3, H, W)``."""
        features = self.base.encoder(x)
        decoded = self.base.decoder(features)
        return self.sem_head(decoded), self.ter_head(decoded)


def build_network(encoder_name: str = DEFAULT_ENCODER) -> TwoHeadUnet:
    """Build an untrained network; never downloads weights."""
    return TwoHeadUnet(encoder_name)
