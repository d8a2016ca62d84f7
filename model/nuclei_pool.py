"""Blocks' nuclei post-processing in worker processes, results in block order.

A block's nuclei maps (uint8 ternary argmax and probabilities, 7 bytes per pixel) go to a worker
through shared memory (one copy, no pickling of the arrays); the worker runs ``block_nuclei`` and
sends back only the owned nuclei (rings, classes, areas). At most ``workers + 1`` blocks are in
flight, so memory stays bounded and a slow pool holds the engine back. Segments are reused from
block to block, and workers keep theirs mapped: a new 33 MB segment a block cost 20 times the copy
into it, in pages the system zeroes and maps one by one. A worker that dies or
raises fails the run with ``PostprocessError``; nothing of the blocks still in flight is recorded.

Workers are forked from a ``forkserver`` process (``spawn`` where there is none), which imports
this module once (numpy, scipy, scikit-image, OpenCV, shapely; no torch): a run's workers start in
milliseconds instead of each importing them (0.5 CPU seconds a worker), and later runs of the same
process fork from the same server. Workers neither inherit the engine's threads nor pay for torch.
The server starts without the host program's ``__main__`` module, which ``multiprocessing`` would
otherwise run again in it: for a script that imports torch at its top, two ``spawn`` workers spent
8 CPU seconds starting instead of 0.8 (benchmarks/RESULTS.md, "Host ceiling").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.forkserver
import os
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import cv2
import numpy as np

from model.errors import PostprocessError
from model.geojson import FeatureStyle, block_features
from model.postprocess import BlockNuclei, BlockPlace, block_nuclei

PARENT_POLL_S = 0.5  # how often a worker checks that the engine's process still lives
_DIED = "a nuclei post-processing worker process died (killed, or out of memory?) {when}; the run is stopped"


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class _Maps:
    """Where a block's maps lie in a shared-memory segment: the ternary argmax, then the probabilities."""

    name: str
    probs_shape: tuple[int, int, int]


class _Segments:
    """Shared-memory segments for blocks in flight, reused: ``put`` copies a block's maps into a free one
    that fits (or a new one, in place of a free one too small), ``give`` returns it once its block is
    done, ``close`` unlinks all."""

    def __init__(self) -> None:
        self._free: list[SharedMemory] = []
        self._all: dict[str, SharedMemory] = {}

    def put(self, ternary: np.ndarray, probs: np.ndarray) -> tuple[SharedMemory, _Maps]:
        """A segment holding a copy of the block's maps, and where they lie in it."""
        shm = self._take(ternary.nbytes + probs.nbytes)
        ter, prob = _views(shm, probs.shape)
        np.copyto(ter, ternary, casting="no")
        np.copyto(prob, probs, casting="no")
        return shm, _Maps(shm.name, probs.shape)

    def _take(self, size: int) -> SharedMemory:
        fits = [shm for shm in self._free if shm.size >= size]
        if fits:
            shm = min(fits, key=lambda f: f.size)
            self._free.remove(shm)
            return shm
        if self._free:  # keep the count bounded: a free segment too small makes room for the new one
            self._drop(min(self._free, key=lambda f: f.size))
        shm = SharedMemory(create=True, size=size)
        self._all[shm.name] = shm
        return shm

    def give(self, shm: SharedMemory) -> None:
        self._free.append(shm)

    def _drop(self, shm: SharedMemory) -> None:
        self._free.remove(shm)
        del self._all[shm.name]
        _release(shm)

    def close(self) -> None:
        for shm in self._all.values():
            _release(shm)
        self._free.clear()
        self._all.clear()


def _views(shm: SharedMemory, probs_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    ternary = np.ndarray(probs_shape[1:], dtype=np.uint8, buffer=shm.buf)
    probs = np.ndarray(probs_shape, dtype=np.uint8, buffer=shm.buf, offset=ternary.nbytes)
    return ternary, probs


def _init_worker() -> None:
    _release_server()
    cv2.setNumThreads(1)  # one block per process: the pool is the parallelism
    _keep_freed_memory()
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="nucseg-parent-watch", daemon=True).start()


def _release_server() -> None:
    """Forked by the fork server, a worker holds (as any client of the server does) the pipe end that
    keeps the server running: closed here, so the server exits with the engine's process, and the
    workers with the server (``_watch_parent``). The descriptor is ``multiprocessing.forkserver``'s own
    attribute (CPython 3.11); there is none under ``spawn``."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if server is not None and fd is not None:
        with suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest: arrays up to this size come from the reused heap
TRIM_THRESHOLD = 1 << 30  # freed heap kept: one block's arrays, freed, serve the next


def _keep_freed_memory() -> None:
    """Worker side: glibc keeps freed memory for the next block instead of returning it to the system.

    Every block allocates region-sized arrays (labels, casts, masks); returned and mapped again, their
    pages are zeroed and faulted in one by one: measured 130,000 page faults and 0.3 s of the
    workers' CPU per 8,192² px slide, about 3 % of the host ceiling. The heap stays at the largest
    block's working set. Nothing is done where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own allocator's defaults
        return


