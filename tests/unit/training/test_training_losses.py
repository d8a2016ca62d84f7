"""Losses against values computed by hand, with ignore (-1) handling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import LossConfig, TwoHeadLoss, dice_loss, focal_ce

LN2 = math.log(2)


def logits_of(*pixels: tuple[float, float]) -> torch.Tensor:
    """(1, 2, 1, P) logits from per-pixel (class0, class1) pairs."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 2, 1, len(pixels))


def test_ce_ignores_minus_one() -> None:
    logits = logits_of((0.0, 0.0), (5.0, -5.0))
    target = torch.tensor([[[0, -1]]])
    assert focal_ce(logits, target).item() == pytest.approx(LN2)


def test_weighted_ce_matches_hand_value_and_torch() -> None:
    logits = logits_of((0.0, 0.0), (math.log(3), 0.0), (9.0, 9.0))
    target = torch.tensor([[[0, 1, -1]]])
    # (1 * ln 2 + 3 * ln 4) / (1 + 3) = 7/4 ln 2
    value = focal_ce(logits, target, (1.0, 3.0)).item()
    assert value == pytest.approx(7 / 4 * LN2)
    ref = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 3.0]), ignore_index=-1)
    assert value == pytest.approx(ref.item())


def test_focal_gamma_two() -> None:
    logits = logits_of((0.0, 0.0), (math.log(3), 0.0))
    target = torch.tensor([[[0, 1]]])
    # pixel 1: p=1/2 -> (1/2)^2 ln 2 ; pixel 2: p=1/4 -> (3/4)^2 ln 4
    expected = (0.25 * LN2 + 0.5625 * 2 * LN2) / 2
    assert focal_ce(logits, target, gamma=2.0).item() == pytest.approx(expected)


def test_dice_hand_value_with_ignore_and_weights() -> None:
    logits = logits_of((0.0, 0.0), (7.0, -3.0))
    target = torch.tensor([[[0, -1]]])
    # valid pixel: p = (.5, .5), y = (1, 0); d0 = (1 + 1) / (1.5 + 1) = 0.8, d1 = 1 / 1.5
    assert dice_loss(logits, target).item() == pytest.approx(1 - (0.8 + 2 / 3) / 2)
    assert dice_loss(logits, target, (1.0, 3.0)).item() == pytest.approx(1 - (0.8 + 3 * 2 / 3) / 4)


def test_all_ignored_is_zero_and_differentiable() -> None:
    logits = logits_of((1.0, 2.0), (3.0, 4.0)).requires_grad_()
    target = torch.full((1, 1, 2), -1)
    loss = focal_ce(logits, target, gamma=2.0) + dice_loss(logits, target)
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    assert logits.grad is not None


def test_total_is_weighted_sum() -> None:
    sem = logits_of((0.0, 0.0), (math.log(3), 0.0))
    ter = logits_of((0.0, 0.0), (0.0, 0.0))
    sem_t, ter_t = torch.tensor([[[0, 1]]]), torch.tensor([[[1, -1]]])
    loss_fn = TwoHeadLoss(LossConfig(sem_weight=0.3, gamma=2.0))
    total, parts = loss_fn(sem, ter, sem_t, ter_t)
    sem_expected = focal_ce(sem, sem_t) + dice_loss(sem, sem_t)
    ter_expected = 0.25 * LN2 + dice_loss(ter, ter_t)
    assert parts["sem"] == pytest.approx(sem_expected.item())
    assert parts["ter"] == pytest.approx(ter_expected.item())
    assert total.item() == pytest.approx(0.3 * sem_expected.item() + ter_expected.item())


def test_bad_inputs_name_the_value() -> None:
    logits = logits_of((0.0, 0.0))
    with pytest.raises(ValueError, match=r"\[2\]"):
        focal_ce(logits, torch.tensor([[[2]]]))
    with pytest.raises(ValueError, match=r"0\.5"):
        dice_loss(logits, torch.tensor([[[0]]]), (0.5,))
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 1\)"):
        dice_loss(logits, torch.tensor([[0]]))
