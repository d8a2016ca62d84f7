"""One slide across many workers: three workers that share nothing but Redis and the object store
(each its own data folder) run the shards of one slide; the merged results equal a single run.

The slide is a generated pyramidal TIFF in the store, named by ``s3://`` path. Small blocks and
shards make it a dozen shards of a few seconds each on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import pytest
import tifffile
from PIL import Image

from core.redis_client import connect
from core.shards import ShardStore
from core.store import JobStore
from tests.helpers.s3_server import BUCKET, S3Server
from tests.helpers.service_stack import Stack, wait_until
from tests.helpers.synthetic import write_pyramid

PREFIX = "jobs"
HOSTS = ("shard-b@hostB", "shard-c@hostC")
SLIDE_KEY = "lab-slides/big.tiff"
OPTIONS = {"tile_size": 64, "overlap": 16, "block_size": 128, "outputs": ["masks", "overlays", "nuclei"]}
SHARDING = {"NUCSEG_SHARD_MIN_BLOCKS": "8", "NUCSEG_SHARD_BLOCKS": "8", "NUCSEG_SHARD_PARALLEL": "3"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server.running(tmp_path_factory.mktemp("s3-shards")) as server:
        yield server


@pytest.fixture(scope="module")
def slide(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1024x768 pyramidal TIFF, mostly tissue, in the store: 48 blocks of 128 px, six shards."""
    path = write_pyramid(tmp_path_factory.mktemp("slide") / "big.tiff", 1024, 768, levels=3,
                         tissue_fraction=0.7, seed=5)
    obstore.put(s3.client(), SLIDE_KEY, path.read_bytes())
    return path


