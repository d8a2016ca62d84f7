"""Deep Zoom tile latency on a 20k px job: ``python -m benchmarks.tiles [--side 20480] [--requests 300]``.

1. Writes a generated pyramidal TIFF slide (``tests.helpers.synthetic.write_pyramid``) and runs the real
   pipeline on it with a near-free stub network (``tests.helpers.stubs.TrivialNet``), masks only, so the
   results folder holds ``semantic.tiff`` / ``ternary.tiff`` as the worker writes them.
2. Serves the job from the real app in-process (Starlette ``TestClient``; the job store is replaced by
   a one-record stand-in, so no Redis) and times random tile requests per kind, cold (first request of
   each tile) and revalidated (``If-None-Match`` -> 304). Reports p50/p99 and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from fastapi.testclient import TestClient

from api.deepzoom import MASK_TILE, SLIDE_TILE, dz_levels
from api.deps import get_store
from api.main import create_app
from benchmarks.common import measured
from core.records import JobRecord
from core.settings import Settings
from model.engine import EngineOptions
from model.options import Stats
from model.pipeline import predict_reader
from model.readers import open_slide
from tests.helpers.stubs import TrivialNet, loaded
from tests.helpers.synthetic import write_pyramid

JOB_ID = "b" * 32


def dark(x: torch.Tensor) -> torch.Tensor:
    """Nucleus where the tissue is dark: some non-background pixels for the overlays."""
    d = 1.0 - x.mean(dim=1, keepdim=True)
    return torch.cat((1 - d, d, d * 0.5), dim=1)


class OneJob:
    """A job store holding one succeeded job."""

    def __init__(self, record: JobRecord) -> None:
        self.record = record

    def get(self, job_id: str) -> JobRecord | None:
        return self.record if job_id == self.record.id else None


def run_job(data_dir: Path, side: int) -> tuple[Path, Stats]:
    """The slide and the stats of its job (the mask TIFFs are written on the engine's writer threads,
    during the run: the job's stage clocks say where its time went)."""
    slide = write_pyramid(data_dir / "slide.tiff", side, side, tissue_fraction=0.05, cell=2048)
    out = data_dir / "results" / JOB_ID
    reader = open_slide(slide)
    try:
        stats = predict_reader(reader, out, loaded(TrivialNet(dark)), EngineOptions(device="cpu", precision="fp32"),
                               outputs=frozenset({"masks"}))
    finally:
        reader.close()
    return slide, stats


def tile_urls(kind: str, width: int, height: int, level_offset: int, n: int, rng: random.Random) -> list[str]:
    size, ext = (SLIDE_TILE, "jpeg") if kind == "slide" else (MASK_TILE, "png")
    level = dz_levels(width, height) - 1 - level_offset
    f = 2**level_offset
    cols, rows = -(-width // f // size), -(-height // f // size)
    picks = {(rng.randrange(cols), rng.randrange(rows)) for _ in range(n * 3)}
    return [f"/v1/jobs/{JOB_ID}/dzi/{kind}_files/{level}/{c}_{r}.{ext}" for c, r in sorted(picks)[:n]]


def percentiles(ms: list[float]) -> tuple[float, float]:
    arr = np.asarray(ms)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def bench_tiles(client: TestClient, urls: list[str]) -> dict[str, float]:
    cold, warm, sizes = [], [], []
    for url in urls:
        t0 = time.perf_counter()
        resp = client.get(url)
        cold.append((time.perf_counter() - t0) * 1000)
        assert resp.status_code == 200, (url, resp.text)
        sizes.append(len(resp.content))
        t0 = time.perf_counter()
        again = client.get(url, headers={"If-None-Match": resp.headers["etag"]})
        warm.append((time.perf_counter() - t0) * 1000)
        assert again.status_code == 304
    p50, p99 = percentiles(cold)
    r50, r99 = percentiles(warm)
    return {"n": len(urls), "p50_ms": p50, "p99_ms": p99, "p50_304_ms": r50, "p99_304_ms": r99,
            "mean_kb": float(np.mean(sizes)) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=20480)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-tiles-") as tmp:
        data = Path(tmp)
        started = time.perf_counter()
        slide, stats = run_job(data, args.side)
        tiff_mib = (data / "results" / JOB_ID / "semantic.tiff").stat().st_size / 2**20
        print(f"job: {args.side}x{args.side} px in {time.perf_counter() - started:.1f} s "
              f"(finish {stats['timings_s'].get('finish', 0.0):.1f} s, semantic.tiff {tiff_mib:.1f} MiB)")
        record = JobRecord(id=JOB_ID, status="succeeded", created_at=time.time(), slide_file=str(slide))
        app = create_app(Settings(data_dir=data, auth="disabled"))  # served on loopback only
        app.dependency_overrides[get_store] = lambda: OneJob(record)
        width, height = stats["analysis"]["width"], stats["analysis"]["height"]
        cases = [("slide", 0), ("slide", 3), ("semantic", 0), ("semantic", 3), ("ternary", 6)]
        rows = {}
        with TestClient(app, base_url="http://127.0.0.1") as client, measured() as m:
            start_rss = psutil.Process().memory_info().rss  # after measured() trimmed the heap
            for kind, offset in cases:
                urls = tile_urls(kind, width, height, offset, args.requests, rng)
                rows[f"{kind} level max-{offset}"] = bench_tiles(client, urls)
        print(json.dumps(rows, indent=1))
        print(f"process RSS before the tile requests {start_rss / 2**20:.0f} MiB (torch, the app), "
              f"peak during them {m.peak_rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
