"""Engine benchmark: our engine against the bare model, the original loop and MONAI.

Run: ``python -m benchmarks.engine [--device cpu|cuda] [--region 2048] [--model PATH]``

On one region of ``cmu_small_region.svs`` (resampled from 20x to the model's 0.25 µm/px), with the
same seeded resnet34 two-head network, it times, in one process:

- (a) the bare model forward over exactly the grid tiles the engine needs (pre-extracted input);
- (b) our engine end to end from the reader (read, resample, batch, forward, blend, argmax, masks);
- (c) the original project's loop (batch 1, whole-image accumulators, reflect padding);
- (d) MONAI ``sliding_window_inference`` (mode gaussian, same roi and overlap, sw_batch 8).

It prints throughput in Mpx/s of output, peak RSS during each, and the ratios b/a, b/c, b/d for (b)
at the parity settings (fp32, 256/64) and for the fastest defaults (tile sizes of ``--fast-tiles`` at
``auto`` precision; with ``--model``, only those whose argmax maps of the trained model agree with
fp32 256/64 on ``AGREEMENT`` of the pixels in both heads); (a) and (b) of each ratio are
run alternately ``--repeat`` times and the median taken. Then it runs the engine on
generated pyramidal slides of growing size in child processes and prints their peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import CropReader, count, machine, mb, measured
from benchmarks.reference import original_loop
from model.analysis import make_view
from model.card import ModelCard
from model.checkpoint import LoadedModel, load_model
from model.device import TileRunner, resolve_device, resolve_precision
from model.engine import CollectSink, Engine, EngineOptions, read_reflected
from model.maps import ClassMapSink
from model.network import build_network
from model.options import device_batch
from model.readers import open_slide
from model.tiling import Box, TileGrid
from tests.helpers.samples import sample

AGREEMENT = 0.995  # argmax agreement a faster default must keep with fp32 256/64 (both heads)


@dataclass
class Row:
    name: str
    seconds: float
    peak_rss: int
    pixels: int
    stages: dict[str, float] | None = None  # the engine's own timings, for (b) rows

    @property
    def mpx_s(self) -> float:
        return self.pixels / self.seconds / 1e6


def seeded_model(encoder: str = "resnet34") -> LoadedModel:
    torch.manual_seed(0)
    card = ModelCard(name=f"seeded-{encoder}", encoder=encoder)
    return LoadedModel(build_network(encoder).eval(), card, Path("seeded"), "0" * 64, "random-init")


def region_reader(side: int) -> CropReader:
    """A window of the CMU slide that becomes ``side x side`` px at 0.25 µm/px."""
    reader = open_slide(sample("cmu_small_region.svs"))
    l0 = round(side * 0.25 / (reader.mpp or 0.25))
    w0, h0 = reader.level_dimensions[0]
    return CropReader(reader, (w0 - l0) // 2, (h0 - l0) // 2, l0, l0)


def bare_forward(model: LoadedModel, image: np.ndarray, opts: EngineOptions, device: torch.device) -> Row:
    """(a): only the network, over the grid tiles of the image, input already in memory."""
    grid = TileGrid(opts.tile_size, opts.overlap, image.shape[1], image.shape[0])
    tiles_idx = grid.tiles_touching(grid.bounds)
    padded = _reflect_pad(image, grid.union_box(tiles_idx))
    tiles = np.stack([padded[b.y0 : b.y1, b.x0 : b.x1] for b in (grid.tile_box(*t) for t in tiles_idx)])
    runner = TileRunner(model.network, model.card, device, "fp32" if opts.precision == "fp32" else "bf16")
    batch = device_batch(opts.batch_size, device.type)  # the engine's
    runner(tiles[:batch])  # warm-up
    with measured() as m:
        for i in range(0, len(tiles), batch):
            runner(tiles[i : i + batch])
        _sync(device)
    return Row(f"(a) bare forward {opts.precision} {opts.tile_size}/{opts.overlap} ({len(tiles)} tiles)",
               m.seconds, m.peak_rss, image.shape[0] * image.shape[1])


def _reflect_pad(image: np.ndarray, box: Box) -> np.ndarray:
    class _View:
        width, height = image.shape[1], image.shape[0]

        def read(self, b: Box) -> np.ndarray:
            return image[b.y0 : b.y1, b.x0 : b.x1]

    return read_reflected(_View(), box)  # type: ignore[arg-type]


def engine_run(model: LoadedModel, reader: CropReader, opts: EngineOptions, side: int) -> tuple[Row, np.ndarray]:
    """(b): the engine from the reader, with the class-map sink writing masks; its argmax maps."""
    engine = Engine(model, opts)
    collect = CollectSink(logits=False)  # the argmax maps the masks hold, no float logits brought back
    with tempfile.TemporaryDirectory() as tmp, measured() as m:
        report = engine.run(reader, [ClassMapSink(Path(tmp), masks=True, overlays=False), collect])
        _sync(engine.device)
    assert collect.classes is not None
    argmax = collect.classes
    name = f"(b) engine {report.precision} {opts.tile_size}/{opts.overlap} ({report.tiles_run} tiles)"
    return Row(name, m.seconds, m.peak_rss, side * side, dict(report.timings)), argmax


def reference_run(model: LoadedModel, image: np.ndarray) -> Row:
    """(c): the original loop (CPU, fp32, batch 1) on the same pixels."""
    with measured() as m:
        original_loop(model.network.cpu(), image)
    return Row("(c) original loop fp32 256/64", m.seconds, m.peak_rss, image.shape[0] * image.shape[1])


def monai_run(model: LoadedModel, image: np.ndarray, device: torch.device) -> Row | None:
    """(d): MONAI sliding_window_inference, gaussian blending, same roi/overlap, sw_batch 8."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    net = model.network.to(device).eval()
    mean = torch.tensor(model.card.normalisation.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.card.normalisation.std, device=device).view(1, 3, 1, 1)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(net(x), dim=1)

    with measured() as m, torch.inference_mode():
        x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float() / 255.0
        sliding_window_inference((x - mean) / std, roi_size=(256, 256), sw_batch_size=8, predictor=predictor,
                                 overlap=64 / 256, mode="gaussian", sigma_scale=0.25)
        _sync(device)
    return Row("(d) MONAI sliding_window gaussian fp32 256/64", m.seconds, m.peak_rss, image.shape[0] * image.shape[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired(repeat: int, run_a: Callable[[], Row], run_b: Callable[[], Row]) -> tuple[Row, Row]:
    """``run_a`` and ``run_b`` alternately ``repeat`` times; each one's run of median time (a shared
    machine's noise moves single runs by more than the gaps being measured)."""
    runs = [(run_a(), run_b()) for _ in range(repeat)]
    return _median([r[0] for r in runs]), _median([r[1] for r in runs])


def _median(rows: list[Row]) -> Row:
    return sorted(rows, key=lambda r: r.seconds)[len(rows) // 2]


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return float((a[0] == b[0]).mean()), float((a[1] == b[1]).mean())


def memory_child(side: int, encoder: str) -> None:
    """Child process: engine over a generated ``side``-px pyramid (constant tissue), print peak RSS."""
    import resource

    from tests.helpers.synthetic import write_pyramid

    with tempfile.TemporaryDirectory() as tmp:
        slide = write_pyramid(Path(tmp) / f"s{side}.tiff", side, side, tissue_fraction=0.0, cell=1024)
        model = seeded_model(encoder)
        out = Path(tmp) / "out"
        out.mkdir()
        engine = Engine(model, EngineOptions(device="cpu", tissue=True))
        reader = open_slide(slide)
        report = engine.run(reader, [ClassMapSink(out, masks=True, overlays=True)])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"side": side, "peak_rss": peak, "tiles_run": report.tiles_run,
                          "tiles_skipped": report.tiles_skipped, "seconds": report.timings["total"]}))


