"""Warm-start a deeper ResNet encoder from a shallower one (resnet18 → resnet34).

Every tensor whose name and shape the two networks share is copied (stem, the first blocks of each
stage, decoder, heads). The deeper network's extra residual blocks keep their fresh initialisation
but start as identities: their last BatchNorm's scale and shift are zero, so the block adds nothing
to its (non-negative, post-ReLU) input. The deepened network therefore computes what the shallow one
did, and training only has to learn what the extra depth adds.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_BLOCK = re.compile(r"^(base\.encoder\.layer\d+\.\d+)\.")


def deepen(target: nn.Module, source: dict[str, torch.Tensor]) -> list[str]:
    """Load ``source`` into ``target`` as above; returns the residual blocks that start as identities.

    Raises ``ValueError`` if a tensor of the target outside the extra blocks is missing from
    ``source`` or has another shape (the two networks must differ only in blocks per stage).
    """
    state = target.state_dict()
    extra = sorted({m.group(1) for key in state if (m := _BLOCK.match(key)) and not _in_source(m.group(1), source)})
    for key, value in state.items():
        block = _BLOCK.match(key)
        if block and block.group(1) in extra:
            if key.endswith(("bn2.weight", "bn2.bias")):
                value.zero_()
            continue
        if key not in source or source[key].shape != value.shape:
            raise ValueError(f"cannot deepen: {key!r} is missing from the source or has another shape")
        value.copy_(source[key])
    return extra


def _in_source(block: str, source: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(block + ".") for key in source)
