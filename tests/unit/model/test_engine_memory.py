"""Memory stays bounded on a large slide (20480 px pyramidal TIFFs in a child process), also when a sink is slow."""

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


def _run_child(script: str, tmp_path: Path, **slide: float) -> tuple[dict, Path]:
    """``script`` over a generated 20480 px pyramid in a child process: its last line, parsed, and the
    output folder."""
    path = write_pyramid(tmp_path / "big.tiff", 20480, 20480, cell=2048, **slide)  # type: ignore[arg-type]
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(out)], capture_output=True, text=True,
                          timeout=900, cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


def test_20k_slide_runs_in_bounded_memory(tmp_path: Path) -> None:
    result, out = _run_child(CHILD, tmp_path, tissue_fraction=0.02)
    assert result["size"] == [20480, 20480]
    assert result["run"] > 0 and result["skipped"] > result["run"], result  # tissue detection skipped glass
    # A whole-slide float accumulator alone would be 8 x 20480^2 x 4 B = 12.5 GiB; one block is ~134 MiB.
    assert result["peak_rss"] < 2.5 * 2**30, f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB"
    with (out / "semantic.png").open("rb") as fh:  # read the IHDR only: Pillow would refuse 419 Mpx
        header = fh.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(header[16:20], "big") == 20480 and int.from_bytes(header[20:24], "big") == 20480


SLOW_CHILD = r"""
import json, resource, sys, threading, time, torch
from pathlib import Path
from model.engine import Engine, EngineOptions, reader_threads
from model.maps import ClassMapSink
from model.readers import open_slide
from tests.helpers.stubs import TrivialNet, loaded

class CountingReader:
    '''The slide, counting the level-0 reads (the blocks' pixels; the tissue mask reads a small level).'''
    def __init__(self, reader):
        self.reader, self.reads = reader, 0
        self.lock = threading.Lock()
    def __getattr__(self, name):
        return getattr(self.reader, name)
    def read_region(self, level, *args):
        out = self.reader.read_region(level, *args)
        with self.lock:
            self.reads += level == 0
        return out

class SlowSink:
    '''Takes 0.2 s per block with tissue, noting how many blocks the reader is ahead of it.'''
    needs_logits = needs_probs = False
    def __init__(self, reader):
        self.reader, self.added, self.ahead = reader, 0, []
    def start(self, ctx):
        pass
    def add(self, block):
        if block.classes is None:
            return
        self.added += 1
        time.sleep(0.2)
        self.ahead.append(self.reader.reads - self.added)
    def finish(self):
        return {}
    def abort(self):
        pass

def dark(x):
    d = 1.0 - x.mean(dim=1, keepdim=True)
    return torch.cat((1 - d, d, d * 0.5), dim=1)

slide, out = Path(sys.argv[1]), Path(sys.argv[2])
reader = CountingReader(open_slide(slide))
engine = Engine(loaded(TrivialNet(dark)), EngineOptions(device="cpu", precision="fp32", tissue=True))
slow = SlowSink(reader)
report = engine.run(reader, [slow, ClassMapSink(out, masks=True, overlays=False)])
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "blocks": slow.added,
                  "ahead": max(slow.ahead), "readers": reader_threads(), "size": report.analysis_size}))
"""


def test_a_slow_sink_holds_the_reader_back(tmp_path: Path) -> None:
    """Back-pressure: with a sink far slower than reading, the engine stays a few blocks ahead of
    it (not the whole slide), and peak memory stays that of a fast run."""
    result, _ = _run_child(SLOW_CHILD, tmp_path, tissue_fraction=0.15, seed=3)
    assert result["size"] == [20480, 20480] and result["blocks"] >= 10, result
    # a block per reader thread, one being blended and one queued for the sinks: without
    # back-pressure the readers would be all the tissue blocks (and their pixels) ahead of this sink
    assert result["ahead"] <= result["readers"] + 2 <= 6, result
    assert result["peak_rss"] < 2.5 * 2**30, f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB"
