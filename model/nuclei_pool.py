"""Blocks' nuclei post-processing in worker processes, results in block order.

A block's nuclei maps (uint8 ternary argmax and probabilities, 7 bytes per pixel) go to a worker
through shared memory (one copy, no pickling of the arrays); the worker runs ``block_nuclei`` and
sends back only the owned nuclei (rings, classes, areas). At most ``workers + 1`` blocks are in
flight, so memory stays bounded and a slow pool holds the engine back. A worker that dies or
raises fails the run with ``PostprocessError``; nothing of the blocks still in flight is recorded.

Workers are started with ``spawn`` and import this module only (numpy, scipy, scikit-image,
OpenCV, shapely; no torch), so they neither inherit the parent's threads nor pay for torch. They
start without the host program's ``__main__`` module, which ``spawn`` would otherwise run again in
each of them: for a script that imports torch at its top, two workers spent 8 CPU seconds starting
instead of 0.8 (benchmarks/RESULTS.md, "Host ceiling").
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import cv2
import numpy as np

from model.errors import PostprocessError
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


def _put(ternary: np.ndarray, probs: np.ndarray) -> tuple[SharedMemory, _Maps]:
    shm = SharedMemory(create=True, size=ternary.nbytes + probs.nbytes)
    ter, prob = _views(shm, probs.shape)
    np.copyto(ter, ternary, casting="no")
    np.copyto(prob, probs, casting="no")
    return shm, _Maps(shm.name, probs.shape)


def _views(shm: SharedMemory, probs_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    ternary = np.ndarray(probs_shape[1:], dtype=np.uint8, buffer=shm.buf)
    probs = np.ndarray(probs_shape, dtype=np.uint8, buffer=shm.buf, offset=ternary.nbytes)
    return ternary, probs


def _init_worker(parent: int) -> None:
    cv2.setNumThreads(1)  # one block per process: the pool is the parallelism
    threading.Thread(target=_watch_parent, args=(parent,), name="nucseg-parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Die with the engine's process, never outlive it. (Not ``PR_SET_PDEATHSIG``: that fires when the
    *thread* that started the process ends, and the pool is started from the engine's sink thread.)"""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _run(place: BlockPlace, maps: _Maps) -> BlockNuclei:
    """Worker side: attach, post-process, detach (the parent unlinks the segment)."""
    shm = SharedMemory(name=maps.name)
    try:
        ternary, probs = _views(shm, maps.probs_shape)
        result = block_nuclei(place, ternary, probs)
        del ternary, probs
        return result
    finally:
        shm.close()


class NucleiPool:
    """``submit`` blocks; their ``BlockNuclei`` come back in submission order."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.limit = workers + 1  # each block in flight holds its region's maps in shared memory
        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(os.getpid(),))
        self._pending: deque[tuple[int, Future[BlockNuclei], SharedMemory]] = deque()

    def submit(self, index: int, place: BlockPlace, ternary: np.ndarray, probs: np.ndarray) -> list[BlockNuclei]:
        """Queue block ``index``; return the leading results done by now (waiting for those over the bound)."""
        done = [self._pop() for _ in range(len(self._pending) - self.limit + 1)]
        shm, maps = _put(ternary, probs)
        try:
            with _without_main():  # the executor starts its processes as blocks are submitted
                future = self._executor.submit(_run, place, maps)
        except BrokenProcessPool as exc:
            _release(shm)
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
            _release(shm)

    def close(self) -> None:
        """Stop the workers, without waiting for blocks still in flight (they are forgotten)."""
        self._executor.shutdown(wait=not self._pending, cancel_futures=True)
        while self._pending:
            _release(self._pending.popleft()[2])


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
