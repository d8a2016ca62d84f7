"""Service load: ``python -m benchmarks.load [--jobs 200] [--kill-worker]``.

Starts the live test stack (``tests.helpers.service_stack.Stack``: redis-server, uvicorn, the tiny random-init
resnet18) with two workers, submits ``--jobs`` 64x64 PNG uploads at once from 32 threads (one unique
Idempotency-Key each) while a poller thread GETs every job round robin until all are terminal.
Reports submit and GET latency p50/p99 and the wall time until all complete, and checks that no job
was lost, duplicated or failed. ``--kill-worker`` SIGKILLs the second worker when half are done.
Exits 1 on any lost/duplicated/failed job and then keeps the stack's folder (logs) for inspection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import machine
from tests.helpers.service_stack import FAST, TERMINAL, Stack, png_bytes

THREADS = 32
EXTRA_WORKER = "bench-2@localhost"
LIMITS = {"NUCSEG_SUBMIT_BURST": "100000", "NUCSEG_MAX_QUEUED_PER_TENANT": "100000",
          "NUCSEG_SUBMIT_RATE_PER_MIN": "1000000"}


@dataclass
class Run:
    """What one load run observed."""

    submit_s: list[float] = field(default_factory=list)
    get_s: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    submit_errors: list[str] = field(default_factory=list)
    get_errors: int = 0
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # first terminal GET of each job
    lock: threading.Lock = field(default_factory=threading.Lock)
    submitted_after_s: float = 0.0
    complete_after_s: float = 0.0
    killed_when_done: int | None = None


def wait_two_workers(stack: Stack, started_at: float, timeout_s: float = 180.0) -> None:
    """Until /readyz has named both workers and the extra worker's pool process has loaded the model.

    /readyz pings with ``limit=1``, so each answer names only the first worker to reply: collect names.
    """
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        ready, models = stack.client.get("/readyz"), stack.client.get("/v1/models")
        seen.update(ready.json().get("workers", []) if ready.status_code == 200 else [])
        loaded = [datetime.fromisoformat(m["loaded_at"]).timestamp() for m in models.json().get("models", [])]
        if {stack.worker_name, EXTRA_WORKER} <= seen and any(t >= started_at for t in loaded):
            return
        time.sleep(0.2)
    raise TimeoutError(f"two workers not ready after {timeout_s} s; logs in {stack.root}")


def submit_all(stack: Stack, n_jobs: int, run: Run, started: float) -> None:
    """POST every image at once from ``THREADS`` threads, each with its own client."""
    images = [png_bytes(64, 64, seed=1000 + i) for i in range(n_jobs)]
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = stack.client_for("lab-a")
        files = {"file": (f"load-{i}.png", images[i], "application/octet-stream")}
        data = {"options": json.dumps(FAST), "metadata": json.dumps({"n": i})}
        t0 = time.perf_counter()
        try:
            resp = local.client.post("/v1/jobs", files=files, data=data, headers={"Idempotency-Key": f"load-{i}"})
        except httpx.HTTPError as exc:
            run.submit_errors.append(f"#{i}: {exc!r}")
            return
        run.submit_s.append(time.perf_counter() - t0)
        if resp.status_code != 202:
            run.submit_errors.append(f"#{i}: HTTP {resp.status_code} {resp.text[:200]}")
            return
        with run.lock:
            run.ids.append(resp.json()["id"])

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, range(n_jobs)))
    run.submitted_after_s = time.perf_counter() - started


def poll_all(stack: Stack, run: Run, submitting: threading.Thread, started: float, deadline: float) -> None:
    """GET every submitted, not yet terminal job round robin until all are terminal (or ``deadline``)."""
    with stack.client_for("lab-a") as client:
        while time.monotonic() < deadline:
            still_submitting = submitting.is_alive()
            with run.lock:
                pending = [i for i in run.ids if i not in run.final]
            if not pending:
                if not still_submitting:
                    run.complete_after_s = time.perf_counter() - started
                    return
                time.sleep(0.01)
            for job_id in pending:
                t0 = time.perf_counter()
                resp = client.get(f"/v1/jobs/{job_id}")
                run.get_s.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    run.get_errors += 1
                elif resp.json()["status"] in TERMINAL:
                    run.final[job_id] = resp.json()


def list_all(client: httpx.Client) -> list[dict[str, Any]]:
    """Every job of the tenant, through GET /v1/jobs paging."""
    jobs: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = client.get("/v1/jobs", params={"limit": 100, **({"cursor": cursor} if cursor else {})}).json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            return jobs


def check(n_jobs: int, run: Run, listed: list[dict[str, Any]], folders: list[str]) -> dict[str, list[str]]:
    """Job ids (or submit errors) that were lost, duplicated or failed.

    lost: submitted but not listed, not terminal, or succeeded without a result folder (or a POST
    that never answered 202 for another reason than an error); duplicated: an id, a metadata ``n``
    or a result folder that appears twice or was never submitted; failed: a failed or cancelled job
    or a POST that did not answer 202.
    """
    by_id = {j["id"]: j for j in listed}
    submitted = set(run.ids)
    lost = [i for i in submitted if i not in by_id or by_id[i]["status"] not in TERMINAL
            or (by_id[i]["status"] == "succeeded" and i not in folders)]
    lost += ["(no answer)"] * (n_jobs - len(run.ids) - len(run.submit_errors))
    ns = Counter(j["metadata"].get("n") for j in listed)
    dup = [i for i, c in Counter(run.ids).items() if c > 1]
    dup += [i for i, c in Counter(j["id"] for j in listed).items() if c > 1]
    dup += [j["id"] for j in listed if j["id"] not in submitted or ns[j["metadata"].get("n")] > 1]
    dup += [f for f in folders if f not in submitted]
    failed = [i for i, j in by_id.items() if j["status"] in ("failed", "cancelled")] + run.submit_errors
    return {"lost": lost, "duplicated": dup, "failed": failed}


def pct(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q)) if seconds else float("nan")


def load(n_jobs: int, kill: bool, timeout_s: float) -> int:
    root = Path(tempfile.mkdtemp(prefix="nucseg-load-"))
    run = Run()
    with Stack.running(root, env=LIMITS) as stack:
        extra_started = time.time()
        extra = stack.start_extra_worker(EXTRA_WORKER)
        wait_two_workers(stack, extra_started)
        started = time.perf_counter()
        submitting = threading.Thread(target=submit_all, args=(stack, n_jobs, run, started))
        poller = threading.Thread(target=poll_all, args=(stack, run, submitting, started,
                                                         time.monotonic() + timeout_s))
        submitting.start()
        poller.start()
        while kill and poller.is_alive() and len(run.final) < n_jobs // 2:
            time.sleep(0.05)
        if kill:
            run.killed_when_done = len(run.final)
            stack.kill_worker(extra)
        submitting.join()
        poller.join()
        run.complete_after_s = run.complete_after_s or time.perf_counter() - started
        listed = list_all(stack.client)
        results = stack.data_dir / "results"
        folders = [p.name for p in results.iterdir() if not p.name.startswith(".")]
        partials = len(list((results / ".partial").glob("*"))) if (results / ".partial").exists() else 0
    bad = check(n_jobs, run, listed, folders)
    report(n_jobs, kill, run, listed, folders, partials, bad)
    if any(bad.values()):
        print(f"stack folder with logs kept: {root}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    return 0


def report(n_jobs: int, kill: bool, run: Run, listed: list[dict[str, Any]], folders: list[str], partials: int,
           bad: dict[str, list[str]]) -> None:
    redelivered = [j for j in listed if j["attempts"] > 1 or j["redeliveries"] > 0]
    complete = len(run.final) == len(run.ids)
    run_s = [(datetime.fromisoformat(j["finished_at"]) - datetime.fromisoformat(j["started_at"])).total_seconds()
             for j in listed if j["started_at"] and j["finished_at"]]
    print(f"machine: {machine()}")
    print(f"date: {date.today().isoformat()}; jobs: {n_jobs}; workers: 2; submit threads: {THREADS}; "
          f"worker killed: {f'when {run.killed_when_done} jobs were done' if kill else 'no'}")
    rows = [
        ("submit p50 / p99 ms", f"{pct(run.submit_s, 50):.1f} / {pct(run.submit_s, 99):.1f}"),
        ("all submitted after s", f"{run.submitted_after_s:.2f}"),
        ("GET p50 / p99 ms", f"{pct(run.get_s, 50):.1f} / {pct(run.get_s, 99):.1f}"),
        ("GETs (not 200)", f"{len(run.get_s)} ({run.get_errors})"),
        ("all complete after s", f"{run.complete_after_s:.2f}" if complete else
         f"timed out ({len(run.final)}/{len(run.ids)} terminal)"),
        ("jobs/s", f"{len(run.final) / run.complete_after_s:.2f}"),
        ("job run time (started -> finished) p50 / p99 ms", f"{pct(run_s, 50):.0f} / {pct(run_s, 99):.0f}"),
        ("lost / duplicated / failed", " / ".join(str(len(v)) for v in bad.values())),
        ("redelivered (attempts > 1 or redeliveries > 0)", str(len(redelivered))),
        ("result folders / leftover partials", f"{len(folders)} / {partials}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for kind, items in bad.items():
        for item in items[:20]:
            job = next((j for j in listed if j["id"] == item), None)
            print(f"{kind}: {item}" + (f" status={job['status']} error={job['error']}" if job else ""))
    for j in redelivered:
        print(f"redelivered: {j['id']} attempts={j['attempts']} redeliveries={j['redeliveries']} "
              f"retries={j['retries']}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Service load: concurrent submits, polling, worker loss.")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kill-worker", action="store_true", help="SIGKILL the second worker when half are done")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for all jobs to end")
    args = parser.parse_args()
    sys.exit(load(args.jobs, args.kill_worker, args.timeout))


if __name__ == "__main__":
    main()
