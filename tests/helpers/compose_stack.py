"""The docker compose stack, driven from tests as an operator would: ``docker compose`` commands.

Compose itself reads ``COMPOSE_FILE`` (``make compose-test`` sets it, with the local override where
no registry is reachable); the project name, the API's host port, the tenants file and the slide
folder are the test's own, so a stack from ``make compose-up`` is left alone.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.settings import hash_api_key
from tests.helpers.service_stack import KEYS, REPO, WEBHOOK_SECRETS, free_port, tenant_client, wait_until

PROJECT = "nucseg-compose-test"
TENANTS = ("lab-a", "lab-b")


def compose_command() -> list[str]:
    """``$COMPOSE``, else the Compose plugin (``docker compose``) when present, else ``docker-compose``."""
    if os.environ.get("COMPOSE"):
        return shlex.split(os.environ["COMPOSE"])
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return ["docker", "compose"] if plugin.returncode == 0 else [shutil.which("docker-compose") or "docker-compose"]


@dataclass
class ComposeStack:
    """A compose project of the test's own; ``run`` is ``docker compose ARGS`` for it."""

    root: Path
    api_port: int

    @classmethod
    def prepare(cls, root: Path) -> ComposeStack:
        """Tenants file (lab-a, lab-b) and an empty slide folder under ``root``."""
        tenants = {t: {"keys": [hash_api_key(KEYS[t])], "webhook_secret": WEBHOOK_SECRETS[t]} for t in TENANTS}
        (root / "tenants.json").write_text(json.dumps(tenants))
        (root / "slides").mkdir()
        for path in (root, root / "slides", root / "tenants.json"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # the containers run as uid 10001
        return cls(root, free_port())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def run(self, *args: str, timeout_s: float = 600) -> str:
        env = {**os.environ, "NUCSEG_API_PORT": str(self.api_port),
               "NUCSEG_TENANTS": str(self.root / "tenants.json"), "NUCSEG_SLIDES": str(self.root / "slides")}
        cmd = [*compose_command(), "-p", PROJECT, *args]
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        assert out.returncode == 0, f"{shlex.join(cmd)}: {out.stdout}{out.stderr}"
        return out.stdout

    def up(self) -> None:
        """Start every service from the built images and wait until the API has a worker."""
        self.run("up", "-d", "--no-build")
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 300) -> None:
        wait_until(lambda: self._ready(), timeout_s, "GET /readyz answers 200", interval_s=1)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.base_url + "/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def exec(self, service: str, *cmd: str) -> str:
        return self.run("exec", "-T", service, *cmd).strip()

    def health(self, service: str) -> str:
        """The Docker health status of the service's container (``starting``, ``healthy``, ...)."""
        container = self.run("ps", "-q", service).strip()
        out = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()

    def client_for(self, tenant: str | None) -> httpx.Client:
        """An HTTP client with ``tenant``'s API key (None: no key at all)."""
        return tenant_client(self.base_url, tenant)
