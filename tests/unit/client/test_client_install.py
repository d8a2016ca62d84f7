"""``client/`` installs into an empty venv with only httpx, tqdm and their dependencies, without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[3] / "client"
# httpx 0.28 and tqdm, with what they pull in; pip and setuptools come with the venv
ALLOWED = {"nucseg-client", "httpx", "httpcore", "anyio", "idna", "certifi", "h11", "sniffio", "tqdm",
           "typing-extensions", "exceptiongroup", "pip", "setuptools", "colorama"}
CHECK = """
import importlib.util, sys
import nucseg_client, nucseg_client.cli, nucseg_client._async_client
from nucseg_client import AsyncClient, Client, NucsegError
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "PIL", "api", "model", "worker"))
assert not heavy, heavy
missing = [m for m in ("torch", "numpy", "api", "model", "worker", "training") if importlib.util.find_spec(m)]
assert not missing, f"importable in the client venv: {missing}"
print(nucseg_client.__version__)
"""


@pytest.mark.slow
def test_client_installs_and_imports_in_an_empty_venv(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=60)
    python, bindir = venv / "bin" / "python", venv / "bin"

    source = tmp_path / "client"  # pip builds in the tree: keep the checkout clean
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert pip.returncode == 0, pip.stdout + pip.stderr

    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True, timeout=60)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert names <= ALLOWED, f"unexpected packages in the client venv: {sorted(names - ALLOWED)}"
    assert {"nucseg-client", "httpx", "tqdm"} <= names

    check = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "0.1.0"

    helped = subprocess.run([str(bindir / "nucseg-client"), "submit", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--wait" in helped.stdout, helped.stderr
