"""Fuzz the live API with schemathesis: no 5xx, and every response conforms to the OpenAPI schema.

The run is bounded (``MAX_EXAMPLES`` per operation, one schemathesis worker) and reproducible: a fixed
seed with deterministic generation, so rerunning this test replays a failure. ``NUCSEG_FUZZ_SEED`` and
``NUCSEG_FUZZ_EXAMPLES`` override both for a longer or different exploration.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.service_stack import KEYS, Stack, png_bytes

pytestmark = [pytest.mark.service, pytest.mark.slow]

SEED = int(os.environ.get("NUCSEG_FUZZ_SEED", "20261126"))
MAX_EXAMPLES = int(os.environ.get("NUCSEG_FUZZ_EXAMPLES", "150"))
CHECKS = ("not_a_server_error", "response_schema_conformance", "status_code_conformance",
          "content_type_conformance", "response_headers_conformance")
RUN_TIMEOUT_S = 300  # a hard bound: the run takes 30-40 s on 2 idle cores, about 100 s on a loaded machine
ST = Path(sys.executable).with_name("st")


def test_api_has_no_5xx_and_conforms_to_its_openapi_schema(stack: Stack, tmp_path: Path) -> None:
    job = _succeeded_job(stack)
    config = _config(tmp_path, job)
    before = _active_ids(stack)
    api_log = stack.root / "api.log"
    log_start = api_log.stat().st_size if api_log.exists() else 0
    cmd = [str(ST), "--config-file", str(config), "run", f"{stack.base_url}/openapi.json",
           "--header", f"Authorization: Bearer {KEYS['lab-a']}",
           "--checks", ",".join(CHECKS),
           # an explicit seed wins over derandomize (though the summary says "Seed: not used in the deterministic mode")
           "--seed", str(SEED), "--generation-deterministic",
           "--max-examples", str(MAX_EXAMPLES),
           # one worker: hypothesis describes filter lambdas with ast.parse, which is not thread-safe on
           # CPython 3.11 (SystemError "AST constructor recursion depth mismatch" with --workers 2)
           "--workers", "1",
           "--continue-on-failure", "--request-timeout", "30", "--output-truncate", "true", "--no-color"]
    replay = (f"replay: .venv/bin/python -m pytest -q tests/service/test_fuzz_api.py  (seed {SEED}, deterministic; "
              f"NUCSEG_FUZZ_SEED={SEED} NUCSEG_FUZZ_EXAMPLES={MAX_EXAMPLES})\n"
              f"or against a running API (config in {config}):\n  "
              + shlex.join(c.replace(KEYS["lab-a"], "<API key>") for c in cmd))
    print(f"schemathesis seed {SEED}, {MAX_EXAMPLES} examples per operation\n{replay}")
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=RUN_TIMEOUT_S,
                              env={**os.environ, "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"})
    finally:
        _cancel_new_jobs(stack, before)
    output = proc.stdout + proc.stderr
    print(f"schemathesis took {time.monotonic() - started:.0f} s\n{output[-3000:]}")
    assert proc.returncode == 0, f"schemathesis failed (exit {proc.returncode}, seed {SEED})\n{replay}\n\n" \
                                 f"{output[-20000:]}"
    logged = api_log.read_bytes()[log_start:].decode(errors="replace") if api_log.exists() else ""
    assert "Traceback" not in logged, f"the API logged an unhandled exception (seed {SEED})\n{replay}\n{logged[-8000:]}"


def _succeeded_job(stack: Stack) -> dict[str, Any]:
    """A finished job with every output, so results, DZI and tiles are fuzzed past their 404s."""
    resp = stack.submit_upload(png_bytes(64, 64, seed=7), options={"tile_size": 64, "overlap": 0})
    assert resp.status_code == 202, resp.text
    job = stack.wait(resp.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def _config(tmp_path: Path, job: dict[str, Any]) -> Path:
    """schemathesis.toml: the sub-resources of a job draw real values from dictionaries most of the time.

    DELETE /v1/jobs/{job_id} is not bound (it would delete the job the others read); it gets ids that
    schemathesis captures from responses, and random ones.
    """
    dictionaries = {
        "jobs": [job["id"]],
        "results": [r["name"] for r in job["results"]],
        "images": ["slide", "semantic", "ternary"],
        "levels": ["0", "3", "6"],  # a 64x64 image has Deep Zoom levels 0..6
        "tiles": ["0_0.jpeg", "0_0.png"],
    }
    bound = {"job_id": "jobs", "name": "results", "image": "images", "level": "levels", "tile": "tiles"}
    lines = [f"[dictionaries.{name}]\nvalues = {json.dumps(values)}\n" for name, values in dictionaries.items()]
    params = ", ".join(f'"path.{p}" = {{ dictionary = "{d}", probability = 0.7 }}' for p, d in bound.items())
    lines.append(f'[[operations]]\ninclude-path-regex = "^/v1/jobs/\\\\{{job_id\\\\}}/"\nparameters = {{ {params} }}\n')
    path = tmp_path / "schemathesis.toml"
    path.write_text("\n".join(lines))
    return path


def _active_ids(stack: Stack) -> set[str]:
    ids: set[str] = set()
    for status in ("queued", "running"):
        resp = stack.client.get("/v1/jobs", params={"status": status, "limit": 100})
        assert resp.status_code == 200, resp.text
        ids |= {j["id"] for j in resp.json()["jobs"]}
    return ids


def _cancel_new_jobs(stack: Stack, keep: set[str], timeout_s: float = 120.0) -> None:
    """Cancel the jobs the fuzzer queued, so later tests on this stack get an idle worker."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = _active_ids(stack) - keep
        if not active:
            return
        for job_id in active:
            stack.client.delete(f"/v1/jobs/{job_id}")
        time.sleep(0.5)
    raise TimeoutError(f"jobs the fuzzer queued are still active after {timeout_s} s: {sorted(_active_ids(stack))}")
