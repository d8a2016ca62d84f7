"""Host ceiling: the whole pipeline with a network that costs (almost) nothing.

Run: ``python -m benchmarks.pipeline --network free --side 8192``

A generated slide of ``side x side`` analysis pixels (``benchmarks.postprocess.SyntheticSlide``:
H&E-like colours, about 400 nuclei per Mpx, some touching) goes through the real pipeline
(``predict_reader``) with all outputs (masks, overlays, nuclei, stats). By default the slide is
rendered once into a tiled, deflate-compressed TIFF pyramid (cached under ``.cache/bench``; levels
down to 1/8, as a scanner writes them, so the overlays' thumbnail comes from a small level;
``--levels 1`` writes the single full-resolution level of earlier runs) and read by OpenSlide like
any slide; ``--source render`` renders it on each read instead (several times slower than decoding
a file, so then the renderer bounds the run). With ``--network free`` the network is ``FreeNet``
(per-pixel maps from the colour: the slide draws each nucleus's rim in its own colour; one small
matrix product per batch), so the run measures what the host does around the network:
reading, blending, argmax, mask files, overlays, nuclei. No device is fast enough to make the engine
beat this number. The stub runs on one torch thread (``--threads``): it stands for a network on a
device, and its operators split over two busy cores only wait for each other.
``--network colour`` is the older ``ColourNet`` stub (a 5x5 erosion per tile).

The last line reads ``host ceiling: X Mpx/s`` (analysis pixels over the job's wall time), then the
stages, peak RSS, and the CPU seconds and page faults of the run (the engine's process and its
nuclei processes): on a shared machine CPU time varies far less than wall time. Then the CPU seconds
by thread (``MainThread`` runs the engine: forward and blending) and of the nuclei processes: the
stage clocks also count the time a thread waits for the two cores, its CPU seconds do not.
``--per-nucleus`` instead times one block's post-processing (``block_nuclei``: instances, classes,
polygons) on one core over ``FreeNet``'s maps of a 2048 px block with its margin, best of
``--repeat`` runs (five; more on a noisy machine).
``--block-maps`` times, on one thread over the same block's eight float32 planes, what the engine
makes of a blended block (``class_maps``: the two argmax maps; ``nucleus_maps``: the nuclei's uint8
probabilities), beside numpy's argmax and softmax of the same planes as the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from benchmarks.common import count, machine, mb, stage_text
from benchmarks.postprocess import SyntheticSlide, run_case
from model.engine import set_threads
from model.options import OUTPUT_GROUPS
from model.postprocess import BlockPlace

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench"
TILE = 512
LEVELS = 4  # 8192 px: down to 1024 px, as a scanner's pyramid reaches a thumbnail
REPEAT = 5  # --per-nucleus and --block-maps: the best of this many runs


def write_synthetic(side: int, levels: int = LEVELS) -> Path:
    """The rimmed synthetic slide at 0.25 µm/px as a tiled TIFF of ``levels`` levels (each half the
    one before, box-averaged, as a scanner writes them), written once."""
    suffix = "" if levels == 1 else f"-{levels}levels"
    path = CACHE / f"synthetic-{side}-rims{suffix}.tiff"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    slide, part = SyntheticSlide(side, rims=True), path.with_suffix(".part")
    reduced = np.zeros((-(-side // 2), -(-side // 2), 3), np.uint8) if levels > 1 else None
    with tifffile.TiffWriter(part, bigtiff=True) as tif:
        for level in range(levels):
            if level == 0:
                tiles = _rendered_tiles(slide, side, reduced)
            else:
                assert reduced is not None
                if level > 1:
                    reduced = np.asarray(Image.fromarray(reduced).reduce(2))
                tiles = _array_tiles(reduced)
            n, res = -(-side // 2**level), 1e4 / (slide.mpp * 2**level)
            tif.write(tiles, shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      compression="zlib", compressionargs={"level": 1}, resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1, maxworkers=1)
    part.rename(path)
    return path


def _rendered_tiles(slide: SyntheticSlide, side: int, half: np.ndarray | None) -> Iterator[np.ndarray]:
    """Level-0 tiles, rendered; each also box-averaged by 2 into ``half`` when given."""
    for y in range(0, side, TILE):
        for x in range(0, side, TILE):
            tile = _white_tile(slide.read_region(0, x, y, min(TILE, side - x), min(TILE, side - y)))
            if half is not None:
                small = np.asarray(Image.fromarray(tile).reduce(2))
                target = half[y // 2 : y // 2 + TILE // 2, x // 2 : x // 2 + TILE // 2]
                target[...] = small[: target.shape[0], : target.shape[1]]
            yield tile


def _array_tiles(image: np.ndarray) -> Iterator[np.ndarray]:
    for y in range(0, image.shape[0], TILE):
        for x in range(0, image.shape[1], TILE):
            yield _white_tile(image[y : y + TILE, x : x + TILE])


def _white_tile(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` in the top-left corner of a white ``TILE x TILE`` tile."""
    tile = np.full((TILE, TILE, 3), 255, np.uint8)
    tile[: pixels.shape[0], : pixels.shape[1]] = pixels
    return tile


