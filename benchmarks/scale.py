"""Scale-out: one large generated slide on 1, 2 and 4 worker processes.

Run: ``python -m benchmarks.scale [--side 32768] [--tile-ms 150] [--ks 1,2,4] [--fairness]``

A real service (redis-server, the API over HTTP, ``K`` Celery worker processes, the local store)
runs one job on a generated pyramidal TIFF of ``side x side`` level-0 pixels (``write_pyramid``, all
tissue). Its options state 0.0625 µm/px, so the engine analyses level 2 (``side / 4`` square, 4x
down from the model's 0.25 µm/px): the run stays in minutes on two cores. The workers' network is
``SleepNet``: it sleeps ``--tile-ms`` per tile and returns constant maps, as a worker bound by its
device would be; everything else is the production path (tiles, blending, masks, shards, merge).

``K = 1`` is the baseline: one worker, the slide not sharded. For ``K = 2, 4`` the slide is cut into
shards of ``--shard-rows`` block rows (2: eight shards of 512 px rows; each shard border runs a third
of a tile row twice, so finer shards balance better but recompute more). Reported per K: the job's wall
time (created to finished, as the client sees it), the speedup over ``K = 1``, and the merge (from
the last shard done to the job finished) as a share of the ``K = 1`` time. With ``--fairness`` a
small job of another tenant is submitted while the large one runs on two workers; its queue wait is
reported beside the shards' duration.

The last line reads ``scale: K=2 <speedup> K=4 <speedup> ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import httpx
import torch
from torch import nn

from benchmarks.common import machine
from benchmarks.postprocess import RAW
from cli.processes import stop_group
from cli.redis_server import start_redis
from core.redis_client import connect
from core.shards import ShardStore
from core.store import JobStore
from model.card import ModelCard
from model.checkpoint import LoadedModel
from model.network import TwoHeadUnet
from tests.helpers.service_stack import FAST, free_port, png_bytes, wait_http
from tests.helpers.synthetic import write_pyramid

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
STATED_MPP = 0.0625  # 4x the model's 0.25 µm/px: the engine reads level 2
TILE, OVERLAP, BLOCK = 256, 64, 512


class SleepNet(nn.Module):
    """Sleeps ``tile_s`` per tile, like a busy device, and calls every pixel background."""

    output_stride = 32
    encoder_name = "sleep"

    def __init__(self, tile_s: float) -> None:
        super().__init__()
        self.tile_s = tile_s

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.tile_s * x.shape[0])
        b, _, h, w = x.shape
        return x.new_zeros((b, 5, h, w)), x.new_zeros((b, 3, h, w))


def sleep_model(tile_s: float) -> LoadedModel:
    card = ModelCard(name="sleep-stub", encoder="none", normalisation=RAW)
    return LoadedModel(cast(TwoHeadUnet, SleepNet(tile_s)), card, Path("stub"), "0" * 64, "benchmark")


def run_worker(name: str, tile_s: float) -> int:
    """A ``nucseg worker`` whose processes load ``SleepNet`` instead of the checkpoint."""
    import worker.resources
    from cli.service import main as service_main

    model = sleep_model(tile_s)
    worker.resources._load_model = lambda path, sha256: model  # type: ignore[assignment]
    torch.set_num_threads(1)
    return service_main(["worker", "--hostname", name, "--concurrency", "1", "--loglevel", "WARNING"])


class Service:
    """redis-server, the API and ``K`` workers in a temporary folder, on the local store."""

    def __init__(self, root: Path, slide_dir: Path, tile_s: float) -> None:
        self.root, self.tile_s = root, tile_s
        self.redis_port, self.api_port = free_port(), free_port()
        self.env = {**os.environ, "NUCSEG_DATA_DIR": str(root / "data"), "NUCSEG_SLIDE_ROOT": str(slide_dir),
                    "NUCSEG_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0", "NUCSEG_AUTH": "disabled",
                    "NUCSEG_DEVICE": "cpu", "NUCSEG_PRECISION": "fp32", "NUCSEG_PROGRESS_INTERVAL_S": "1",
                    "OMP_NUM_THREADS": "1"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30)

    def start(self) -> None:
        self.procs.append(start_redis(self.redis_port, self.root / "redis", log_path=self.root / "redis.log"))
        self.procs.append(self._spawn([sys.executable, "-m", "cli.service", "serve", "--port", str(self.api_port),
                                       "--log-level", "warning"], "api", {}))
        wait_http(f"{self.client.base_url}/healthz", 120, self.procs[-1])

    def start_workers(self, k: int, shard_env: dict[str, str]) -> None:
        names = [f"scale-{i}@bench" for i in range(k)]
        for name in names:
            args = [sys.executable, "-m", "benchmarks.scale", "--worker", name, "--tile-ms", str(self.tile_s * 1e3)]
            self.workers.append(self._spawn(args, name.split("@")[0], shard_env))
        deadline, seen = time.monotonic() + 300, set[str]()
        while not seen >= set(names):  # /readyz names the first worker to answer its ping: collect them
            seen |= set(self.client.get("/readyz").json().get("workers", []))
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(set(names) - seen)} did not come up")
            time.sleep(0.2)

    def stop_workers(self) -> None:
        for proc in self.workers:
            stop_group(proc, 30)
        self.workers.clear()

    def stop(self) -> None:
        self.stop_workers()
        for proc in reversed(self.procs):
            stop_group(proc, 10)
        self.client.close()

    def _spawn(self, cmd: list[str], log_name: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{log_name}.log").open("ab")
        return subprocess.Popen(cmd, env={**self.env, **extra}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def submit(self, slide: str, options: dict[str, Any]) -> str:
        resp = self.client.post("/v1/jobs", json={"slide_path": slide, "options": options})
        resp.raise_for_status()
        return str(resp.json()["id"])

    def submit_upload(self, content: bytes) -> str:
        resp = self.client.post("/v1/jobs", files={"file": ("small.png", content, "image/png")},
                                data={"options": json.dumps(FAST)})
        resp.raise_for_status()
        return str(resp.json()["id"])

    def wait(self, job_id: str, timeout_s: float = 3600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = dict(self.client.get(f"/v1/jobs/{job_id}").json())
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s")

    def shards_done_at(self, job_id: str) -> float | None:
        return ShardStore(JobStore(connect(self.env["NUCSEG_REDIS_URL"]))).all_done_at(job_id)


@contextmanager
def service(slide_dir: Path, tile_s: float) -> Iterator[Service]:
    """A started service; its folder is removed after a clean run, kept (for its logs) after a failure."""
    root = Path(tempfile.mkdtemp(prefix="nucseg-scale-"))
    svc = Service(root, slide_dir, tile_s)
    try:
        svc.start()
        yield svc
    except BaseException:
        svc.stop()
        print(f"# service folder (logs): {root}", file=sys.stderr)
        raise
    svc.stop()
    shutil.rmtree(root, ignore_errors=True)


def generated_slide(side: int) -> Path:
    path = CACHE / f"scale-{side}.tiff"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_pyramid(tmp, side, side, levels=5, tissue_fraction=1.0, seed=3)
        tmp.rename(path)
    return path


def _seconds(job: dict[str, Any], start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def run_k(svc: Service, k: int, slide: Path, side: int, shard_rows: int, fairness: bool) -> dict[str, Any]:
    """One job on ``k`` fresh workers; its timings."""
    blocks_per_row = -(-side // 4 // BLOCK)
    shard_env = {"NUCSEG_SHARD_MIN_BLOCKS": "0" if k == 1 else "2",
                 "NUCSEG_SHARD_BLOCKS": str(blocks_per_row * shard_rows),
                 "NUCSEG_SHARD_PARALLEL": str(max(k, 2))}
    svc.start_workers(k, shard_env)
    try:
        options = {"mpp": STATED_MPP, "tile_size": TILE, "overlap": OVERLAP, "block_size": BLOCK,
                   "outputs": ["masks"]}
        job_id = svc.submit(slide.name, options)
        small = None
        if fairness:
            time.sleep(5)
            small = svc.submit_upload(png_bytes(64, 64, seed=9))
        job = svc.wait(job_id)
        row: dict[str, Any] = {"k": k, "wall_s": _seconds(job, "created_at", "finished_at"),
                               "shards": len(job.get("shards") or []),
                               "blocks": job["progress"]["total"]}
        done_at = svc.shards_done_at(job_id)
        if done_at is not None:
            row["merge_s"] = datetime.fromisoformat(job["finished_at"]).timestamp() - done_at
        if small is not None:
            waited = svc.wait(small)
            row["small_job_wait_s"] = _seconds(waited, "created_at", "started_at")
            row["shard_s"] = row["wall_s"] * k / max(1, row["shards"])  # a shard's time, roughly
        return row
    finally:
        svc.stop_workers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=32768, help="generated slide side, level-0 pixels")
    parser.add_argument("--tile-ms", type=float, default=150.0, help="SleepNet's time per tile")
    parser.add_argument("--ks", default="1,2,4", help="worker counts; the first is the baseline")
    parser.add_argument("--shard-rows", type=int, default=2, help="block rows per shard")
    parser.add_argument("--fairness", action="store_true", help="measure a small job's wait during K=2")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one worker
    args = parser.parse_args(argv)
    tile_s = args.tile_ms / 1e3
    if args.worker:
        return run_worker(args.worker, tile_s)
    slide = generated_slide(args.side)
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    with service(slide.parent, tile_s) as svc:
        for k in ks:
            rows.append(run_k(svc, k, slide, args.side, args.shard_rows, args.fairness and k == 2))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["wall_s"]
    print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}; slide {args.side}² (analysed at "
          f"{args.side // 4}²), {args.tile_ms:g} ms per tile, {args.shard_rows} block rows per shard", file=sys.stderr)
    parts = [f"K={r['k']} {base / r['wall_s']:.2f}" for r in rows[1:]]
    merges = [f"merge K={r['k']} {100 * r['merge_s'] / base:.1f} %" for r in rows if "merge_s" in r]
    print(f"scale: {' '.join(parts)} (speedup over K={rows[0]['k']}: {base:.1f} s; {', '.join(merges)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
