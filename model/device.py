"""Device and precision choice, and the batched forward pass of tiles."""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from model.card import ModelCard
from model.errors import OptionsError
from model.fusion import fuse_for_inference
from model.network import TwoHeadUnet

Precision = Literal["auto", "fp32", "bf16"]
log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """True when the CPU advertises native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def emulation_warning(precision: str, device: torch.device, native_bf16: bool | None = None) -> str | None:
    """A warning when bf16 would be emulated: a CPU without AVX512-BF16 or AMX runs it several times
    slower than fp32 (an AVX2 EPYC: a training step 8.6x, the engine 7x). ``native_bf16`` defaults
    to what this CPU advertises."""
    if precision != "bf16" or device.type != "cpu":
        return None
    if native_bf16 if native_bf16 is not None else cpu_has_bf16():
        return None
    return ("precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated, several times slower "
            "than fp32; precision auto picks fp32 here")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionsError("device 'cuda' requested but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise OptionsError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """``auto`` -> bf16 on CUDA and on bf16-capable CPUs, else fp32."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise OptionsError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return precision  # type: ignore[return-value]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU operators of the calling thread run on ``n`` intra-op threads meanwhile.

    The count is per calling thread (OpenMP's own setting; threads that start using torch meanwhile
    take it too). The engine runs its host work on one thread while the nuclei processes, the
    readers and the sinks use the other cores: small operators split over busy cores wait for a
    descheduled helper (measured: host ceiling 4.7 -> 6.2 Mpx/s on 2 cores).
    """
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """An inference copy with BatchNorm folded into the preceding convolutions (same maths, fewer passes).

    Measured here: +23 % throughput for the resnet34 two-head network in bf16 on CPU. Networks that
    torch.fx cannot trace (test stubs) are returned unchanged.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        return network
    try:
        return fuse(network, inplace=False)
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        log.info("BatchNorm folding skipped for %s: %s", type(network).__name__, exc)
        return network


_Prepared = dict[str, tuple[tuple[int, ...], nn.Module]]
_prepared: weakref.WeakKeyDictionary[nn.Module, _Prepared] = weakref.WeakKeyDictionary()
_prepared_lock = threading.Lock()


def inference_network(network: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``network`` folded (and fused: ``model.fusion``), on ``device``, in ``dtype``, channels_last:
    prepared once per network, device, dtype and weights.

    Folding traces the network with torch.fx (0.1-0.8 s for resnet18 on a CPU), so a worker that
    runs many small jobs must not pay it for each one. The copy lives as long as ``network`` and is
    rebuilt when any parameter or buffer changed in place since (training, ``load_state_dict``).
    """
    state = tuple(t._version for t in (*network.parameters(), *network.buffers()))
    with _prepared_lock:
        per_device = _prepared.setdefault(network, {})
        key = f"{device}/{dtype}"
        known = per_device.get(key)
        if known is None or known[0] != state:
            folded = fold_batchnorm(network.eval())
            # a traced copy of our own is rewritten in place; otherwise ``to`` below would convert the
            # caller's network (and so every other dtype's copy) in place: a copy of it is converted
            folded = fuse_for_inference(folded, device, dtype) if folded is not network else copy.deepcopy(network)
            ready = folded.to(device, dtype).to(memory_format=torch.channels_last)
            known = per_device[key] = (state, ready)
        return known[1]


class TileRunner:
    """Runs uint8 tile batches through the network: normalise, channels_last, fp32 or bf16.

    In bf16 the folded network's weights are bf16 (rounded once, as autocast rounds them on every
    call) and so are its inputs: the same logits as autocast, to the bit, without casting the
    weights each batch (2-4 % faster a batch on a CPU with AMX).

    With ``batch``, every forward pass has exactly ``batch`` tiles (a short batch is padded with
    zero tiles): convolution kernels are chosen by shape, and on CPU a tile's logits were measured
    to change with the batch's size (fp32 alone in a batch, bf16 at 512 px in batches of 3 or 5),
    never with its place or companions in a batch of a given size. A fixed shape makes each tile's
    logits independent of which other tiles share its batch, so a slide cut into shards (which
    batch their boundary tiles differently) gives the same pixels as one run.

    With ``tta``, each tile's logits are the mean over the tile and its horizontal, vertical and
    double flips (each flipped back): test-time augmentation at four forward passes a batch.
    """

    def __init__(self, network: TwoHeadUnet, card: ModelCard, device: torch.device, precision: str,
                 *, batch: int | None = None, tta: bool = False) -> None:
        self.device = device
        self.precision = precision
        self.batch = batch
        self.flips: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3)) if tta else ((),)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.network = inference_network(network, device, self.dtype)
        mean = torch.tensor(card.normalisation.mean, device=device)
        std = torch.tensor(card.normalisation.std, device=device)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.exact_dtype = torch.float32  # a dtype holding the last batch's logits exactly (the network's output)

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> torch.Tensor:
        """``(N, T, T, 3)`` uint8 -> ``(N, 8, T, T)`` float32 logits (5 semantic, then 3 ternary), on the device."""
        n = len(tiles)
        if self.batch is not None and n < self.batch:
            tiles = np.concatenate([tiles, np.zeros((self.batch - n, *tiles.shape[1:]), dtype=tiles.dtype)])
        batch = self._normalised(torch.from_numpy(tiles).to(self.device, non_blocking=True)).to(self.dtype)
        batch = batch.contiguous(memory_format=torch.channels_last)
        out = self._forward(batch, n, self.flips[0])
        for dims in self.flips[1:]:
            out += self._forward(batch, n, dims)
        return out / len(self.flips) if len(self.flips) > 1 else out

    def _normalised(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N, T, T, 3)`` uint8 -> ``(N, 3, T, T)`` float32 ``(rgb/255 - mean)/std``, channels_last.

        Per pixel and channel ``shift_c + x * scale_c``, over each tile's bytes as one flat row with
        the three channels' constants repeated along it: broadcasting them over an innermost
        dimension of three made the same operation 3x slower on the CPU."""
        n, h, w, c = tiles.shape
        if h * w not in self._rows:
            self._rows[h * w] = (self._shift.repeat(h * w), self._scale.repeat(h * w))
        shift, scale = self._rows[h * w]
        flat = torch.addcmul(shift, tiles.reshape(n, h * w * c).float(), scale)
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)

    def _forward(self, batch: torch.Tensor, n: int, flip: tuple[int, ...]) -> torch.Tensor:
        """float32 logits of the first ``n`` tiles of ``batch`` flipped along ``flip`` (NCHW
        dimensions), flipped back."""
        if flip:
            batch = torch.flip(batch, flip).contiguous(memory_format=torch.channels_last)
        sem, ter = self.network(batch)
        self.exact_dtype = sem.dtype if len(self.flips) == 1 and sem.dtype == ter.dtype else torch.float32
        out = torch.empty((n, sem.shape[1] + ter.shape[1], *sem.shape[2:]), dtype=torch.float32, device=sem.device)
        out[:, : sem.shape[1]] = sem[:n]  # contiguous NCHW: blending reads it 3x faster than channels_last
        out[:, sem.shape[1] :] = ter[:n]
        return torch.flip(out, flip) if flip else out
