"""Deepening resnet18 into resnet34: the shared tensors copied, the extra blocks identities."""

from __future__ import annotations

import pytest
import torch

from model.network import TwoHeadUnet
from training.deepen import deepen


def _trained_like(net: TwoHeadUnet) -> TwoHeadUnet:
    """Non-trivial BatchNorm statistics, as a trained network has."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return net.eval()


def test_deepened_network_computes_what_the_shallow_one_did() -> None:
    shallow = _trained_like(TwoHeadUnet("resnet18"))
    deep = TwoHeadUnet("resnet34")
    extra = deepen(deep, shallow.state_dict())
    # resnet34 has (3, 4, 6, 3) blocks a stage against (2, 2, 2, 2): 1 + 2 + 4 + 1 extra
    assert len(extra) == 8 and "base.encoder.layer3.5" in extra and "base.encoder.layer1.1" not in extra
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(shallow(x), deep.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert float(deep.state_dict()["base.encoder.layer3.5.bn2.weight"].abs().sum()) == 0.0
    assert float(deep.state_dict()["base.encoder.layer3.5.conv1.weight"].abs().sum()) > 0.0


def test_deepen_refuses_networks_that_differ_elsewhere() -> None:
    source = TwoHeadUnet("resnet18").state_dict()
    source["sem_head.0.weight"] = torch.zeros(7, 16, 3, 3)
    with pytest.raises(ValueError, match="sem_head.0.weight"):
        deepen(TwoHeadUnet("resnet34"), source)
