"""The prepared (BatchNorm-folded, channels_last) inference network is reused, and rebuilt when weights change."""

from __future__ import annotations

import torch

from model.device import inference_network
from model.network import build_network


def test_prepared_network_is_reused_until_a_weight_changes() -> None:
    torch.manual_seed(0)
    network = build_network("resnet18").eval()
    cpu = torch.device("cpu")
    x = torch.rand(1, 3, 64, 64)
    first = inference_network(network, cpu)
    assert inference_network(network, cpu) is first  # no second fold for the next job
    with torch.inference_mode():
        before = first(x)[0]
        assert torch.allclose(before, network(x)[0], atol=1e-4)  # folding keeps the maths
    with torch.no_grad():
        network.sem_head[0].weight.mul_(2.0)  # an in-place update, as an optimiser step would make
    second = inference_network(network, cpu)
    assert second is not first
    with torch.inference_mode():
        assert torch.allclose(second(x)[0], network(x)[0], atol=1e-4)
        assert not torch.allclose(second(x)[0], before)
