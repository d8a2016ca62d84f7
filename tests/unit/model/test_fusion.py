"""The inference rewrites of the folded network keep its logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import fusion
from model.device import fold_batchnorm
from model.fusion import OneDnnConv, fuse_for_inference
from model.network import build_network

CPU = torch.device("cpu")


def _folded(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    network = build_network("resnet18").eval()
    for m in network.modules():  # BatchNorm statistics away from identity, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return fold_batchnorm(network)


def _logits(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        sem, ter = network(x.contiguous(memory_format=torch.channels_last))
    return torch.cat((sem, ter), 1).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_network_gives_the_folded_networks_logits(dtype: torch.dtype) -> None:
    if not fusion._onednn_runs(dtype):
        pytest.skip(f"oneDNN runs no {dtype} convolution on this CPU (the next test covers it)")
    reference = _folded(0).to(CPU, dtype).to(memory_format=torch.channels_last)
    fused = fuse_for_inference(_folded(0), CPU, dtype).to(CPU, dtype).to(memory_format=torch.channels_last)
    convs = [m for m in fused.modules() if isinstance(m, OneDnnConv)]
    assert not any(isinstance(m, nn.Conv2d) for m in fused.modules())
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in reference.modules()) - 1  # two heads, one conv
    assert sum(c.post_op == "relu" for c in convs) == 19  # every conv -> ReLU of resnet18 and the decoder
    x = torch.randn(2, 3, 64, 96).to(dtype)
    expected, got = _logits(reference, x), _logits(fused, x)
    assert got.shape == expected.shape == (2, 8, 64, 96)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def test_weights_are_reordered_per_input_shape_and_again_after_a_cast() -> None:
    reference = _folded(1).to(memory_format=torch.channels_last)
    fused = fuse_for_inference(_folded(1), CPU, torch.float32).to(memory_format=torch.channels_last)
    first = next(m for m in fused.modules() if isinstance(m, OneDnnConv))
    sides = [32, 64, 96, 64]
    for side in sides:
        x = torch.randn(1, 3, side, side)
        torch.testing.assert_close(_logits(fused, x), _logits(reference, x), atol=1e-4, rtol=1e-4)
    assert len(first._packed) == OneDnnConv.SHAPES
    assert torch.Size((1, 3, 64, 64)) in first._packed  # the oldest shape was dropped, not the others
    assert torch.Size((1, 3, 32, 32)) not in first._packed
    dtype = torch.bfloat16 if fusion._onednn_runs(torch.bfloat16) else torch.float32  # a cast, or a move
    fused.to(CPU, dtype)
    assert first._packed == {}
    x = torch.randn(1, 3, 64, 64).to(dtype)
    expected = _logits(reference.to(dtype), x)
    torch.testing.assert_close(_logits(fused, x), expected, atol=2e-2, rtol=2e-2)
    assert len(first._packed) == 1


def test_networks_that_are_not_traced_graphs_are_left_alone() -> None:
    network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    assert fuse_for_inference(network, CPU, torch.float32) is network
    assert isinstance(network[0], nn.Conv2d)


def test_a_dtype_onednn_cannot_run_keeps_pytorchs_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where oneDNN has no bf16 (CPUs with AVX2 only), PyTorch's own convolution still runs it."""
    assert not fusion._onednn_runs(torch.float16)
    monkeypatch.setattr(fusion, "_onednn_runs", lambda dtype: dtype == torch.float32)
    fused = fuse_for_inference(_folded(2), CPU, torch.bfloat16).to(torch.bfloat16)
    assert not any(isinstance(m, OneDnnConv) for m in fused.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 31  # the heads merged all the same
    reference = _folded(2).to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).to(torch.bfloat16)
    torch.testing.assert_close(_logits(fused.to(memory_format=torch.channels_last), x), _logits(reference, x),
                               atol=2e-2, rtol=2e-2)
