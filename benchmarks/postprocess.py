"""Post-processing benchmark: the share of nuclei post-processing in total job time.

Run: ``python -m benchmarks.postprocess [--sizes 10000 20000] [--write]``

Cases, each in its own child process (so peak RSS is that run's), all through the real pipeline
(``predict_reader``: masks, overlays, nuclei) with default ``EngineOptions`` on the CPU:

- ``cmu``: ``cmu_small_region.svs`` (20x, resampled to 0.25 µm/px) with ``ColourNet`` wrapping a
  random-init resnet18 two-head U-Net: the U-Net runs for its real cost (cheaper than the shipped
  resnet34, so the share is an upper bound), but the maps come from the colour of the input
  (dark = nucleus, an in-tile erosion = inside), so post-processing sees realistic nuclei.
- ``synthetic``: a generated slide of ``size x size`` analysis pixels, rendered lazily per read
  (memory flat in size), with ~7,000 nuclei/mm² (some touching), and ``ColourNet`` without the
  U-Net. Its share is measured with that near-free network and also projected with the per-tile
  forward time measured in ``cmu``.

Post-processing time is ``NucleusSink``'s own (instances, measurements, polygons, GeoJSON). Two
more nuclei-only runs without the engine's tile cache check that peak memory is flat in slide size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import machine, mb, measured
from model.card import ModelCard, Normalisation
from model.checkpoint import LoadedModel
from model.engine import EngineOptions
from model.network import TwoHeadUnet, build_network
from model.options import OUTPUT_GROUPS
from model.pipeline import predict_reader
from model.readers import SlideReader, open_slide

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Post-processing"
RAW = Normalisation(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
CELL = 40  # synthetic slide: one nucleus site per 40 px (10 µm) cell
OCCUPANCY = 0.7
NUCLEUS_RGB = np.array([[110, 70, 150], [60, 40, 110], [100, 60, 170], [120, 90, 150], [130, 85, 135]], np.float32)
STROMA_RGB = np.array([235, 170, 200], np.float32)
RIM_PX = 2.0


class ColourNet(nn.Module):
    """Maps from colour (dark = nucleus); optionally runs ``compute`` too, for its cost only."""

    output_stride = 32

    def __init__(self, compute: nn.Module | None = None) -> None:
        super().__init__()
        self.compute = compute
        self.encoder_name = "colour+" + getattr(compute, "encoder_name", "none")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dark = 1.0 - x.mean(dim=1, keepdim=True)
        fg_logit = (dark - 0.45) * 20.0
        fg = torch.sigmoid(fg_logit)
        core = -F.max_pool2d(-fg, 5, stride=1, padding=2)  # erosion by 2 px
        ter = torch.log(torch.cat((1 - fg, core, (fg - core).clamp_min(0)), dim=1) + 1e-4)
        r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        cells = torch.cat((b - r - 0.15, dark - 0.7, b - g - 0.4, g - 0.33), dim=1) * 20.0
        sem = torch.cat((-fg_logit, fg_logit + cells), dim=1)
        if self.compute is not None:
            sem0, ter0 = self.compute(x)
            sem, ter = sem + 0.0 * sem0, ter + 0.0 * ter0
        return sem, ter


class FreeNet(nn.Module):
    """Per-pixel maps of a rimmed ``SyntheticSlide`` (dark = nucleus, green near 0 = its rim), about
    the cheapest network that still yields real nuclei. Every map is affine in (r, g, b), so the
    forward pass is one ``(8, 3)`` matrix product per batch, taken once from ``maps``."""

    output_stride = 32
    encoder_name = "free"
    matrix: torch.Tensor  # (8, 3)
    offset: torch.Tensor  # (8, 1)

    def __init__(self) -> None:
        super().__init__()
        corners = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                               dtype=torch.float64).T.reshape(1, 3, 4, 1)
        at = torch.cat(self.maps(corners), dim=1)[0, :, :, 0]  # (8, 4): the maps at 0 and at r, g, b = 1
        self.register_buffer("offset", at[:, :1].float())
        self.register_buffer("matrix", (at[:, 1:] - at[:, :1]).float())

    @staticmethod
    def maps(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The semantic and ternary logits of ``(N, 3, H, W)`` RGB in [0, 1], elementwise."""
        r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        dark = 1.0 - (r + g + b) / 3.0
        fg = (dark - 0.45) * 20.0
        rim = (0.1 - g) * 100.0
        ter = torch.cat((-fg, fg, fg + rim), dim=1)
        sem = torch.cat((-fg, fg + (b - r - 0.15) * 20.0, fg + (dark - 0.7) * 20.0, fg + (b - 0.6) * 20.0,
                         fg + (r - 0.45) * 20.0), dim=1)
        return sem, ter

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, 3)  # a view for channels_last input
        out = torch.matmul(self.matrix, pixels.transpose(1, 2)).add_(self.offset).view(n, 8, h, w)
        return out[:, :5], out[:, 5:]


