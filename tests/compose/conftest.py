"""One compose stack for the session (images from ``make compose-build``), and the CMU sample's job."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nucseg_client import Client

from tests.helpers.compose_stack import ComposeStack
from tests.helpers.samples import sample
from tests.helpers.service_stack import KEYS, REPO

# The CMU sample stated at 0.0625 µm/px instead of 0.499: the engine reads it 4x downsampled, 12 tiles
# instead of 713, so a job takes seconds on two CPU cores; every stage still runs.
OPTIONS = {"mpp": 0.0625}
SLIDE = "cmu_small_region.svs"


@dataclass
class SlideJob:
    """A finished job: its id and the folder its results were downloaded to."""

    id: str
    results: Path


@pytest.fixture(scope="session")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    stack = ComposeStack.prepare(tmp_path_factory.mktemp("compose"))
    stack.run("down", "-v")  # whatever an interrupted run left behind
    try:
        stack.up()
        yield stack
    finally:
        stack.run("down", "-v")


@pytest.fixture(scope="session")
def client(compose: ComposeStack) -> Iterator[Client]:
    with Client(compose.base_url, api_key=KEYS["lab-a"]) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def cmu_job(client: Client, tmp_path_factory: pytest.TempPathFactory) -> SlideJob:
    """The CMU sample submitted with the SDK, waited for, and every result downloaded."""
    job = client.submit(sample(SLIDE), options=OPTIONS, progress=False)
    job.wait(timeout=900)
    dest = tmp_path_factory.mktemp("cmu-job")
    job.download_all(dest)
    return SlideJob(job.id, dest)


@pytest.fixture(scope="session")
def local_prediction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``nucseg predict`` on this machine, same slide, same options, on the CPU as the worker."""
    out = tmp_path_factory.mktemp("predict")
    cmd = [sys.executable, "-m", "cli.main", "predict", str(sample(SLIDE)), "--out", str(out), "--quiet",
           "--mpp", str(OPTIONS["mpp"]), "--device", "cpu"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=1800)
    return out
