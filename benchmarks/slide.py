"""Whole-slide benchmark: a generated 40x pyramid of real tissue through the whole pipeline.

Run: ``python -m benchmarks.slide [--side 32768] [--device cuda] [--model PATH]``

The slide is the tissue of ``cmu_small_region.svs`` (20x) brought to 0.25 µm/px and mirrored over
``side x side`` px, written once as a tiled pyramidal TIFF with JPEG tiles (YCbCr 4:2:0, as scanners
write them; encoded by Pillow on all cores, so no imagecodecs is needed; cached under
``.cache/bench``), so reading costs what it costs on a real slide: OpenSlide decoding JPEG. The
shipped model runs over it with every output (masks, overlays, nuclei, stats) at the engine's defaults
(``auto`` precision: bf16 on a GPU). Printed:

- (b) the engine end to end, in Mpx/s of slide, with the stage breakdown and, on CUDA, the GPU's
  mean utilisation (``nvidia-smi`` sampled every 0.2 s);
- (a) the bare forward of as many tiles as the engine ran (batches of real tiles already on the
  host, the same precision), timed in the same process;
- b/a, and the time (b) projects for 3.2 Gpx of tissue (a 100,000 x 80,000 px slide with 40 %
  tissue at 0.25 µm/px).

``--batch`` sets the engine's batch size (default: the device's, ``model.options.DEVICE_BATCH``),
for a sweep on a device. The last line reads ``slide: X Mpx/s end to end, b/a Y, 3.2 Gpx in Z s``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from benchmarks.common import machine, mb, measured, stage_text
from core.settings import DEFAULT_MODEL
from model.checkpoint import LoadedModel, load_model
from model.device import TileRunner, resolve_device, resolve_precision
from model.engine import EngineOptions
from model.options import OUTPUT_GROUPS, device_batch
from model.pipeline import predict_reader
from model.readers import open_slide
from tests.helpers.samples import sample

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench"
MPP, TILE, LEVELS, JPEG_QUALITY = 0.25, 512, 4, 90
TISSUE_GPX = 3.2  # 100,000 x 80,000 px at 40 % tissue


def tissue_source() -> np.ndarray:
    """The CMU sample's level 0 resampled to ``MPP`` µm/px (RGB)."""
    reader = open_slide(sample("cmu_small_region.svs"))
    try:
        w, h = reader.level_dimensions[0]
        scale = (reader.mpp or MPP) / MPP
        pixels = reader.read_region(0, 0, 0, w, h)
    finally:
        reader.close()
    size = (round(w * scale), round(h * scale))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))


