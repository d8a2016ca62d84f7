"""Exponential moving average of the network's weights (``train.ema``), written as ``ema.pt``.

An average over the later part of the trajectory sits in a flatter region of the loss than the
last iterate, which helps on data unlike the training data (Izmailov et al., UAI 2018; Cha et al.,
"SWAD", NeurIPS 2021). The average is kept beside the trained network and never fed back, so a run
with it follows the same trajectory as one without, and its ``last.pt`` is that run's control.
"""

from __future__ import annotations

import copy
from typing import Any, Generic, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class WeightAverage(Generic[M]):
    """A frozen copy of ``network`` whose floating-point state follows it by an exponential average.

    ``decay`` is reached after a short warm-up, ``min(decay, (1 + n) / (10 + n))`` at update ``n``, so
    the warm-start weights do not linger. Integer buffers (BatchNorm's batch counter) are copied.
    """

    def __init__(self, network: M, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.network: M = copy.deepcopy(network).eval().requires_grad_(False)

    def factor(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """Move the average towards ``network``'s current state."""
        weight = 1.0 - self.factor()
        mine, theirs = self.network.state_dict(), network.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k].detach() for k in floats], weight)
        for key, value in mine.items():
            if not value.is_floating_point():
                value.copy_(theirs[key])
        self.updates += 1

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the average."""
        return {"ema_state": self.network.state_dict(), "ema_updates": self.updates}

    def restore(self, blob: dict[str, Any]) -> bool:
        """Load ``state()`` from a checkpoint; False when the checkpoint has none."""
        if "ema_state" not in blob:
            return False
        self.network.load_state_dict(blob["ema_state"])
        self.updates = int(blob["ema_updates"])
        return True