@pytest.fixture(scope="module")
def hosts(s3: S3Server, slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("shard-hosts")
    env = {**s3.env(PREFIX), **SHARDING, "NUCSEG_SLIDE_PREFIXES": json.dumps([f"s3://{BUCKET}/lab-slides/"])}
    with Stack.running(root, env, {"NUCSEG_DATA_DIR": str(root / "host-a")}) as stack:
        for name in HOSTS:
            stack.start_extra_worker(name, {"NUCSEG_DATA_DIR": str(root / name.split("@")[1])})
        for name in HOSTS:
            wait_until(lambda n=name: n in stack.client.get("/readyz").json().get("workers", []), 180,
                       f"{name} answers the readiness ping")
        yield stack


@pytest.fixture(scope="module")
def single_run(hosts: Stack, slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same slide and options through the whole-slide path, in this process."""
    from model.checkpoint import load_model
    from model.options import engine_options
    from model.pipeline import run_prediction

    out = tmp_path_factory.mktemp("single")
    options = engine_options(OPTIONS, device="cpu", precision="fp32")
    run_prediction(slide, out, load_model(hosts.model_path), options, outputs=frozenset(OPTIONS["outputs"]))
    return out


def _shards(hosts: Stack) -> ShardStore:
    return ShardStore(JobStore(connect(f"redis://127.0.0.1:{hosts.redis_port}/0")))


def _submit(hosts: Stack) -> str:
    resp = hosts.submit_path(f"s3://{BUCKET}/{SLIDE_KEY}", options=OPTIONS)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _download(hosts: Stack, job: dict[str, Any], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for item in job["results"]:
        (dest / item["name"]).write_bytes(hosts.client.get(item["href"]).content)
    return dest


def _nuclei(path: Path) -> list[dict[str, Any]]:
    """The features without their ids (random per file, numbered in order)."""
    return [{k: v for k, v in f.items() if k != "id"} for f in json.loads(path.read_text())["features"]]


def assert_same_results(merged: Path, single: Path) -> None:
    """Masks equal pixel for pixel after decoding, the same nuclei in the same order, the same stats."""
    for name in ("semantic.png", "ternary.png"):
        assert np.array_equal(np.asarray(Image.open(merged / name)), np.asarray(Image.open(single / name))), name
    for name in ("semantic.tiff", "ternary.tiff"):
        with tifffile.TiffFile(merged / name) as a, tifffile.TiffFile(single / name) as b:
            assert len(a.pages) == len(b.pages)
            for pa, pb in zip(a.pages, b.pages, strict=True):
                assert np.array_equal(pa.asarray(), pb.asarray()), name
    ours, theirs = (_nuclei(d / "nuclei.geojson") for d in (merged, single))
    assert ours == theirs and len(ours) > 0
    ours, theirs = (json.loads((d / "stats.json").read_text()) for d in (merged, single))
    for section in ("semantic", "ternary", "tissue", "analysis", "blocks"):
        assert ours[section] == theirs[section], section
    how = ("workers", "timings")  # how the nuclei were post-processed, not what they are
    assert {k: v for k, v in ours["nuclei"].items() if k not in how} == \
        {k: v for k, v in theirs["nuclei"].items() if k not in how}


def test_one_slide_runs_as_shards_on_three_hosts_and_merges_to_the_single_run(
        hosts: Stack, s3: S3Server, single_run: Path, tmp_path: Path) -> None:
    job = hosts.wait(_submit(hosts), timeout_s=600)
    assert job["status"] == "succeeded", job
    shards = job["shards"]
    assert [s["index"] for s in shards] == list(range(6)) and {s["blocks"] for s in shards} == {8}
    assert all(s["status"] == "done" and s["done"] == 8 for s in shards), shards
    assert {s["worker"] for s in shards} == {"test-1@localhost", *HOSTS}  # every host ran a shard
    assert job["progress"]["done"] == job["progress"]["total"] == 48
    assert_same_results(_download(hosts, job, tmp_path / "merged"), single_run)
    job_json = hosts.client.get(f"/v1/jobs/{job['id']}/results/job.json").json()
    assert [s["worker"] for s in job_json["shards"]] == [s["worker"] for s in shards]
    leftovers = [m["path"] for batch in obstore.list(s3.client(), f"{PREFIX}/shards/") for m in batch]
    assert leftovers == []  # the parts are gone once merged
    for host in ("host-a", "hostB", "hostC"):
        assert not (hosts.root / host / "results" / job["id"]).exists()  # nothing published on a worker's disk
        assert not list((hosts.root / host / "cache" / "shards").glob("*/*"))  # scratch is cleaned up


def test_a_worker_killed_mid_shard_costs_only_its_shard(hosts: Stack, single_run: Path, tmp_path: Path) -> None:
    victim = hosts.extra_workers[0]
    job_id = _submit(hosts)

    def victim_busy() -> bool:
        shards = hosts.job(job_id).get("shards") or []
        return any(s["worker"] == HOSTS[0] and s["status"] == "running" and s["done"] >= 1 for s in shards)

    wait_until(victim_busy, 300, f"{HOSTS[0]} is inside a shard")
    hosts.kill_worker(victim)
    job = hosts.wait(job_id, timeout_s=600)
    assert job["status"] == "succeeded", job
    shards = job["shards"]
    redone = [s for s in shards if s["attempts"] > 1]
    assert len(redone) == 1 and redone[0]["worker"] != HOSTS[0], shards  # only the killed shard ran again
    assert all(s["attempts"] == 1 for s in shards if s not in redone)
    stored = _shards(hosts).states(job_id)
    assert [s.completions for s in stored] == [1] * 6  # no shard ran twice to completion
    assert_same_results(_download(hosts, job, tmp_path / "merged"), single_run)


def test_a_cancel_reaches_every_running_shard(hosts: Stack, s3: S3Server) -> None:
    job_id = _submit(hosts)

    def shards_running() -> bool:
        shards = hosts.job(job_id).get("shards") or []
        return sum(s["status"] == "running" and s["done"] >= 1 for s in shards) >= 2

    wait_until(shards_running, 300, "two shards inside their blocks")
    assert hosts.client.delete(f"/v1/jobs/{job_id}").status_code == 202
    job = hosts.wait(job_id, timeout_s=60)
    assert job["status"] == "cancelled", job

    shards = _shards(hosts)
    wait_until(lambda: all(s.status != "running" for s in shards.states(job_id)), 30, "every shard stopped")
    assert {s.status for s in shards.states(job_id)} <= {"cancelled", "done", "queued", "pending"}
    wait_until(lambda: not [m for b in obstore.list(s3.client(), f"{PREFIX}/shards/{job_id}/") for m in b], 30,
               "the cancelled job's shard parts removed")
    hosts.run_good_job()  # the workers are free again


def test_a_store_down_mid_job_makes_shards_wait_then_the_job_succeeds(
        hosts: Stack, s3: S3Server, single_run: Path, tmp_path: Path) -> None:
    job_id = _submit(hosts)
    wait_until(lambda: any(s["status"] == "running" for s in hosts.job(job_id).get("shards") or []), 300,
               "a shard running")
    s3.stop()
    try:
        wait_until(lambda: any(s.retries >= 1 for s in _shards(hosts).states(job_id)), 180,
                   "a shard's upload failed and the shard was put back to wait")
        waiting = hosts.job(job_id)
        assert waiting["status"] == "running" and waiting["results"] is None
    finally:
        s3.start()
    job = hosts.wait(job_id, timeout_s=600)
    assert job["status"] == "succeeded", job
    assert_same_results(_download(hosts, job, tmp_path / "merged"), single_run)
