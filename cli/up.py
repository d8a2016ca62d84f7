"""``make up`` (``python -m cli.up``) and ``nucseg up``: Redis, one worker and the API on 127.0.0.1.

Redis is ``NUCSEG_REDIS_URL`` when set, else the embedded redis-server on ``NUCSEG_REDIS_PORT``
with its AOF under ``<data_dir>/redis`` (reused if one already answers there).

Each piece runs as its own process group, so Ctrl-C reaches only this launcher, which then stops
them in order: the API (no new jobs), the worker (given ``WORKER_GRACE_S`` to finish or give back
its job; a job cut short is recovered at the next start), then Redis (which syncs its AOF).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from cli.processes import stop_group
from cli.redis_server import ping, start_redis
from core.settings import REPO_ROOT, Settings, get_settings

API_GRACE_S = 10.0
WORKER_GRACE_S = 15.0
START_TIMEOUT_S = 120.0
SAMPLE = REPO_ROOT / ".cache" / "samples" / "cmu_small_region.svs"


def run_stack(api_port: int | None = None) -> int:
    """Run until Ctrl-C (or SIGTERM); returns 0 after a clean stop, 1 if a piece died on its own."""
    env = dict(os.environ)
    auth_note = _default_auth(env)
    settings = get_settings()
    port = api_port or settings.port
    stop = _install_stop_handlers()
    redis_proc = _ensure_redis(settings, env)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        children.append(("worker", _spawn(["worker"], env)))
        children.append(("api", _spawn(["serve", "--host", "127.0.0.1", "--port", str(port)], env)))
        _wait_healthy(f"http://127.0.0.1:{port}/healthz", children, stop)
        if not stop.is_set():
            print(banner(port, settings) + auth_note, flush=True)
        died = _wait(children, stop)
    finally:
        _shutdown(children, redis_proc)
    if died:
        print(f"nucseg up: the {died} process exited on its own; stopped everything", file=sys.stderr)
        return 1
    print("nucseg up: stopped API, worker and Redis", flush=True)
    return 0


def _default_auth(env: dict[str, str]) -> str:
    """Without configured keys, ``make up`` serves 127.0.0.1 with auth disabled; says which it is."""
    configured = any(k in env for k in ("NUCSEG_AUTH", "NUCSEG_TENANTS", "NUCSEG_TENANTS_FILE"))
    if not configured:
        env["NUCSEG_AUTH"] = os.environ["NUCSEG_AUTH"] = "disabled"
        get_settings.cache_clear()
    if get_settings().auth == "disabled":
        return ("  auth:    DISABLED (loopback only; every caller is tenant 'default'). Set "
                "NUCSEG_TENANTS_FILE to require API keys (`nucseg keys new TENANT`).\n")
    tenants = len(get_settings().tenant_table)
    return f"  auth:    API keys required ({tenants} tenant(s) configured).\n"


def _install_stop_handlers() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    return stop


def _ensure_redis(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Start the embedded redis-server unless a URL is configured or one already answers."""
    if settings.redis_url:
        print(f"nucseg up: using Redis at {settings.redis_url}", flush=True)
        return None
    url = settings.broker_url
    env["NUCSEG_REDIS_URL"] = url
    if ping(url):
        print(f"nucseg up: a Redis already answers at {url}; using it", flush=True)
        return None
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    proc = start_redis(settings.redis_port, settings.redis_dir, log_path=logs / "redis.log")
    print(f"nucseg up: started redis-server at {url} (AOF in {settings.redis_dir})", flush=True)
    return proc


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cli.service", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, start_new_session=True)


def _wait_healthy(url: str, children: list[tuple[str, subprocess.Popen[bytes]]],
                  stop: threading.Event) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        if any(proc.poll() is not None for _, proc in children):
            return
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        stop.wait(0.25)


def _wait(children: list[tuple[str, subprocess.Popen[bytes]]], stop: threading.Event) -> str | None:
    """Until a stop signal (returns None) or a child exits (returns its name)."""
    while not stop.wait(0.25):
        for name, proc in children:
            if proc.poll() is not None:
                return name
    return None


def _shutdown(children: list[tuple[str, subprocess.Popen[bytes]]],
              redis_proc: subprocess.Popen[bytes] | None) -> None:
    for name, proc in reversed(children):  # api first, then the worker
        grace = WORKER_GRACE_S if name == "worker" else API_GRACE_S
        stop_group(proc, grace)
    if redis_proc is not None:
        stop_group(redis_proc, grace_s=10.0)


def banner(port: int, settings: Settings) -> str:
    """What to print once the API answers: URLs and a curl example."""
    base = f"http://127.0.0.1:{port}"
    sample = os.path.relpath(SAMPLE, Path.cwd()) if SAMPLE.is_file() else "path/to/slide.svs"
    model_note = "" if Path(settings.model).is_file() else (
        f"\n  WARNING: model {settings.model} does not exist; jobs will fail with checkpoint_error "
        "(set NUCSEG_MODEL)")
    return (
        f"\nnucseg is up: {base}  (API docs: {base}/docs)  Ctrl-C stops it.{model_note}\n"
        f"  submit:  curl -s -F file=@{sample} -F 'options={{\"tile_size\": 256}}' {base}/v1/jobs\n"
        f"  poll:    curl -s {base}/v1/jobs/<id>\n"
        f"  result:  curl -s -o semantic.png {base}/v1/jobs/<id>/results/semantic.png\n"
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cli.up", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="API port (default: NUCSEG_PORT or 8000)")
    return run_stack(api_port=parser.parse_args(argv).port)


if __name__ == "__main__":
    sys.exit(main())
