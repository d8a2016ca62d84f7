"""What a worker process holds once: its job store (Redis pool) and the loaded model."""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from core.redis_client import connect
from core.settings import Settings, get_settings
from core.store import JobStore

if TYPE_CHECKING:
    from model.checkpoint import LoadedModel

log = logging.getLogger(__name__)


_stores: dict[int, JobStore] = {}


def process_store(settings: Settings | None = None) -> JobStore:
    """One store (and Redis connection pool) per process; rebuilt after a fork."""
    pid = os.getpid()
    if pid not in _stores:
        url = (settings or get_settings()).broker_url
        _stores.clear()
        _stores[pid] = JobStore(connect(url))
    return _stores[pid]


_model_lock = threading.Lock()


def get_model(path: str, sha256: str | None) -> LoadedModel:
    """The checkpoint, loaded once per process, and announced in the store for ``/v1/models``."""
    with _model_lock:
        return _load_model(path, sha256)


@lru_cache(maxsize=2)
def _load_model(path: str, sha256: str | None) -> LoadedModel:
    from model.checkpoint import load_model

    started = time.perf_counter()
    model = load_model(path, expected_sha256=sha256)
    seconds = time.perf_counter() - started
    log.info("loaded model %s (%s) in %.1f s", Path(path).name, model.sha256[:12], seconds)
    info = {"sha256": model.sha256, "file": model.path.name, "format": model.format,
            "card": model.card.public(), "loaded_at": time.time(), "worker": os.uname().nodename}
    try:
        process_store().metrics.publish_model(model.sha256, info)
    except redis.RedisError as exc:
        log.warning("could not publish the model card: %s", exc)
    return model
