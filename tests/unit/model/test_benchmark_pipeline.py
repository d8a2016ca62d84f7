"""The host-ceiling benchmark's command runs the whole pipeline and ends on its ``host ceiling`` line,
with all outputs and with some left out."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

LINE = re.compile(r"^host ceiling: (\d+\.\d+) Mpx/s "
                  r"\(1\.0 Mpx in .*; 25 tiles run for 25 grid tiles; ([\d,]+) nuclei, ")


@pytest.mark.parametrize("outputs", [None, "masks", "masks,overlays"])
def test_host_ceiling_line_for_any_outputs(outputs: str | None) -> None:
    command = [sys.executable, "-m", "benchmarks.pipeline", "--network", "free", "--side", "1024", "--source", "render"]
    out = subprocess.run(command + ([] if outputs is None else ["--outputs", outputs]), capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[3], check=True).stdout
    *_, row_text, last = out.strip().splitlines()
    match = LINE.match(last)
    assert match is not None, last
    assert float(match[1]) > 0
    nuclei = int(match[2].replace(",", ""))
    row = json.loads(row_text)
    assert row["nuclei"] == nuclei
    if outputs is None:
        assert "nuclei" in row["outputs"] and nuclei > 100 and "µs/nucleus post-processing" in last
    else:
        assert row["outputs"] == sorted(outputs.split(",")) and nuclei == 0 and "no post-processing" in last