def free_model() -> LoadedModel:
    card = ModelCard(name="free-stub", encoder="none", normalisation=RAW)
    return LoadedModel(cast(TwoHeadUnet, FreeNet()), card, Path("stub"), "0" * 64, "benchmark")


def stub_model(encoder: str | None) -> LoadedModel:
    torch.manual_seed(0)
    compute = build_network(encoder).eval() if encoder else None
    card = ModelCard(name="colour-stub", encoder=encoder or "none", normalisation=RAW)
    return LoadedModel(cast(TwoHeadUnet, ColourNet(compute)), card, Path("stub"), "0" * 64, "benchmark")


def _hash(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) per (a, b) integer pair (splitmix64-style)."""
    z = (a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (b.astype(np.uint64) + np.uint64(salt))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class SyntheticSlide:
    """A generated H&E-like single-level slide at 0.25 µm/px, rendered on demand.

    With ``rims`` each nucleus's outer ``RIM_PX`` pixels have green near 0, so that a per-pixel
    network (``FreeNet``) can tell inside from boundary without looking at neighbours.
    """

    def __init__(self, size: int, *, rims: bool = False) -> None:
        self.name, self.format, self.mpp = f"synthetic-{size}", "synthetic", 0.25
        self.rims = rims
        self.level_dimensions: tuple[tuple[int, int], ...] = ((size, size),)
        self.level_downsamples: tuple[float, ...] = (1.0,)
        self.size = size

    def read_region(self, level: int, l0_x: int, l0_y: int, w: int, h: int) -> np.ndarray:
        ys, xs = np.arange(l0_y, l0_y + h), np.arange(l0_x, l0_x + w)
        cy, cx = ys // CELL, xs // CELL
        cyy, cxx = np.meshgrid(np.unique(cy), np.unique(cx), indexing="ij")
        occupied = _hash(cyy, cxx, 1) < OCCUPANCY
        centre_y = cyy * CELL + CELL / 2 + (_hash(cyy, cxx, 2) - 0.5) * 12
        centre_x = cxx * CELL + CELL / 2 + (_hash(cyy, cxx, 3) - 0.5) * 12
        ry, rx = 10 + 12 * _hash(cyy, cxx, 4), 10 + 12 * _hash(cyy, cxx, 5)
        kind = (_hash(cyy, cxx, 6) * 5).astype(np.int64)
        iy, ix = (cy - cy[0])[:, None], (cx - cx[0])[None, :]
        radius = np.sqrt(((ys[:, None] + 0.5 - centre_y[iy, ix]) / ry[iy, ix]) ** 2
                         + ((xs[None, :] + 0.5 - centre_x[iy, ix]) / rx[iy, ix]) ** 2)
        inside = occupied[iy, ix] & (radius <= 1.0)
        texture = ((ys[:, None] * 7 + xs[None, :] * 13) % 17).astype(np.float32)[..., None] - 8.0
        rgb = np.where(inside[..., None], NUCLEUS_RGB[kind[iy, ix]], STROMA_RGB) + texture
        if self.rims:
            rim = inside & (radius > 1.0 - RIM_PX / np.minimum(rx, ry)[iy, ix])
            rgb[..., 1][rim] = texture[..., 0][rim] + 8.0
        outside = (ys[:, None] >= self.size) | (xs[None, :] >= self.size) | (ys[:, None] < 0) | (xs[None, :] < 0)
        rgb[outside] = 255
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def close(self) -> None:
        return None


def run_case(case: str, size: int, encoder: str | None, outputs: frozenset[str], cache_mb: int | None, *,
             free: bool = False, slide: Path | None = None, **options: Any) -> dict[str, Any]:
    """One pipeline run; its timings, counts and peak RSS. ``free``: a rimmed slide and ``FreeNet``;
    ``slide``: read the synthetic slide from that file (``write_synthetic``) instead of rendering it."""
    reader: SlideReader = (open_slide(slide) if slide is not None else SyntheticSlide(size, rims=free)) \
        if case == "synthetic" else open_slide(_cmu())
    model = free_model() if free else stub_model(encoder)
    opts = EngineOptions(device="cpu", tile_cache_mb=cache_mb, **options)
    with tempfile.TemporaryDirectory() as out, measured() as m:
        stats = predict_reader(reader, Path(out), model, opts, outputs=outputs)
    nuc: dict[str, Any] = stats.get("nuclei", {"timings": {}, "count": 0})  # absent without nuclei
    width, height = stats["analysis"]["width"], stats["analysis"]["height"]
    timings = stats["timings_s"]
    post = sum(nuc["timings"].values())
    return {
        "case": case, "slide": stats["slide"]["name"], "analysis_px": [width, height],
        "network": model.network.encoder_name, "precision": stats["precision"],
        "total_s": m.seconds, "postprocess_s": post, "share": post / m.seconds,
        "postprocess_parts_s": nuc["timings"], "engine_timings_s": timings,
        "tiles_run": stats["tiles"]["run"], "forward_s_per_tile": timings.get("forward", 0.0) / stats["tiles"]["run"],
        "tiles_grid": stats["tiles"]["grid"], "margin_px": stats["parameters"]["margin"],
        "outputs": sorted(outputs), "tile_cache_mb": cache_mb, "nuclei": nuc["count"], "peak_rss": m.peak_rss,
        "cpu_s": m.cpu_seconds, "cpu_by_thread_s": m.thread_cpu, "children_cpu_s": m.children_cpu,
        "minor_faults": m.minor_faults,
        "us_per_nucleus": 1e6 * post / nuc["count"] if nuc["count"] else None,
    }


def _cmu() -> Path:
    from tests.helpers.samples import sample

    return sample("cmu_small_region.svs")


def child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.postprocess", "--child", *args],
                         capture_output=True, text=True, check=True)
    return cast(dict[str, Any], json.loads(out.stdout.strip().splitlines()[-1]))


def projected_share(syn: dict[str, Any], fwd_per_tile: float) -> float:
    """Share had the synthetic run used the network timed in ``cmu``."""
    total = syn["total_s"] - syn["engine_timings_s"].get("forward", 0.0) + syn["tiles_run"] * fwd_per_tile
    return float(syn["postprocess_s"] / total)


def report(rows: list[dict[str, Any]], memory: list[dict[str, Any]]) -> str:
    cmu = next(r for r in rows if r["case"] == "cmu")
    lines = [
        SECTION, "",
        f"- Date: {date.today().isoformat()}",
        f"- Machine: {machine()}",
        "- Command: `python -m benchmarks.postprocess --write` (each case in a child process; real pipeline "
        "`predict_reader` with default `EngineOptions` on the CPU)",
        "- Networks: `colour+resnet18` runs a random-init resnet18 two-head U-Net for its cost but takes its maps "
        "from colour (dark = nucleus), so post-processing sees realistic nuclei; `colour+none` is that colour "
        "stub alone (cheap). The shipped resnet34 costs more per tile, so real shares are lower still.",
        "- Post-processing = `NucleusSink` time (instances, classes, measurements, polygons, GeoJSON writing); "
        "total = wall time of the whole job (read, forward, blend, masks, overlays, nuclei, stats).",
        "",
        "| case | analysis px | network | nuclei | total s | post-processing s | share | µs/nucleus | "
        "tiles run / grid | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['analysis_px'][0]}×{r['analysis_px'][1]} | {r['network']} ({r['precision']}) | "
            f"{r['nuclei']:,} | {r['total_s']:.1f} | {r['postprocess_s']:.1f} | {100 * r['share']:.1f}% | "
            f"{r['us_per_nucleus']:.0f} | {r['tiles_run']:,} / {r['tiles_grid']:,} | {mb(r['peak_rss'])} |"
        )
    fwd = cmu["forward_s_per_tile"]
    parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in cmu["postprocess_parts_s"].items())
    lines += ["", f"- Forward time with resnet18 in `cmu`: {fwd:.3f} s per 256² tile; post-processing parts (s): "
              f"{parts}."]
    for r in rows:
        if r["case"] == "synthetic":
            lines.append(f"- synthetic {r['analysis_px'][0]} px: share projected with that network "
                         f"{100 * projected_share(r, fwd):.1f}% (measured with the cheap stub: "
                         f"{100 * r['share']:.1f}%).")
    lines += [
        f"- Margin: every block is blended with a {cmu['margin_px']} px margin for the nuclei; with the engine's "
        "tile cache, shared tiles run once, so the margin costs mainly the tiles re-run after cache evictions "
        "(\"tiles run / grid\" above, all sinks together) and about 30% more blending area.",
    ]
    if memory:
        sizes = ", ".join(f"{r['analysis_px'][0]} px: {mb(r['peak_rss'])}" for r in memory)
        lines.append(f"- Peak RSS with nuclei only and `tile_cache_mb=0` (so that the tile cache, "
                     f"which fills more on wider slides, is out of the picture): {sizes}.")
    lines.append("")
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace (or append) our section of RESULTS.md, leaving other sections alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text.rstrip("\n") + "\n" + (("\n" + old[nxt + 1 :]) if nxt >= 0 else "")
    RESULTS.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10000, 20000], help="synthetic slide sides")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[5000, 10000, 20000],
                        help="sides for the nuclei-only, no-tile-cache memory check")
    parser.add_argument("--write", action="store_true", help=f"write the section into {RESULTS.name}")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, size, encoder, outputs, cache_mb = args.child
        row = run_case(case, int(size), None if encoder == "none" else encoder,
                       frozenset(outputs.split(",")), int(cache_mb))
        print(json.dumps(row))
        return 0
    everything = ",".join(OUTPUT_GROUPS)
    rows = [child(["cmu", "0", "resnet18", everything, "512"])]
    rows += [child(["synthetic", str(s), "none", everything, "512"]) for s in args.sizes]
    memory = [child(["synthetic", str(s), "none", "nuclei", "0"]) for s in args.memory_sizes]
    for r in rows + memory:
        print(json.dumps(r), flush=True)
    text = report(rows, memory)
    print(text)
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"# {time.perf_counter() - started:.0f} s", file=sys.stderr)
    raise SystemExit(code)
