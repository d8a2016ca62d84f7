"""The prepared (BatchNorm-folded, channels_last) inference network is reused, and rebuilt when weights change."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from model.card import ModelCard
from model.checkpoint import LoadedModel
from model.device import TileRunner, cpu_has_bf16, emulation_warning, fold_batchnorm, inference_network, torch_threads
from model.engine import Engine, EngineOptions
from model.network import build_network
from model.options import DEVICE_BATCH, DEVICE_CACHE_MB
from model.readers import ArrayReader


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


def test_preparing_a_network_without_batchnorm_leaves_it_and_other_dtypes_alone() -> None:
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)).eval()  # nothing to fold: no traced copy
    cpu = torch.device("cpu")
    half = inference_network(network, cpu, torch.bfloat16)
    full = inference_network(network, cpu, torch.float32)
    assert half is not network and full is not network
    assert inference_network(network, cpu, torch.bfloat16) is half
    assert next(half.parameters()).dtype == torch.bfloat16
    assert next(full.parameters()).dtype == next(network.parameters()).dtype == torch.float32


def test_tta_is_the_mean_over_the_four_flips() -> None:
    torch.manual_seed(1)
    network, card, cpu = build_network("resnet18").eval(), ModelCard(), torch.device("cpu")
    tiles = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    plain = TileRunner(network, card, cpu, "fp32", batch=4)
    flips = [tiles, tiles[:, :, ::-1], tiles[:, ::-1], tiles[:, ::-1, ::-1]]  # (N, H, W, 3): W, H, both
    unflip = [(), (3,), (2,), (2, 3)]
    expected = sum(torch.flip(plain(np.ascontiguousarray(t)), d) for t, d in zip(flips, unflip, strict=True)) / 4
    tta = TileRunner(network, card, cpu, "fp32", batch=4, tta=True)(tiles)
    assert tta.shape == (3, 8, 64, 64)
    torch.testing.assert_close(tta, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tta, plain(tiles), atol=1e-3)  # the network is not flip-invariant


def test_bf16_runs_the_arithmetic_of_autocast_with_weights_cast_once() -> None:
    torch.manual_seed(3)
    network, card, cpu = build_network("resnet18").eval(), ModelCard(), torch.device("cpu")
    tiles = np.random.default_rng(4).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    runner = TileRunner(network, card, cpu, "bf16", batch=2)
    assert next(runner.network.parameters()).dtype == torch.bfloat16
    fp32 = TileRunner(network, card, cpu, "fp32", batch=2)
    scale, shift = fp32._scale.view(1, 3, 1, 1), fp32._shift.view(1, 3, 1, 1)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() * scale + shift
    folded = fold_batchnorm(network).to(memory_format=torch.channels_last)  # autocast casts nn.Conv2d only
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        sem, ter = folded(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(runner(tiles), torch.cat((sem, ter), 1).float(), atol=0, rtol=0)
    assert not torch.equal(runner(tiles), fp32(tiles))


def test_torch_threads_is_per_thread_and_restored() -> None:
    """The engine blends on one thread while another engine thread may be running its network."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    inside = threading.Event()
    release = threading.Event()

    def blender() -> None:
        with torch_threads(1):
            seen.append(torch.get_num_threads())
            inside.set()
            release.wait(30)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=blender)
    thread.start()
    assert inside.wait(30)
    seen.append(torch.get_num_threads())  # this thread, while the other runs on one
    release.set()
    thread.join(30)
    torch.set_num_threads(before)
    assert seen == [1, 2, 2]


def test_batch_size_defaults_to_the_devices_and_stats_say_what_ran() -> None:
    network = build_network("resnet18").eval()
    model = LoadedModel(network, ModelCard(name="t", encoder="resnet18"), Path("t"), "0" * 64, "test")
    default = Engine(model, EngineOptions(device="cpu", precision="fp32"))
    assert default.batch_size == default.runner.batch == default.options.batch_size == DEVICE_BATCH["cpu"]
    assert Engine(model, EngineOptions(device="cpu", precision="fp32", batch_size=3)).runner.batch == 3
    assert default.options.tile_cache_mb == DEVICE_CACHE_MB["cpu"]  # what ran, as the stats say
    assert Engine(model, EngineOptions(device="cpu", precision="fp32", tile_cache_mb=0)).options.tile_cache_mb == 0
    assert EngineOptions().for_device("cuda:1").tile_cache_mb == DEVICE_CACHE_MB["cuda"]


def test_emulated_bf16_is_warned_of_only_on_a_cpu_without_it() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    warning = emulation_warning("bf16", cpu, native_bf16=False)
    assert warning is not None and "emulated" in warning and "fp32" in warning
    assert emulation_warning("bf16", cpu, native_bf16=True) is None
    assert emulation_warning("bf16", cuda, native_bf16=False) is None
    assert emulation_warning("fp32", cpu, native_bf16=False) is None


def test_a_run_in_emulated_bf16_says_so_in_its_warnings() -> None:
    network = build_network("resnet18").eval()
    model = LoadedModel(network, ModelCard(name="t", encoder="resnet18"), Path("t"), "0" * 64, "test")
    reader = ArrayReader(np.full((64, 64, 3), 200, np.uint8), mpp=0.25)
    for precision in ("fp32", "bf16"):
        engine = Engine(model, EngineOptions(device="cpu", precision=precision, tile_size=64, overlap=0, tissue=False))
        warned = any("emulated" in w for w in engine.run(reader, []).warnings)
        assert warned == (precision == "bf16" and not cpu_has_bf16())