def _watch_parent(parent: int) -> None:
    """Die with the process that started this one, never outlive it: the engine's process, or the fork
    server, which exits as soon as the engine's process is gone. (Not ``PR_SET_PDEATHSIG``: that fires
    when the *thread* that started the process ends, and the pool is started from the engine's sink
    thread.)"""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


_ATTACHED: dict[str, SharedMemory] = {}  # worker side: the segments this process has mapped, newest last
_KEEP_ATTACHED = 4  # more than a worker meets in turn (workers + 1 segments in flight, rarely one replaced)


def _run(place: BlockPlace, maps: _Maps, style: FeatureStyle | None) -> BlockNuclei:
    """Worker side: post-process a block from its segment (kept mapped; the parent unlinks it), and with a
    ``style`` write its nuclei's GeoJSON text here too, off the engine's sink thread."""
    ternary, probs = _views(_attach(maps.name), maps.probs_shape)
    result = block_nuclei(place, ternary, probs)
    if style is not None:
        t0 = time.perf_counter()
        result.features = block_features(result, style)
        result.timings["geojson_s"] = time.perf_counter() - t0
    return result


def _attach(name: str) -> SharedMemory:
    shm = _ATTACHED.pop(name, None) or SharedMemory(name=name)
    _ATTACHED[name] = shm
    while len(_ATTACHED) > _KEEP_ATTACHED:
        with suppress(BufferError):  # a view still alive: unmapped when it is collected
            _ATTACHED.pop(next(iter(_ATTACHED))).close()
    return shm


class NucleiPool:
    """``submit`` blocks; their ``BlockNuclei`` come back in submission order."""

    def __init__(self, workers: int, style: FeatureStyle | None = None) -> None:
        self.workers, self.style = workers, style
        self.limit = workers + 1  # each block in flight holds its region's maps in shared memory
        self._executor = ProcessPoolExecutor(workers, mp_context=_start_context(), initializer=_init_worker)
        self._pending: deque[tuple[int, Future[BlockNuclei], SharedMemory]] = deque()
        self._segments = _Segments()

    def submit(self, index: int, place: BlockPlace, ternary: np.ndarray, probs: np.ndarray) -> list[BlockNuclei]:
        """Queue block ``index``; return the leading results done by now (waiting for those over the bound)."""
        done = [self._pop() for _ in range(len(self._pending) - self.limit + 1)]
        shm, maps = self._segments.put(ternary, probs)
        try:
            with _without_main():  # the executor starts its processes as blocks are submitted
                future = self._executor.submit(_run, place, maps, self.style)
        except BrokenProcessPool as exc:
            self._segments.give(shm)
            raise PostprocessError(_DIED.format(when=f"before block {index} was queued")) from exc
        self._pending.append((index, future, shm))
        while self._pending and self._pending[0][1].done():
            done.append(self._pop())
        return done

    def drain(self) -> Iterator[BlockNuclei]:
        """Every remaining result, waiting for each."""
        while self._pending:
            yield self._pop()

    def _pop(self) -> BlockNuclei:
        index, future, shm = self._pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise PostprocessError(_DIED.format(when=f"while block {index} was in flight")) from exc
        except Exception as exc:
            raise PostprocessError(f"nuclei post-processing failed on block {index}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._segments.give(shm)

    def close(self) -> None:
        """Stop the workers, without waiting for blocks still in flight (they are forgotten), and
        unlink every segment."""
        self._executor.shutdown(wait=not self._pending, cancel_futures=True)
        self._pending.clear()
        self._segments.close()


def _start_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` preloading this module where the platform has it, else ``spawn``."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # takes effect when the server starts
    return context


def start_server() -> None:
    """Start the fork server now, so that it imports its libraries while the engine opens the slide
    (its workers then fork at once). Nothing to do under ``spawn``, or once started."""
    if _start_context().get_start_method() == "forkserver":
        with _without_main():
            multiprocessing.forkserver.ensure_running()


@contextmanager
def _without_main() -> Iterator[None]:
    """Processes spawned meanwhile do not import this program's ``__main__`` module (``multiprocessing``
    runs it again in each child when it has a name or a file; a bare module has neither)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _release(shm: SharedMemory) -> None:
    shm.close()
    shm.unlink()
