"""The benchmarks' measure counts CPU time by thread, a pool's threads as one, and of every descendant process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks.common import measured


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_time_is_counted_by_thread_name() -> None:
    run = threading.Thread.run
    with measured() as m:
        workers = [threading.Thread(target=_spin, args=(0.5,), name=f"busy_{i}") for i in range(2)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        time.sleep(0.3)  # idle: no CPU for the main thread
    assert m.thread_cpu["busy"] == pytest.approx(1.0, abs=0.05)
    assert m.thread_cpu.get("MainThread", 0.0) < 0.2
    assert threading.Thread.run is run  # unwrapped again


GRANDPARENT = r"""
import subprocess, sys, time
spin = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
subprocess.run([sys.executable, "-c", spin], check=True)  # a grandchild, waited for by its parent
print("done", flush=True)
time.sleep(60)  # the parent lives on: no one has waited for it
"""


def test_cpu_time_of_descendants_counts_those_still_running_and_their_ended_children() -> None:
    """A fork server's workers are its children: their CPU time counts though this process never waits for them."""
    with measured() as m:
        child = subprocess.Popen([sys.executable, "-c", GRANDPARENT], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "done"
        finally:
            child.kill()  # still running when the measure ends
    child.wait()
    assert m.children_cpu >= 0.5
    assert m.cpu_seconds >= m.children_cpu


SPIKE = r"""
import numpy as np
from benchmarks.common import measured
with measured() as m:
    start = m.peak_rss
    spike = np.ones(400 << 20, np.uint8)  # 400 MiB, touched, freed at once
    del spike
print(m.peak_rss - start)
"""


def test_peak_rss_counts_a_short_spike() -> None:
    """A block's allocations freed before the sampler looks still count (a fresh process's lifetime peak)."""
    out = subprocess.run([sys.executable, "-c", SPIKE], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert int(out.stdout.strip()) >= 380 << 20
