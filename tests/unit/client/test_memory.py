"""nucseg_client against ``httpx.MockTransport``: memory.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

UPLOAD_SCRIPT = """
import http.server, json, re, sys, threading
from nucseg_client import Client

class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        left = int(self.headers["Content-Length"])
        while left:
            left -= len(self.rfile.read(min(left, 1 << 20)))
        body = json.dumps({"id": "a" * 32, "status": "queued"}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
threading.Thread(target=server.serve_forever, daemon=True).start()
with Client(f"http://127.0.0.1:{server.server_address[1]}") as client:
    assert client.submit(sys.argv[1], progress=False).id == "a" * 32
# VmHWM: this process's peak RSS (ru_maxrss would count the forked copy of the parent)
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_a_large_upload_is_streamed_not_loaded(tmp_path: Path) -> None:
    big = tmp_path / "big.svs"
    with big.open("wb") as f:
        f.truncate(512 * 1024 * 1024)  # sparse: costs no disk
    proc = subprocess.run([sys.executable, "-c", UPLOAD_SCRIPT, str(big)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 128, f"peak RSS {proc.stdout.strip()} MiB for a 512 MiB upload"
