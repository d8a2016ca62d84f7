"""The benchmarks' measure counts CPU time by thread, a pool's threads as one."""

from __future__ import annotations

import threading
import time

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
