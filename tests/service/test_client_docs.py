"""Every code block of the "Use it from a LIMS" section, run against the live service.

The section lives in the main README.md. The blocks run as written, except that the server URL and the slide names are
swapped for the test server's and a tiny sample's. ``nucseg`` on PATH is the client CLI
(``python -m nucseg_client``), whether or not the service's ``nucseg`` has the client commands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.service_stack import Stack, png_bytes

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Use it from a LIMS"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
RUNNERS = {"bash": ["bash", "-euo", "pipefail", "-"], "python": [sys.executable, "-"]}


def section_blocks(readme: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block in the section, in order."""
    text = readme.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text[start:end if end > 0 else None])]


READMES = [p for p in (REPO / "README.md",) if SECTION in p.read_text()]
BLOCKS = [(readme, i) for readme in READMES for i in range(len(section_blocks(readme)))]


def test_the_section_exists_and_has_only_runnable_blocks() -> None:
    assert READMES, f"no README has the section {SECTION!r}"
    for readme in READMES:
        langs = [lang for lang, _ in section_blocks(readme)]
        assert {"bash", "python"} <= set(langs) and len(langs) >= 3, langs
        assert set(langs) <= set(RUNNERS), f"{readme}: a block that no test runs would rot: {langs}"


def substitute(code: str, base_url: str) -> str:
    return (code.replace("http://localhost:8000", base_url)
            .replace("2024/S-042.svs", "cases/tile.png")
            .replace("S-042.svs", "sample.png"))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "sample.png").write_bytes(png_bytes(64, 64, seed=42))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "nucseg"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nucseg_client "$@"\n')
    shim.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize(("readme", "index"), BLOCKS, ids=[f"{r.relative_to(REPO)}-{i}" for r, i in BLOCKS])
def test_readme_block_runs(stack: Stack, workdir: Path, readme: Path, index: int) -> None:
    lang, code = section_blocks(readme)[index]
    needed = [tool for tool in ("curl", "jq") if re.search(rf"\b{tool}\b", code) and shutil.which(tool) is None]
    if needed:
        pytest.skip(f"{', '.join(needed)} not installed")
    env = {**os.environ, "PATH": f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("NUCSEG_URL", None)
    proc = subprocess.run(RUNNERS[lang], input=substitute(code, stack.base_url), text=True, cwd=workdir, env=env,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, f"{readme} block {index} ({lang}) failed:\n{proc.stdout}\n{proc.stderr}"
    results = workdir / "results"
    if not results.is_dir():  # a submit-only block prints the job
        assert json.loads(proc.stdout)["status"] in ("queued", "running", "succeeded"), proc.stdout
        return
    for folder in sorted(results.iterdir()):  # each download equals the server's files
        job_id = json.loads((folder / "job.json").read_text())["id"]
        served = stack.data_dir / "results" / job_id
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in served.iterdir())
        for path in folder.iterdir():
            assert path.read_bytes() == (served / path.name).read_bytes(), path
