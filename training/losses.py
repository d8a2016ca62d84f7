"""Losses of the two heads, all ignoring label ``-1``.

- semantic: ``CE(weights) + Dice(weights)``;
- ternary: ``focal CE(gamma, weights) + Dice(weights)``;
- total: ``sem_weight * semantic + ternary``.

Partial labels (``training.data.sample.PARTIAL_LABELS``, for example CoNSeP's "inflammatory" =
one of lymphocyte, neutrophil, macrophage) add ``f * mean_P(-log sum_{c in set} p_c)`` to the
semantic loss, where ``f`` is their share of the labelled pixels; CE and Dice treat them as ignored.

Definitions (so tests can compute them by hand), over valid pixels ``V`` (target != -1):

- ``CE = sum_V w[t] * -log p_t / sum_V w[t]`` (PyTorch's weighted mean).
- ``focal = sum_V w[t] * (1 - p_t)**gamma * -log p_t / sum_V w[t]``.
- ``Dice = 1 - sum_c w[c] * d_c / sum_c w[c]`` with
  ``d_c = (2 * sum_V p_c * y_c + eps) / (sum_V p_c + sum_V y_c + eps)``, ``eps = 1``.

A batch without any valid pixel gives 0 (with a gradient path, so ``backward`` still works).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.data.sample import PARTIAL_LABELS

IGNORE = -1


def _weights(values: Sequence[float] | None, n: int, like: torch.Tensor, what: str) -> torch.Tensor:
    if values is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    if len(values) != n or any(v < 0 for v in values):
        raise ValueError(f"{what} class weights must be {n} non-negative numbers, got {list(values)}")
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


def _valid(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits (N, C, H, W) and target (N, H, W) expected, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    n = logits.shape[1]
    bad = (target < IGNORE) | (target >= n)
    if bad.any():
        got = sorted(target[bad].unique().tolist())
        raise ValueError(f"target values must be -1 or in [0, {n}), got {got}")
    valid = target != IGNORE
    return valid, target.clamp(min=0)


def partial_ce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over partial-label pixels of -log sum_{c in set} p_c, their count)``."""
    logp = F.log_softmax(logits.float(), 1)
    total = (logits * 0).sum()
    count = torch.zeros((), device=logits.device)
    for value, classes in PARTIAL_LABELS.items():
        where = target == value
        if where.any():
            in_set = torch.logsumexp(logp[:, list(classes)], dim=1)
            total = total - in_set[where].sum()
            count = count + where.sum()
    return total, count


def semantic_loss(logits: torch.Tensor, target: torch.Tensor,
                  weights: Sequence[float] | None) -> torch.Tensor:
    """``CE + Dice`` on full labels, plus the partial-label term weighted by its pixel share."""
    partial = torch.zeros_like(target, dtype=torch.bool)
    for value in PARTIAL_LABELS:
        partial |= target == value
    full = torch.where(partial, torch.full_like(target, IGNORE), target)
    loss = focal_ce(logits, full, weights) + dice_loss(logits, full, weights)
    if partial.any():
        total, count = partial_ce(logits, target)
        labelled = (full != IGNORE).sum() + count
        loss = loss + (count / labelled) * total / count
    return loss


def dice_loss(logits: torch.Tensor, target: torch.Tensor, weights: Sequence[float] | None = None,
              eps: float = 1.0) -> torch.Tensor:
    """Weighted soft Dice loss over classes, on valid pixels only."""
    valid, safe = _valid(logits, target)
    n = logits.shape[1]
    w = _weights(weights, n, logits, "dice")
    probs = logits.float().softmax(1) * valid.unsqueeze(1)
    onehot = F.one_hot(safe, n).permute(0, 3, 1, 2).to(probs.dtype) * valid.unsqueeze(1)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - (w * dice).sum() / w.sum()


def focal_ce(logits: torch.Tensor, target: torch.Tensor, weights: Sequence[float] | None = None,
             gamma: float = 0.0) -> torch.Tensor:
    """Weighted (focal when ``gamma > 0``) cross-entropy, normalised by the sum of pixel weights."""
    valid, safe = _valid(logits, target)
    w = _weights(weights, logits.shape[1], logits, "CE")
    logp = F.log_softmax(logits.float(), 1).gather(1, safe.unsqueeze(1)).squeeze(1)
    pix_w = w[safe] * valid
    loss = -logp
    if gamma > 0:
        loss = loss * (1 - logp.exp()).pow(gamma)
    total = pix_w.sum()
    if total <= 0:
        return (logits * 0).sum()
    return (pix_w * loss).sum() / total


@dataclass(frozen=True)
class LossConfig:
    """Loss weights; class weight lists may be ``None`` (all ones)."""

    sem_weight: float = 0.3
    sem_class_weights: tuple[float, ...] | None = None
    ter_class_weights: tuple[float, ...] | None = None
    gamma: float = 2.0


class TwoHeadLoss(nn.Module):
    """``sem_weight * (CE + Dice) + (focal + Dice)``; ``forward`` returns (total, parts)."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, sem_logits: torch.Tensor, ter_logits: torch.Tensor, sem_target: torch.Tensor,
                ter_target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        sem = semantic_loss(sem_logits, sem_target, c.sem_class_weights)
        ter = focal_ce(ter_logits, ter_target, c.ter_class_weights, c.gamma) + dice_loss(
            ter_logits, ter_target, c.ter_class_weights)
        total = c.sem_weight * sem + ter
        return total, {"loss": float(total.detach()), "sem": float(sem.detach()), "ter": float(ter.detach())}