def _block_logits(block: int = 2048) -> tuple[np.ndarray, np.ndarray, int]:
    """``FreeNet``'s float32 semantic and ternary maps of one ``block`` px block with the engine's
    margin, from the rimmed synthetic slide, and that margin."""
    import cv2
    import torch

    from benchmarks.postprocess import FreeNet
    from model.postprocess import engine_margin

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    margin = engine_margin(0.25)
    side = block + 2 * margin
    pixels = SyntheticSlide(4 * block, rims=True).read_region(0, block - margin, block - margin, side, side)
    with torch.inference_mode():
        sem, ter = FreeNet()(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    return sem[0].numpy(), ter[0].numpy(), margin


def block_inputs(block: int = 2048) -> tuple[BlockPlace, np.ndarray, np.ndarray]:
    """What ``block_nuclei`` takes for one ``block`` px block of the rimmed synthetic slide (with the
    engine's margin): its place, ternary argmax and nuclei maps."""
    from model.blending import nucleus_inputs
    from model.postprocess import PostprocessParams
    from model.tiling import Box

    sem, ter, margin = _block_logits(block)
    ternary, probs = nucleus_inputs(sem, ter)
    region = Box(block - margin, block - margin, 2 * block + margin, 2 * block + margin)
    place = BlockPlace(region, Box(block, block, 2 * block, 2 * block), Box(0, 0, 4 * block, 4 * block), 0.25, 1.0,
                       PostprocessParams())
    return place, ternary, probs


def per_nucleus(repeat: int = REPEAT) -> tuple[float, int]:
    """Best seconds of ``block_nuclei`` on one block of the rimmed synthetic slide, and the nuclei it owns."""
    from model.postprocess import block_nuclei

    place, ternary, probs = block_inputs()
    best, owned = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        owned = len(block_nuclei(place, ternary, probs).rings)
        best = min(best, time.perf_counter() - started)
    return best, owned


def block_maps(repeat: int = REPEAT) -> dict[str, float]:
    """Best milliseconds, one thread, of what the engine makes of one blended block (the class maps, the
    nuclei's uint8 maps) and of numpy's argmax and softmax over the same planes, in this process."""
    import torch

    from model.blending import class_maps, nucleus_maps

    sem, ter, _ = _block_logits()
    values = np.concatenate((sem, ter))
    covered = torch.ones(values.shape[1:], dtype=torch.bool)

    def engine_maps() -> None:  # on a copy: the engine's maps overwrite the blended planes
        class_maps(torch.from_numpy(values.copy()), covered, len(sem))

    def engine_probs() -> None:
        nucleus_maps(torch.from_numpy(values.copy()), len(sem))

    def numpy_maps() -> None:
        np.stack([sem.argmax(0), ter.argmax(0)]).astype(np.uint8)

    def numpy_probs() -> None:
        e = np.exp(sem - sem.max(0))
        np.round(e / e.sum(0) * 255).astype(np.uint8)

    cases: dict[str, Callable[[], object]] = {"class maps": engine_maps, "nuclei maps": engine_probs,
                                              "numpy argmax": numpy_maps, "numpy softmax": numpy_probs,
                                              "copy": values.copy}
    best = {name: float("inf") for name in cases}
    for _ in range(repeat):
        for name, case in cases.items():
            started = time.perf_counter()
            case()
            best[name] = min(best[name], time.perf_counter() - started)
    copy = best.pop("copy")
    best["class maps"] -= copy
    best["nuclei maps"] -= copy
    return {"side": values.shape[1], **{name: 1e3 * seconds for name, seconds in best.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=["free", "colour"], default="free")
    parser.add_argument("--side", type=int, default=8192, help="generated slide side, analysis pixels")
    parser.add_argument("--source", choices=["file", "render"], default="file",
                        help="read the slide from a cached TIFF (OpenSlide) or render it on each read")
    parser.add_argument("--outputs", default=",".join(OUTPUT_GROUPS))
    parser.add_argument("--levels", type=int, default=LEVELS,
                        help="pyramid levels of the cached TIFF (1: a single full-resolution level)")
    parser.add_argument("--cache-mb", type=int, default=None,
                        help="EngineOptions.tile_cache_mb (default: the device's)")
    parser.add_argument("--workers", type=int, default=None, help="EngineOptions.workers (default: the cores)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for --network free, else torch's)")
    parser.add_argument("--per-nucleus", action="store_true", help="time one block's post-processing instead")
    parser.add_argument("--block-maps", action="store_true",
                        help="time the class and nuclei maps of one blended block instead")
    parser.add_argument("--repeat", type=count, default=REPEAT,
                        help="--per-nucleus and --block-maps: the best of this many runs (more on a noisy machine)")
    args = parser.parse_args(argv)
    if args.block_maps:
        ms = block_maps(args.repeat)
        print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
        print(f"block maps ({ms['side']}² px, one thread, best of {args.repeat}): "
              f"class maps {ms['class maps']:.0f} ms (numpy argmax {ms['numpy argmax']:.0f} ms), "
              f"nuclei maps {ms['nuclei maps']:.0f} ms "
              f"(numpy softmax of the semantic planes {ms['numpy softmax']:.0f} ms)")
        return 0
    if args.per_nucleus:
        seconds, owned = per_nucleus(args.repeat)
        print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
        print(f"post-processing: {1e6 * seconds / owned:.0f} µs/nucleus ({owned:,} nuclei owned by a 2048 px "
              f"block, {seconds:.3f} s on one core, best of {args.repeat})")
        return 0
    set_threads(args.threads if args.threads is not None or args.network != "free" else 1)
    extra = {} if args.workers is None else {"workers": args.workers}
    slide = write_synthetic(args.side, args.levels) if args.source == "file" and args.network == "free" else None
    row = run_case("synthetic", args.side, None, frozenset(args.outputs.split(",")), args.cache_mb,
                   free=args.network == "free", slide=slide, **extra)
    print(json.dumps(row), flush=True)
    stages = stage_text(row["engine_timings_s"])
    threads = stage_text({name: s for name, s in row["cpu_by_thread_s"].items() if s >= 0.05})
    mpx = args.side * args.side / 1e6
    per = row["us_per_nucleus"]
    nuclei = f"{row['nuclei']:,} nuclei, " + (f"{per:.0f} µs/nucleus post-processing" if per else "no post-processing")
    print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}; source {args.source}", file=sys.stderr)
    print(f"host ceiling: {mpx / row['total_s']:.2f} Mpx/s ({mpx:.1f} Mpx in {row['total_s']:.1f} s; "
          f"{row['tiles_run']:,} tiles run for {row['tiles_grid']:,} grid tiles; "
          f"{nuclei}; stages s: "
          f"{stages}; peak RSS {mb(row['peak_rss'])}; CPU {row['cpu_s']:.1f} s, "
          f"{row['minor_faults'] / 1e3:,.0f} k page faults; CPU s by thread: {threads}, "
          f"child processes {row['children_cpu_s']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
