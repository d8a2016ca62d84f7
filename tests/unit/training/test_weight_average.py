"""The exponential weight average: its warm-up, its buffers and its round trip through a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from training.average import WeightAverage


def small_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_update_follows_the_network_with_the_warm_up_decay() -> None:
    net = small_network()
    average = WeightAverage(net, decay=0.5)
    start = {k: v.clone() for k, v in average.network.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net(torch.rand(2, 3, 8, 8))  # training mode: BatchNorm's running stats and batch counter move
    assert average.factor() == 0.1
    average.update(net)
    now, target = average.network.state_dict(), net.state_dict()
    for key, value in now.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.1 * start[key] + 0.9 * target[key])
        else:
            assert torch.equal(value, target[key]), key
    assert average.updates == 1 and average.network[0].weight.requires_grad is False


def test_decay_reached_after_warm_up_and_average_converges() -> None:
    net = small_network()
    average = WeightAverage(net, decay=0.5)
    for _ in range(8):
        average.update(net)
    assert average.factor() == 0.5
    with torch.no_grad():
        net[0].weight.fill_(2.0)
    for _ in range(30):
        average.update(net)
    torch.testing.assert_close(average.network[0].weight, torch.full_like(net[0].weight, 2.0))


def test_state_round_trip() -> None:
    net = small_network()
    average = WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net[0].bias.add_(3.0)
    average.update(net)
    again = WeightAverage(small_network(), decay=0.9)
    assert not again.restore({})
    assert again.restore(average.state())
    assert again.updates == 1
    torch.testing.assert_close(again.network[0].bias, average.network[0].bias)
