"""``train.precision: auto`` trains in what the device runs natively, and the run records it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from model.device import cpu_has_bf16
from training.config import TrainConfig
from training.train import autocast, resolved


def _config(precision: str) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "p", "out_dir": "unused", "data": {"sources": [{"kind": "monuseg", "root": "unused"}]},
        "train": {"precision": precision}, "card": {"name": "p", "licence": "test"}})


def test_auto_is_bf16_where_native_else_fp32() -> None:
    cpu = resolved(_config("auto"), torch.device("cpu")).train.precision
    assert cpu == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolved(_config("auto"), torch.device("cuda")).train.precision == "bf16"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp"])
def test_explicit_precision_is_kept(precision: str) -> None:
    assert resolved(_config(precision), torch.device("cpu")).train.precision == precision


def test_autocast_follows_the_resolved_precision() -> None:
    cpu = torch.device("cpu")
    ctx = autocast(resolved(_config("auto"), cpu), cpu)
    assert isinstance(ctx, torch.autocast) == cpu_has_bf16()
    assert isinstance(autocast(_config("fp32"), torch.device("cpu")), contextlib.nullcontext)

