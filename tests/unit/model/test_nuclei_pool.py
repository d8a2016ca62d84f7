"""Nuclei post-processing in worker processes: the same features as in-process, and a dead worker fails the run."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F

from model.engine import EngineOptions
from model.errors import OptionsError, PostprocessError
from model.nuclei_pool import _Segments, _views
from model.pipeline import predict_reader
from model.readers import ArrayReader, open_slide
from tests.helpers.samples import sample
from tests.helpers.stubs import TrivialNet, loaded

CROP = 640  # level-0 px of the 20x sample: 1280 analysis px at 0.25 µm/px


def _nuclear(x: torch.Tensor) -> torch.Tensor:
    """Dark = nucleus; its 2 px erosion = inside, the rest of it = boundary (background logit 0.5)."""
    dark = 1.0 - x.mean(dim=1, keepdim=True)
    core = -F.max_pool2d(-dark, 5, stride=1, padding=2)
    return torch.cat((torch.full_like(dark, 0.5), core, dark - 0.02), dim=1)


@pytest.fixture(scope="module")
def region() -> ArrayReader:
    reader = open_slide(sample("cmu_small_region.svs"))
    try:
        w, h = reader.level_dimensions[0]
        pixels = reader.read_region(0, (w - CROP) // 2, (h - CROP) // 2, CROP, CROP)
        return ArrayReader(pixels, mpp=reader.mpp)
    finally:
        reader.close()


def _run(reader: ArrayReader, out: Path, workers: int, **kwargs: object) -> dict:
    options = EngineOptions(block_size=384, precision="fp32", device="cpu", workers=workers)
    stats = predict_reader(reader, out, loaded(TrivialNet(_nuclear)), options, outputs=frozenset({"nuclei"}),
                           **kwargs)  # type: ignore[arg-type]
    return dict(stats["nuclei"])


def _text(path: Path) -> str:
    """The GeoJSON file's bytes, each id's per-file random prefix blanked."""
    return re.sub(r'"id":"[0-9a-f-]{24}', '"id":"', path.read_text())


def _features(path: Path) -> list[dict]:
    features = json.loads(path.read_text())["features"]
    for f in features:
        f["id"] = f["id"][-12:]  # the per-file random prefix differs, the counter must not
    return features


def test_worker_counts_give_the_serial_features(region: ArrayReader, tmp_path: Path) -> None:
    serial = _run(region, tmp_path / "serial", workers=0)
    assert serial["count"] > 200 and serial["workers"] == 0
    expected = _features(tmp_path / "serial" / "nuclei.geojson")
    text = _text(tmp_path / "serial" / "nuclei.geojson")
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        stats = _run(region, out, workers=workers)
        assert stats["workers"] == workers
        assert _features(out / "nuclei.geojson") == expected, f"{workers} workers"
        assert _text(out / "nuclei.geojson") == text, f"{workers} workers: the same bytes"
        assert {k: v for k, v in stats.items() if k not in ("timings", "workers")} == \
            {k: v for k, v in serial.items() if k not in ("timings", "workers")}


def _pool_processes(engine: psutil.Process | None = None) -> list[psutil.Process]:
    """The engine process's nuclei processes: its fork server's children (or, spawned, its own)."""
    engine = engine or psutil.Process()
    children = engine.children()
    servers = [p for p in children if "forkserver" in " ".join(p.cmdline())]
    found = [w for s in servers for w in s.children()] + [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    return [p for p in found if p.status() != psutil.STATUS_ZOMBIE]  # an earlier run's, not yet reaped


def _killer(seen: list[psutil.Process]) -> Any:
    def kill_a_worker(done: int, total: int) -> None:
        """Progress callback: after the second block, SIGKILL one pool process (as the OOM killer would)."""
        if done != 2:
            return
        seen.extend(_pool_processes())
        assert seen, "no pool process to kill"
        os.kill(seen[0].pid, signal.SIGKILL)
    return kill_a_worker


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def test_a_dead_worker_fails_the_run_without_partial_results(region: ArrayReader, tmp_path: Path) -> None:
    before, workers = _segments(), []
    with pytest.raises(PostprocessError, match="worker process died"):
        _run(region, tmp_path, workers=2, on_progress=_killer(workers))
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no GeoJSON, partial or not"
    assert workers, "the run had worker processes"  # one or two: the pool starts them as blocks queue up
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers left: {alive}"
    assert _segments() <= before, "shared-memory blocks left behind"


def _workers_in_daemon(out: Any) -> None:
    from model.nuclei import nuclei_workers

    try:
        nuclei_workers(2)
        refused = ""
    except OptionsError as exc:
        refused = str(exc)
    out.put((nuclei_workers(None), refused))


def test_a_daemonic_process_post_processes_in_process() -> None:
    """A Celery prefork pool process is daemonic: it may not start the pool, so the default is none."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_workers_in_daemon, args=(out,), daemon=True)
    child.start()
    workers, refused = out.get(timeout=60)
    child.join(timeout=60)
    assert workers == 0
    assert "daemonic" in refused and "workers=0" in refused


