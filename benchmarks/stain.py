"""What the engine's ``stain`` option costs: one block normalised against the same block read.

Run: ``python -m benchmarks.stain`` (the shipped model's ``stain_reference``; the real CMU sample).

A block of the CMU sample slide (2048 px at level 0, or the whole level when smaller) is read through
OpenSlide, then normalised by each method with the transform fitted on the slide's thumbnail, as the
engine's reader threads do. Each figure is the median of ``--repeats`` runs on one thread; the
ratios are against the read in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

from benchmarks.common import count, machine
from core.settings import DEFAULT_MODEL
from model.checkpoint import load_model
from model.readers import open_slide, thumbnail
from model.stain import fit_stain
from model.tissue import THUMB_SIDE
from tests.helpers.samples import sample

BLOCK = 2048


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint whose card holds the reference")
    parser.add_argument("--repeats", type=count, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    card = load_model(args.model).card
    reader = open_slide(sample("cmu_small_region.svs"))
    w, h = (min(BLOCK, side) for side in reader.level_dimensions[0])
    read = _median_s(lambda: reader.read_region(0, 0, 0, w, h), args.repeats)
    pixels = reader.read_region(0, 0, 0, w, h)
    thumb = thumbnail(reader, THUMB_SIDE)[0]
    print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}; one thread", file=sys.stderr)
    print(f"read {w}x{h} px: {read * 1e3:.0f} ms ({w * h / 1e6 / read:.1f} Mpx/s)")
    for method in ("reinhard", "macenko"):
        transform, warning = fit_stain(method, card.stain_reference, thumb)
        if transform is None:
            print(f"{method}: not fitted ({warning})")
            continue
        seconds = _median_s(partial(transform, pixels), args.repeats)
        print(f"{method}: {seconds * 1e3:.0f} ms ({w * h / 1e6 / seconds:.1f} Mpx/s), {seconds / read:.2f}x the read")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
