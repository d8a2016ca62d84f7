"""For the process running a job: its lease (kept alive from a thread), its owner token, and a
throttle for progress writes."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable

import redis

from core.store import JobStore

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Keeps a job's lease (or, given ``renew``, a shard's) alive from a daemon thread while it runs here."""

    def __init__(self, store: JobStore, job_id: str, token: str, ttl_s: float,
                 renew: Callable[[], bool] | None = None) -> None:
        self.store, self.job_id, self.token, self.ttl_s = store, job_id, token, ttl_s
        self._renew = renew or (lambda: store.renew(job_id, token, ttl_s))
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self._renew():
                    log.warning("job %s: lease lost; stopping at the next block", self.job_id)
                    self.lost.set()
                    return
            except redis.RedisError as exc:  # keep trying: the lease outlives short outages
                log.warning("job %s: lease renewal failed: %s", self.job_id, exc)


class Throttle:
    """True at most once per ``interval_s`` (and always when forced)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.clock, self._last = interval_s, clock, -float("inf")

    def ready(self, *, force: bool = False) -> bool:
        t = self.clock()
        if force or t - self._last >= self.interval_s:
            self._last = t
            return True
        return False


def new_token(worker: str) -> str:
    """A unique owner token for one attempt of one job: ``worker:pid:random``."""
    return f"{worker}:{os.getpid()}:{secrets.token_hex(6)}"


def dead_local_owner(token: str, worker: str) -> bool:
    """True when ``token`` belongs to a process of this same worker that no longer exists.

    A prefork pool child killed mid-job (say by the OOM killer) has its message requeued at once
    (``reject_on_worker_lost``); this lets the next child take the job over without waiting for
    the dead child's lease to expire.
    """
    owner, _, _random = token.rpartition(":")
    owner, _, pid_text = owner.rpartition(":")
    if owner != worker or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