POOL_CHILD = r"""
import sys, time
from model.nuclei_pool import NucleiPool
pool = NucleiPool(2)
list(pool._executor.map(time.sleep, [0, 0]))  # both processes up
print(" ".join(str(p) for p in pool._executor._processes), flush=True)
time.sleep(600)
"""


def test_pool_processes_die_with_the_engines_process() -> None:
    """The engine's process killed outright (OOM killer, SIGKILL): its nuclei processes follow it."""
    child = psutil.Popen([sys.executable, "-c", POOL_CHILD], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[3])
    try:
        assert child.stdout is not None
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    finally:
        child.kill()
        child.wait(timeout=30)
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
    assert not alive, f"pool processes outlived the engine's process: {alive}"


MAIN_WITH_TORCH = r"""
import sys
import numpy as np
import psutil
import torch  # a host program that imports torch at its top
from model.nuclei_pool import NucleiPool
from model.postprocess import BlockPlace, PostprocessParams
from model.tiling import Box

if __name__ == "__main__":
    box = Box(0, 0, 256, 256)
    pool = NucleiPool(2)
    for index in range(3):
        pool.submit(index, BlockPlace(box, box, box, 0.25, 1.0, PostprocessParams()),
                    np.zeros((256, 256), np.uint8), np.zeros((6, 256, 256), np.uint8))
    list(pool.drain())
    children = psutil.Process().children()  # the fork server (with its workers), or spawned workers
    workers = children + [w for p in children for w in p.children()]
    print(len(workers), sum(any("libtorch" in m.path for m in p.memory_maps()) for p in workers), flush=True)
    pool.close()
"""


def test_workers_do_not_run_the_host_programs_main_module(tmp_path: Path) -> None:
    """``multiprocessing`` would run a script's ``__main__`` again in the fork server or in each spawned
    worker: with torch imported there, every worker would load torch (seconds of CPU each)."""
    script = tmp_path / "host.py"
    script.write_text(MAIN_WITH_TORCH)
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, check=True)
    workers, with_torch = (int(v) for v in out.stdout.split())
    assert workers >= 1
    assert with_torch == 0, f"{with_torch} of {workers} workers loaded torch"


def test_segments_are_reused_and_all_unlinked_at_close() -> None:
    before = _segments()
    segments = _Segments()
    small, big = np.full((8, 8), 1, np.uint8), np.full((16, 16), 2, np.uint8)
    first, maps = segments.put(small, np.zeros((6, 8, 8), np.uint8))
    segments.give(first)
    again, _ = segments.put(small, np.ones((6, 8, 8), np.uint8))
    assert again.name == maps.name, "a free segment that fits is reused"
    ternary, probs = _views(again, (6, 8, 8))
    assert (ternary == 1).all() and (probs == 1).all()
    del ternary, probs
    segments.give(again)
    _, grown_maps = segments.put(big, np.zeros((6, 16, 16), np.uint8))
    assert grown_maps.name != maps.name and maps.name not in _segments(), "the one too small is unlinked"
    assert grown_maps.name in _segments()
    segments.close()
    assert _segments() <= before, "shared-memory blocks left behind"


KEEP_CHILD = r"""
import resource, statistics, sys
from benchmarks.pipeline import block_inputs
from model.nuclei_pool import _keep_freed_memory
from model.postprocess import block_nuclei
place, ternary, probs = block_inputs()
if sys.argv[1] == "keep":
    _keep_freed_memory()
faults = []
for _ in range(8):  # the same block, as a worker meets block after block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block_nuclei(place, ternary, probs)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[2:]))  # a block's faults once warm: the median, as the allocator hiccups now and then
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_workers_keep_freed_memory_for_the_next_block() -> None:
    """A worker's freed arrays serve its next block (measured: 1,700-9,300 pages faulted in again per 2,048 px
    block without, varying with the allocator's history; a median of 0-3 with, single blocks up to 800)."""
    def faults(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", KEEP_CHILD, mode], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[3], check=True)
        return float(proc.stdout.strip())

    # Whether glibc's defaults return the memory depends on the allocator's history (its dynamic mmap
    # threshold, the arenas threads got): a default process kept it in one full-suite run of many. The
    # baseline is the first of up to three default processes that returns it.
    default = 0.0
    for _ in range(3):
        default = faults("default")
        if default > 300:
            break
    keep = faults("keep")
    assert default > 300, "freed memory no longer goes back to the system: the test no longer tells"
    assert keep < default / 10, (keep, default)
