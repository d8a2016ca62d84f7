"""``nucseg serve``, ``nucseg worker``, ``nucseg redis`` and ``nucseg up``: the service, piece by piece.

``cli.main`` hooks these in with ``add_service_commands``; ``python -m cli.service`` runs
them without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import get_settings


def add_service_commands(subparsers: Any) -> None:
    """Add ``serve``, ``worker``, ``redis`` and ``up`` to an argparse subparsers object."""
    _add_serve(subparsers)
    _add_worker(subparsers)
    _add_redis(subparsers)
    _add_up(subparsers)
    _add_keys(subparsers)


# ---------------------------------------------------------------- serve


def _add_serve(subparsers: Any) -> None:
    s = get_settings()
    p = subparsers.add_parser("serve", help="run the HTTP API (uvicorn)")
    p.add_argument("--host", default=s.host, help="bind address (default: NUCSEG_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=s.port, help="port (default: NUCSEG_PORT or 8000)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from core.settings import ConfigError

    os.environ["NUCSEG_HOST"] = args.host  # the app factory checks the bind address it is served on
    get_settings.cache_clear()
    try:
        get_settings().check_api_bind(args.host)
    except ConfigError as exc:
        print(f"nucseg serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    uvicorn.run("api.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, proxy_headers=False, server_header=False)
    return 0


# ---------------------------------------------------------------- worker


def _add_worker(subparsers: Any) -> None:
    s = get_settings()
    p = subparsers.add_parser("worker", help="run a Celery worker that executes jobs")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=s.device,
                   help="inference device; cuda consumes the 'gpu' queue")
    p.add_argument("--queues", default=None, help="comma list (default: gpu for --device cuda, else cpu)")
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once (one model copy each)")
    p.add_argument("--pool", choices=["prefork", "solo", "threads"], default="prefork",
                   help="prefork keeps the main process free to answer pings while a job runs")
    p.add_argument("--hostname", default=None, help="worker name (default: nucseg-<queues>@<host>)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_worker)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The ``celery worker`` arguments for our options."""
    queues = args.queues or ("gpu" if args.device == "cuda" else "cpu")
    hostname = args.hostname or f"nucseg-{queues.replace(',', '-')}-{os.getpid()}@{socket.gethostname()}"
    return ["worker", "--loglevel", args.loglevel, "-Q", queues, "-c", str(args.concurrency),
            "-P", args.pool, "-n", hostname, "--without-gossip", "--without-mingle", "--without-heartbeat"]


def _worker(args: argparse.Namespace) -> int:
    from core.celery_app import create_celery

    os.environ["NUCSEG_DEVICE"] = args.device  # read by the task processes' settings
    get_settings.cache_clear()
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_celery(get_settings())
    app.set_default()
    app.set_current()
    app.worker_main(worker_argv(args))
    return 0


# ---------------------------------------------------------------- redis


def _add_redis(subparsers: Any) -> None:
    s = get_settings()
    p = subparsers.add_parser("redis", help="run the embedded redis-server (AOF on) in the foreground")
    p.add_argument("--port", type=int, default=s.redis_port)
    p.add_argument("--dir", type=Path, default=s.redis_dir, help="data directory (AOF file)")
    p.set_defaults(func=_redis)


def _redis(args: argparse.Namespace) -> int:
    from cli.processes import stop_group
    from cli.redis_server import start_redis

    proc = start_redis(args.port, args.dir)
    print(f"redis-server on redis://127.0.0.1:{args.port}/0, data in {args.dir} (Ctrl-C stops it)", flush=True)
    _wait_for_signal(lambda: proc.poll() is not None)
    return stop_group(proc)


def _wait_for_signal(done: Callable[[], bool]) -> None:
    """Block until SIGINT/SIGTERM arrives or ``done()`` turns true (polled)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    while not stop.wait(0.2) and not done():
        pass


# ---------------------------------------------------------------- up


def _add_up(subparsers: Any) -> None:
    p = subparsers.add_parser("up", help="Redis (if needed), one worker and the API on 127.0.0.1; Ctrl-C stops all")
    p.add_argument("--port", type=int, default=None, help="API port (default: NUCSEG_PORT or 8000)")
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from cli.up import run_stack

    return run_stack(api_port=args.port)


# ---------------------------------------------------------------- keys


def _add_keys(subparsers: Any) -> None:
    p = subparsers.add_parser("keys", help="make an API key (and webhook secret) for a tenant")
    sub = p.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser("new", help="print a new key once, and the tenants-file entry that holds its hash")
    new.add_argument("tenant", help="tenant name (lowercase letters, digits, - and _)")
    new.set_defaults(func=_keys_new)


def _keys_new(args: argparse.Namespace) -> int:
    import base64
    import json
    import re
    import secrets

    from core.settings import TENANT_PATTERN, hash_api_key

    if not re.fullmatch(TENANT_PATTERN, args.tenant):
        print(f"nucseg keys new: tenant name {args.tenant!r} must match {TENANT_PATTERN}", file=sys.stderr)
        return 2
    key = "nsk_" + secrets.token_urlsafe(32)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    entry = {args.tenant: {"keys": [hash_api_key(key)], "webhook_secret": secret}}
    print(f"API key for tenant {args.tenant!r} (shown once; the server keeps only its sha256):\n  {key}\n")
    print("Merge this into NUCSEG_TENANTS_FILE (or NUCSEG_TENANTS):")
    print(json.dumps(entry, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nucseg", description="nucseg service commands")
    add_service_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