def write_slide(side: int) -> Path:
    """The mirrored-tissue pyramid of ``side x side`` px, written once (JPEG tiles)."""
    path = CACHE / f"tissue-{side}-jpeg.tiff"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    source, part = tissue_source(), path.with_suffix(".part")
    res = 1e4 / MPP  # pixels per cm
    with tifffile.TiffWriter(part, bigtiff=True) as tif:
        for level in range(LEVELS):
            scale = 2**level
            src = source if level == 0 else np.asarray(Image.fromarray(source).resize(
                (source.shape[1] // scale, source.shape[0] // scale), Image.Resampling.BOX))
            n = -(-side // scale)
            tif.write(_jpeg_tiles(_mirrored_tiles(src, n)), shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE),
                      photometric="ycbcr", subsampling=(2, 2), compression="jpeg",
                      resolution=(res / scale, res / scale), resolutionunit="CENTIMETER",
                      subfiletype=0 if level == 0 else 1)
    part.rename(path)
    return path


def _jpeg_tiles(tiles: Iterable[np.ndarray]) -> Iterator[bytes]:
    """Each tile as a baseline JPEG (Pillow: YCbCr, 4:2:0, ``JPEG_QUALITY``), in order, encoded on all
    cores with a bounded window of tiles in flight."""
    workers = os.cpu_count() or 1
    window: deque[Future[bytes]] = deque()
    with ThreadPoolExecutor(workers) as pool:
        for tile in tiles:
            window.append(pool.submit(_jpeg, tile))
            if len(window) > 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _jpeg(tile: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _mirrored_tiles(source: np.ndarray, side: int) -> Iterator[np.ndarray]:
    """Tiles of ``source`` repeated by mirroring over ``side x side`` px, row by row."""
    for y in range(0, side, TILE):
        ys = _mirror(np.arange(y, y + TILE), source.shape[0])
        for x in range(0, side, TILE):
            yield source[np.ix_(ys, _mirror(np.arange(x, x + TILE), source.shape[1]))]


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    period = idx % (2 * n)
    return np.where(period < n, period, 2 * n - 1 - period)


class GpuSampler:
    """Mean GPU utilisation from ``nvidia-smi`` while in the ``with`` block (None without one)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._smi = shutil.which("nvidia-smi")

    def __enter__(self) -> GpuSampler:
        if self._smi:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._smi:
            self._thread.join()

    def _run(self) -> None:
        assert self._smi is not None
        while not self._stop.wait(self.interval_s):
            out = subprocess.run([self._smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=False).stdout.split()
            if out:
                self.samples.append(float(out[0]))

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def bare_forward(model: LoadedModel, slide: Path, options: EngineOptions, tiles: int) -> float:
    """Seconds for the network alone over ``tiles`` real tiles (the slide's first rows, on the host)."""
    reader = open_slide(slide)
    try:
        t = options.tile_size
        band = reader.read_region(0, 0, 0, 16 * t, 2 * t)
    finally:
        reader.close()
    pool = np.stack([band[y : y + t, x : x + t] for y in (0, t) for x in range(0, 16 * t, t)])
    engine_device = resolve_device(options.device)
    n = device_batch(options.batch_size, engine_device.type)  # the engine's
    runner = TileRunner(model.network, model.card, engine_device, resolve_precision(options.precision, engine_device),
                        batch=n)
    batches = [pool[(i * n) % len(pool):][:n] for i in range(-(-tiles // n))]
    batches = [b if len(b) == n else pool[:n] for b in batches]
    runner(batches[0])  # warm-up
    _sync(engine_device)
    started = time.perf_counter()
    for batch in batches:
        runner(batch)
    _sync(engine_device)
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=32768, help="slide side, px at 0.25 µm/px")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--outputs", default=",".join(OUTPUT_GROUPS))
    parser.add_argument("--batch", type=int, default=None, help="EngineOptions.batch_size (default: the device's)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    slide = write_slide(args.side)
    print(f"# slide {slide.name}: {slide.stat().st_size / 2**20:.0f} MiB, written or found in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    model = load_model(args.model)
    options = EngineOptions(device=args.device, precision=args.precision, batch_size=args.batch)
    with tempfile.TemporaryDirectory() as out, measured() as m, GpuSampler() as gpu:
        stats = predict_reader(open_slide(slide), Path(out), model, options,
                               outputs=frozenset(args.outputs.split(",")))
    tiles = int(stats["tiles"]["run"])
    forward_s = bare_forward(model, slide, options, tiles)
    mpx = args.side**2 / 1e6
    row = {"side": args.side, "device": stats["device"], "precision": stats["precision"], "seconds": m.seconds,
           "mpx_s": mpx / m.seconds, "bare_forward_s": forward_s, "b_over_a": forward_s / m.seconds,
           "tiles": tiles, "nuclei": stats["nuclei"]["count"], "stages_s": stats["timings_s"],
           "gpu_util_mean": gpu.mean, "peak_rss": m.peak_rss, "projected_3_2_gpx_s": TISSUE_GPX * 1e3 * m.seconds / mpx}
    print(json.dumps(row), flush=True)
    util = f"; GPU utilisation {gpu.mean:.0f} %" if gpu.mean is not None else ""
    stages = stage_text(stats["timings_s"])
    print(f"# {machine()}; {tiles:,} tiles, {row['nuclei']:,} nuclei; stages s: {stages}; peak RSS "
          f"{mb(m.peak_rss)}{util}", file=sys.stderr)
    print(f"slide: {row['mpx_s']:.2f} Mpx/s end to end, b/a {row['b_over_a']:.2f}, "
          f"3.2 Gpx in {row['projected_3_2_gpx_s']:.0f} s ({mpx:.0f} Mpx in {m.seconds:.1f} s, {stats['device']} "
          f"{stats['precision']}, batch {stats['parameters']['batch_size']}; bare forward of the same tiles "
          f"{mpx / forward_s:.2f} Mpx/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
