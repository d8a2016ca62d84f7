"""Host ceiling: the whole pipeline with a network that costs (almost) nothing.

Run: ``python -m benchmarks.pipeline --network free --side 8192``

A generated slide of ``side x side`` analysis pixels (``benchmarks.postprocess.SyntheticSlide``:
H&E-like colours, about 440 nuclei per Mpx, some touching) goes through the real pipeline
(``predict_reader``) with all outputs (masks, overlays, nuclei, stats). With ``--network free`` the
network is ``ColourNet`` alone (maps from the colour of the input, a few elementwise torch ops per
tile), so the run measures everything the host does around the network: reading, blending, argmax,
mask files, overlays, nuclei. No device is fast enough to make the engine beat this number.

The last line reads ``host ceiling: X Mpx/s`` (analysis pixels over the job's wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.common import machine, mb
from benchmarks.postprocess import run_case
from model.options import OUTPUT_GROUPS

NETWORKS = {"free": None, "resnet18": "resnet18"}  # resnet18: ColourNet that also runs a U-Net for its cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="free")
    parser.add_argument("--side", type=int, default=8192, help="generated slide side, analysis pixels")
    parser.add_argument("--outputs", default=",".join(OUTPUT_GROUPS))
    parser.add_argument("--cache-mb", type=int, default=512, help="EngineOptions.tile_cache_mb")
    args = parser.parse_args(argv)
    row = run_case("synthetic", args.side, NETWORKS[args.network], frozenset(args.outputs.split(",")),
                   args.cache_mb)
    print(json.dumps(row), flush=True)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in row["engine_timings_s"].items())
    mpx = args.side * args.side / 1e6
    print(f"# {machine()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"host ceiling: {mpx / row['total_s']:.2f} Mpx/s ({mpx:.1f} Mpx in {row['total_s']:.1f} s; "
          f"{row['nuclei']:,} nuclei, {row['us_per_nucleus']:.0f} µs/nucleus post-processing; stages s: "
          f"{stages}; peak RSS {mb(row['peak_rss'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
