"""``make up`` (``python -m cli.up``): embedded Redis with AOF, a worker and the API; Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers.service_stack import FAST, REPO, free_port, png_bytes, write_checkpoint

pytestmark = [pytest.mark.service, pytest.mark.slow]


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen) + "".join(proc.stdout.readline() for _ in range(4))
    raise AssertionError(f"{marker!r} not printed; output so far:\n{''.join(seen)}")


def test_up_starts_redis_worker_api_and_ctrl_c_stops_all_three(tmp_path: Path) -> None:
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUCSEG_")}
    env |= {"NUCSEG_DATA_DIR": str(tmp_path / "data"), "NUCSEG_REDIS_PORT": str(redis_port),
            "NUCSEG_MODEL": str(write_checkpoint(tmp_path / "tiny.pt")), "NUCSEG_DEVICE": "cpu",
            "NUCSEG_PRECISION": "fp32", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.up", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = _read_until(proc, "nucseg is up", timeout_s=120)
        assert f"http://127.0.0.1:{port}" in banner and "curl" in banner
        assert "cmu_small_region.svs" in banner and "/v1/jobs" in banner
        assert f"redis-server at redis://127.0.0.1:{redis_port}/0" in banner
        assert "auth:    DISABLED (loopback only" in banner  # no keys configured: says so
        pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        names = " ".join(" ".join(psutil.Process(p).cmdline()) for p in pids)
        assert "redis-server" in names and "cli.service worker" in names and "serve" in names
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job = client.post("/v1/jobs", files={"file": ("a.png", png_bytes(64, 64))},
                              data={"options": json.dumps(FAST)}).json()
            deadline = time.monotonic() + 120
            while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline, "job did not succeed under make up"
                time.sleep(0.2)
        assert (tmp_path / "data" / "redis" / "appendonly.aof").is_file()

        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the launcher
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        assert "stopped API, worker and Redis" in out
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
