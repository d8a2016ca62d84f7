"""Memory stays bounded on a large slide: a 20480 px pyramidal TIFF in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.synthetic import write_pyramid

CHILD = r"""
import json, resource, sys, torch
from pathlib import Path
from model.engine import Engine, EngineOptions
from model.maps import ClassMapSink
from model.readers import open_slide
from tests.helpers.stubs import TrivialNet, loaded

def dark(x):
    d = 1.0 - x.mean(dim=1, keepdim=True)
    return torch.cat((1 - d, d, d * 0.5), dim=1)

slide, out = Path(sys.argv[1]), Path(sys.argv[2])
engine = Engine(loaded(TrivialNet(dark)), EngineOptions(device="cpu", precision="fp32"))
report = engine.run(open_slide(slide), [ClassMapSink(out, masks=True, overlays=True)])
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "size": report.analysis_size, "run": report.tiles_run, "skipped": report.tiles_skipped}))
"""


def test_20k_slide_runs_in_bounded_memory(tmp_path: Path) -> None:
    slide = write_pyramid(tmp_path / "big.tiff", 20480, 20480, tissue_fraction=0.02, cell=2048)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(out)], capture_output=True, text=True,
                          timeout=900, cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["size"] == [20480, 20480]
    assert result["run"] > 0 and result["skipped"] > result["run"], result  # tissue detection skipped glass
    # A whole-slide float accumulator alone would be 8 x 20480^2 x 4 B = 12.5 GiB; one block is ~134 MiB.
    assert result["peak_rss"] < 2.5 * 2**30, f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB"
    with (out / "semantic.png").open("rb") as fh:  # read the IHDR only: Pillow would refuse 419 Mpx
        header = fh.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(header[16:20], "big") == 20480 and int.from_bytes(header[20:24], "big") == 20480
