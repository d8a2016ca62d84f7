"""Mask compression: size against time of deflate encoders and levels on class maps, as the mask PNGs
and TIFFs use them: Python's zlib and ISA-L's (``isal_zlib``, what the writers use).

Run: ``python -m benchmarks.compression [--side 4096]``

The class maps are ``FreeNet``'s argmax over a rimmed ``SyntheticSlide`` (about 400 nuclei per
Mpx). PNG: one deflate stream over filter-byte-prefixed rows (``PngWriter``); TIFF: each
512² tile deflated on its own (``write_tiff_from_store``). One thread, as the writer threads run.
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Callable

import numpy as np
import torch
from isal import isal_zlib

from benchmarks.common import machine
from benchmarks.postprocess import FreeNet, SyntheticSlide
from model.writers import MASK_TIFF_TILE

ENCODERS: dict[str, Callable[[bytes, int], bytes]] = {"zlib": zlib.compress, "isal": isal_zlib.compress}


def class_maps(side: int) -> dict[str, np.ndarray]:
    image = SyntheticSlide(side, rims=True).read_region(0, 0, 0, side, side)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        sem, ter = FreeNet()(x)
    return {"semantic": sem[0].argmax(0).to(torch.uint8).numpy(), "ternary": ter[0].argmax(0).to(torch.uint8).numpy()}


def png_stream(classes: np.ndarray) -> list[bytes]:
    rows = np.zeros((classes.shape[0], classes.shape[1] + 1), np.uint8)
    rows[:, 1:] = classes
    return [rows.tobytes()]


def tiff_tiles(classes: np.ndarray, tile: int = MASK_TIFF_TILE) -> list[bytes]:
    h, w = classes.shape
    return [np.ascontiguousarray(classes[y : y + tile, x : x + tile]).tobytes()
            for y in range(0, h, tile) for x in range(0, w, tile)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 3, 6, 9], help="zlib levels")
    parser.add_argument("--isal-levels", type=int, nargs="*", default=[0, 1, 2, 3], help="ISA-L levels (0-3)")
    parser.add_argument("--repeat", type=int, default=3, help="the best of this many timings")
    args = parser.parse_args(argv)
    print(f"# {machine()}")
    print("| map | format | encoder | level | KiB | ratio | s | Mpx/s |\n|---|---|---|---|---|---|---|---|")
    for name, classes in class_maps(args.side).items():
        for fmt, chunks in (("png", png_stream(classes)), ("tiff", tiff_tiles(classes))):
            raw = sum(len(c) for c in chunks)
            for encoder, levels in (("zlib", args.levels), ("isal", args.isal_levels)):
                for level in levels:
                    size, dt = _timed(ENCODERS[encoder], chunks, level, args.repeat)
                    print(f"| {name} | {fmt} | {encoder} | {level} | {size / 2**10:,.0f} | {raw / size:.0f} | "
                          f"{dt:.3f} | {classes.size / dt / 1e6:.0f} |")
    return 0


def _timed(encode: Callable[[bytes, int], bytes], chunks: list[bytes], level: int, repeat: int) -> tuple[int, float]:
    """Compressed bytes of ``chunks`` and the best of ``repeat`` timings."""
    best, size = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        size = sum(len(encode(c, level)) for c in chunks)
        best = min(best, time.perf_counter() - t0)
    return size, best


if __name__ == "__main__":
    raise SystemExit(main())