def memory_table(sides: list[int], encoder: str) -> list[dict[str, float]]:
    rows = []
    for side in sides:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.engine", "--memory-child", str(side),
                               "--encoder", encoder], capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--region", type=int, default=2048, help="side of the analysis region in px")
    parser.add_argument("--model", type=Path, default=None, help="trained checkpoint for the agreement check")
    parser.add_argument("--fast-tiles", default="256,384,512", help="tile sizes tried for the fastest defaults")
    parser.add_argument("--memory-sides", default="4096,16384,32768")
    parser.add_argument("--encoder", default="resnet18", help="encoder for the memory runs")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-baselines", action="store_true", help="skip (c) and (d)")
    parser.add_argument("--repeat", type=count, default=3, help="(a, b) pairs run for each ratio (median)")
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.encoder)
        return 0
    device = resolve_device(args.device)
    print(f"# nucseg engine benchmark, {date.today()}\n# machine: {machine()}\n# device: {device}")
    model = seeded_model()
    reader = region_reader(args.region)
    image = make_view(reader, 0.25).read(Box(0, 0, args.region, args.region))
    side = args.region
    parity = EngineOptions(device=device.type, precision="fp32", tissue=False)
    argmax_fp32 = engine_run(model, reader, parity, side)[1]  # also the warm-up
    a, b = paired(args.repeat, lambda: bare_forward(model, image, parity, device),
                  lambda: engine_run(model, reader, parity, side)[0])
    rows = [a, b]
    c = None if args.skip_baselines or device.type == "cuda" else reference_run(model, image)
    d = None if args.skip_baselines else monai_run(model, image, device)
    rows += [r for r in (c, d) if r is not None]
    fastest: list[tuple[Row, EngineOptions, np.ndarray]] = []
    for tile in (int(t) for t in args.fast_tiles.split(",")):
        opts = EngineOptions(device=device.type, precision="auto", tissue=False, tile_size=tile, overlap=64)
        row, argmax = engine_run(model, reader, opts, side)
        fastest.append((row, opts, argmax))
        rows.append(row)
    trained = _trained_agreement(args.model, reader, side, fastest, device)
    best_i = _fastest_within_agreement(fastest, trained)
    best_opts = fastest[best_i][1]
    bare_opts = EngineOptions(precision=resolve_precision(best_opts.precision, device),
                              tile_size=best_opts.tile_size, overlap=best_opts.overlap)
    a_fast, best = paired(args.repeat, lambda: bare_forward(model, image, bare_opts, device),
                          lambda: engine_run(model, reader, best_opts, side)[0])
    rows += [a_fast, best]
    print(f"\n(a, b) pairs for the ratios: the median of {args.repeat}, run alternately")
    print(f"{'variant':<58} {'Mpx/s':>8} {'seconds':>8} {'peak RSS':>10}")
    for r in rows:
        print(f"{r.name:<58} {r.mpx_s:8.3f} {r.seconds:8.2f} {mb(r.peak_rss):>10}")
    print("\nwhere the engine's time goes (s; read runs in a prefetch thread, overlapping the rest):")
    for r in rows:
        if r.stages:
            print(f"  {r.name:<56} " + ", ".join(f"{k} {v:.2f}" for k, v in r.stages.items()))
    print("\nratios (throughput):")
    print(f"  parity fp32 256/64: b/a = {b.mpx_s / a.mpx_s:.3f}"
          + (f", b/c = {b.mpx_s / c.mpx_s:.3f}" if c else "") + (f", b/d = {b.mpx_s / d.mpx_s:.3f}" if d else ""))
    print(f"  fastest ({best.name}): b/a_same_settings = {best.mpx_s / a_fast.mpx_s:.3f}"
          + (f", b/c = {best.mpx_s / c.mpx_s:.3f}" if c else "") + (f", b/d = {best.mpx_s / d.mpx_s:.3f}" if d else ""))
    if trained is None:
        sem, ter = agreement(argmax_fp32, fastest[best_i][2])
        print(f"  argmax agreement fastest vs fp32 256/64 (random-init net; near-tied logits): "
              f"semantic {sem:.4f}, ternary {ter:.4f}")
    else:
        sem, ter = trained[1][best_i]
        print(f"  argmax agreement fastest vs fp32 256/64 ({trained[0]}): semantic {sem:.4f}, ternary {ter:.4f}")
    sides = [int(s) for s in args.memory_sides.split(",") if s]
    if sides:
        print(f"\npeak RSS vs slide size (generated pyramidal TIFF, constant tissue, {args.encoder}, child processes):")
        for mem in memory_table(sides, args.encoder):
            print(f"  {int(mem['side']):>6} px square: peak RSS {mb(int(mem['peak_rss'])):>10}, "
                  f"tiles run {int(mem['tiles_run'])}, skipped {int(mem['tiles_skipped'])}, {mem['seconds']:.1f} s")
    return 0


