"""Shared benchmark helpers: peak-RSS sampling, timing, a cropped reader, machine description, a
count option's type."""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import psutil
import torch

from model.readers import SlideReader

T = TypeVar("T")


@dataclass
class Measure:
    seconds: float = 0.0
    peak_rss: int = 0
    cpu_seconds: float = 0.0  # user + system, all threads and all descendant processes
    minor_faults: int = 0  # likewise
    thread_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by thread name
    children_cpu: float = 0.0  # CPU seconds of the descendant processes
    extra: dict[str, float] = field(default_factory=dict)


RSS_SAMPLE_S = 0.025


def _max_rss() -> int:
    """This process's peak RSS so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _usage() -> tuple[float, float, int]:
    """CPU seconds so far of this process and of all its descendants, ended or running (a fork server's
    workers are its children, not ours), and their minor page faults."""
    own, ended = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, faults = ended.ru_utime + ended.ru_stime, ended.ru_minflt
    for proc in psutil.Process().children(recursive=True):
        with suppress(OSError):  # ended meanwhile: its waiting parent counts it
            seconds, minflt = _proc_usage(proc.pid)
            cpu, faults = cpu + seconds, faults + minflt
    return own.ru_utime + own.ru_stime, cpu, own.ru_minflt + faults


def _proc_usage(pid: int) -> tuple[float, int]:
    """CPU seconds and minor page faults of a running process and of its ended, waited-for children,
    from ``/proc/<pid>/stat`` (fields 10-11 and 14-17, after the command's closing parenthesis)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    minflt, cminflt, utime, stime, cutime, cstime = (int(fields[i]) for i in (7, 8, 11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK"), minflt + cminflt


class _ThreadClock:
    """CPU seconds of the calling thread and of the threads that start and end while it counts, by
    thread name with a trailing ``_<n>`` dropped (a pool's threads count as one). Each ending thread
    reads its own clock (``Thread.run`` is wrapped meanwhile); threads started before, still running
    at the end, or whose class overrides ``run`` are not counted."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._lock = threading.Lock()
        self._run = threading.Thread.run
        self._caller = threading.current_thread().name
        self._caller_start = time.thread_time()
        clock, original = self, self._run

        def run(thread: threading.Thread) -> None:
            try:
                original(thread)
            finally:
                clock._add(thread.name, time.thread_time())

        threading.Thread.run = run  # type: ignore[method-assign,assignment]

    def stop(self) -> dict[str, float]:
        """Stop counting; the totals, largest first."""
        threading.Thread.run = self._run  # type: ignore[method-assign]
        self._add(self._caller, time.thread_time() - self._caller_start)
        return dict(sorted(self.totals.items(), key=lambda kv: -kv[1]))

    def _add(self, name: str, seconds: float) -> None:
        stem, _, n = name.rpartition("_")
        key = stem if stem and n.isdigit() else name
        with self._lock:
            self.totals[key] = self.totals.get(key, 0.0) + seconds


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next peak starts low."""
    gc.collect()
    with suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def measured() -> Iterator[Measure]:
    """Wall time, peak process RSS, CPU time and page faults of the enclosed block, and its CPU time
    by thread and in child processes.

    The peak RSS is the process's lifetime peak (``ru_maxrss``, exact) when the block raised it, else
    the largest RSS sampled every ``RSS_SAMPLE_S`` (a sampler every 5 ms cost 0.2-0.3 CPU seconds of
    a 15 s run, taken from what it measured).

    CPU time is far steadier than wall time on a shared machine: an A/B that moves the work a run
    does shows there first; by thread it says which part of the pipeline does the work (stage clocks
    count the time a thread waits for the cores too)."""
    release_memory()
    proc = psutil.Process()
    result = Measure(peak_rss=proc.memory_info().rss)
    lifetime_peak = _max_rss()
    stop = threading.Event()
    clock = _ThreadClock()

    def sample() -> None:
        while not stop.is_set():
            result.peak_rss = max(result.peak_rss, proc.memory_info().rss)
            stop.wait(RSS_SAMPLE_S)

    thread = threading.Thread(target=sample, name="benchmark-sampler", daemon=True)
    thread.start()
    started, (own0, children0, faults0) = time.perf_counter(), _usage()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - started
        own1, children1, faults1 = _usage()
        result.cpu_seconds = own1 - own0 + children1 - children0
        result.children_cpu, result.minor_faults = children1 - children0, faults1 - faults0
        stop.set()
        thread.join()
        result.thread_cpu = clock.stop()
        result.peak_rss = max(result.peak_rss, proc.memory_info().rss)
        if _max_rss() > lifetime_peak:  # a new lifetime peak: this block's
            result.peak_rss = max(result.peak_rss, _max_rss())


def timed(fn: Callable[[], T]) -> tuple[T, Measure]:
    with measured() as m:
        out = fn()
    return out, m


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with suppress(OSError), open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM{gpu}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


class CropReader:
    """A level-0 window of another reader, presented as a single-level slide."""

    def __init__(self, reader: SlideReader, l0_x: int, l0_y: int, width: int, height: int) -> None:
        self._reader, self._x, self._y = reader, l0_x, l0_y
        self.name = f"{reader.name}[{l0_x},{l0_y},{width}x{height}]"
        self.format = reader.format
        self.mpp = reader.mpp
        self.level_dimensions: tuple[tuple[int, int], ...] = ((width, height),)
        self.level_downsamples: tuple[float, ...] = (1.0,)

    def read_region(self, level: int, l0_x: int, l0_y: int, w: int, h: int) -> np.ndarray:
        return self._reader.read_region(0, self._x + l0_x, self._y + l0_y, w, h)

    def close(self) -> None:
        return None


def stage_text(timings: dict[str, float]) -> str:
    """The engine's stage clocks as ``read 1.0, forward 2.0, ...``."""
    return ", ".join(f"{k} {v:.1f}" for k, v in timings.items())


def mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def count(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1 (how many runs)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
