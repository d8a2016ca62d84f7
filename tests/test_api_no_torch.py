"""``api/`` must never import torch: checked in a fresh interpreter, through app creation and OpenAPI."""

from __future__ import annotations

import subprocess
import sys

from tests.service_stack import REPO

PROBE = """
import os, sys
os.environ["NUCSEG_AUTH"] = "disabled"
import api.main
app = api.main.create_app()
app.openapi()
heavy = sorted(m for m in ("torch", "torchvision", "segmentation_models_pytorch", "model.engine",
                           "model.pipeline", "worker.tasks") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""


def test_api_never_imports_torch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