def _trained_agreement(model_path: Path | None, reader: CropReader, side: int,
                       fastest: list[tuple[Row, EngineOptions, np.ndarray]],
                       device: torch.device) -> tuple[str, list[tuple[float, float]]] | None:
    """The trained model's name and each candidate's argmax agreement (semantic, ternary) with fp32
    256/64 on it; None without a trained model."""
    if model_path is None:
        return None
    trained = load_model(model_path)
    ref = engine_run(trained, reader, EngineOptions(device=device.type, precision="fp32", tissue=False), side)[1]
    return trained.card.name, [agreement(ref, engine_run(trained, reader, opts, side)[1]) for _, opts, _ in fastest]


def _fastest_within_agreement(fastest: list[tuple[Row, EngineOptions, np.ndarray]],
                              trained: tuple[str, list[tuple[float, float]]] | None) -> int:
    """Index of the fastest candidate that keeps ``AGREEMENT`` in both heads (of all, without a trained
    model or when none does); prints each candidate's agreement."""
    kept = list(range(len(fastest)))
    if trained is not None:
        name, agreements = trained
        for (_, opts, _), (sem, ter) in zip(fastest, agreements, strict=True):
            ok = min(sem, ter) >= AGREEMENT
            print(f"  candidate {opts.tile_size}/{opts.overlap}: agreement with fp32 256/64 ({name}) "
                  f"semantic {sem:.4f}, ternary {ter:.4f}{'' if ok else f' < {AGREEMENT}: not a default'}")
        kept = [i for i in kept if min(agreements[i]) >= AGREEMENT] or kept
    return max(kept, key=lambda i: fastest[i][0].mpx_s)


if __name__ == "__main__":
    raise SystemExit(main())
