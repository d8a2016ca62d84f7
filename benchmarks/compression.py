"""Mask compression: size against time of zlib levels on class maps, as the mask PNGs and TIFFs use it.

Run: ``python -m benchmarks.compression [--side 4096]``

The class maps are ``FreeNet``'s argmax over a rimmed ``SyntheticSlide`` (about 400 nuclei per
Mpx). PNG: one deflate stream over filter-byte-prefixed rows (``PngWriter``); TIFF: each
512² tile deflated on its own (``write_tiff_from_store``). One thread, as the writer threads run.
"""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np
import torch

from benchmarks.common import machine
from benchmarks.postprocess import FreeNet, SyntheticSlide
from model.writers import MASK_TIFF_TILE


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
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 3, 6, 9])
    args = parser.parse_args(argv)
    print(f"# {machine()}")
    print("| map | format | zlib level | KiB | ratio | s | Mpx/s |\n|---|---|---|---|---|---|---|")
    for name, classes in class_maps(args.side).items():
        for fmt, chunks in (("png", png_stream(classes)), ("tiff", tiff_tiles(classes))):
            raw = sum(len(c) for c in chunks)
            for level in args.levels:
                t0 = time.perf_counter()
                size = sum(len(zlib.compress(c, level)) for c in chunks)
                dt = time.perf_counter() - t0
                print(f"| {name} | {fmt} | {level} | {size / 2**10:,.0f} | {raw / size:.0f} | {dt:.2f} | "
                      f"{classes.size / dt / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
