"""The API image: ``api/`` never imports torch, and imports nothing outside the packages
``Dockerfile.api`` copies. Both are checked in a fresh interpreter, through app creation and OpenAPI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.helpers.service_stack import REPO

# Prints the loaded modules that come from this repository (not its virtualenv), as JSON {module: file}.
PROBE = """
import json, os, sys
os.environ["NUCSEG_AUTH"] = "disabled"
import api.main
app = api.main.create_app()
app.openapi()
repo, env = os.path.realpath(sys.argv[1]) + os.sep, os.path.realpath(sys.prefix) + os.sep
files = {name: os.path.realpath(m.__file__) for name, m in list(sys.modules.items()) if getattr(m, "__file__", None)}
ours = {name: path for name, path in files.items() if path.startswith(repo) and not path.startswith(env)}
print(json.dumps(ours))
"""
HEAVY = ("torch", "torchvision", "segmentation_models_pytorch", "model.engine", "model.pipeline", "worker")


def _api_imports() -> tuple[dict[str, str], list[str]]:
    """The project modules the API loads (name -> file), and every module name it loads."""
    probe = PROBE + "print(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe, str(REPO)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    ours, everything = out.stdout.splitlines()[-2:]
    return json.loads(ours), json.loads(everything)


def _copied_packages() -> set[str]:
    """The top-level folders ``Dockerfile.api`` copies into the image (``COPY name/ name/``)."""
    lines = (REPO / "Dockerfile.api").read_text().splitlines()
    copies = [line.split()[1:] for line in lines if line.startswith("COPY ") and "--from" not in line]
    folders = {src.rstrip("/") for src, *_ in copies if re.fullmatch(r"[a-z_]+/", src)}
    files = [src for src, *_ in copies if src.endswith(".py")]
    assert not files, f"Dockerfile.api copies single modules, not whole packages: {files}"
    return folders


def test_api_never_imports_torch_or_the_worker() -> None:
    _, everything = _api_imports()
    heavy = sorted(m for m in everything if m in HEAVY or m.split(".")[0] in ("torch", "worker", "cli"))
    assert not heavy, heavy


def test_the_api_imports_only_packages_its_image_copies() -> None:
    ours, _ = _api_imports()
    copied = _copied_packages()
    assert {"api", "core", "model"} <= copied
    outside = sorted(f"{name} ({path})" for name, path in ours.items()
                     if (REPO / path).relative_to(REPO).parts[0] not in copied)
    assert len(ours) > 10 and not outside, f"the API imports modules Dockerfile.api does not copy: {outside}"


def test_the_contract_and_the_model_card_import_without_torch() -> None:
    """``model.options`` is standard library only; the model card needs pydantic, never torch."""
    probe = ("import sys, model.options, model.card; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = {name.split(".")[0] for name in json.loads(out.stdout.replace("'", '"'))}
    assert loaded == {"pydantic"}, loaded
