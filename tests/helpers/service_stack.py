"""The live service for tests: a real redis-server, a real Celery worker process, real uvicorn.

``Stack.start(root)`` writes a tiny random-init checkpoint, fills a slide root with real sample
slides and generated images, and starts the three processes on free ports with ``NUCSEG_*`` set.
Everything lives under ``root`` and is torn down by ``stop``. Helpers drive it over HTTP with httpx.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from PIL import Image

from cli.processes import stop_group
from cli.redis_server import start_redis
from core.keys import Keys
from core.settings import hash_api_key
from tests.helpers.samples import sample

REPO = Path(__file__).resolve().parents[2]
UPLOAD_CAP = 3 * 1024 * 1024
# Tenants with one API key each; the stack's configuration holds only the keys' sha256. lab-a and
# lab-b are the everyday tenants; lab-c and lab-d are for the limit tests, whose counters are per
# tenant; lab-e is for the listing test, which must see only the jobs it submitted itself.
KEYS = {t: f"nsk_test_key_of_{t.replace('-', '_')}_0123456789"
        for t in ("lab-a", "lab-b", "lab-c", "lab-d", "lab-e")}
WEBHOOK_SECRETS = {t: "whsec_" + base64.b64encode(f"{t} webhook secret, 32 bytes!!".encode()).decode()
                   for t in KEYS}
FAST = {"tile_size": 64, "overlap": 0, "outputs": ["masks"]}  # one tile per 64x64 image
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tenant_client(base_url: str, tenant: str | None) -> httpx.Client:
    """An HTTP client for ``base_url`` with ``tenant``'s API key (None: no key at all)."""
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.Client(base_url=base_url, timeout=30, headers=headers)


def tissue_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An H&E-ish RGB image: pink background with purple blobs (deterministic)."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (232, 190, 215)
    yy, xx = np.mgrid[-8:9, -8:9]
    for _ in range(max(4, width * height // 2000)):
        cy, cx, r = rng.integers(8, max(9, height - 8)), rng.integers(8, max(9, width - 8)), rng.integers(3, 9)
        window = img[cy - 8 : cy + 9, cx - 8 : cx + 9]
        disc = (yy**2 + xx**2 <= r * r)[: window.shape[0], : window.shape[1]]
        window[disc] = (90, 40, 140)
    noise = rng.integers(-12, 13, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tissue_image(width, height, seed)).save(buf, format="PNG")
    return buf.getvalue()


# Macenko's published reference stains and a typical H&E LAB range: a stain reference for test models.
TEST_STAIN_REFERENCE = {
    "reinhard": {"mean": (66.0, 22.0, -14.0), "std": (14.0, 9.0, 7.0)},
    "macenko": {"he": ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581)), "max_c": (1.9705, 1.0308)},
}

# Figures of a training recipe on held-out patients, as a release card carries them (recipe_validation).
TEST_RECIPE_VALIDATION = {
    "model": "held-out test run", "patients": ("P1", "P2", "P3"), "images": 15,
    "classes": {"epithelial": {"gt_cells": 648, "iou": 0.542, "det_f1": 0.722, "det_f1_ci": (0.321, 0.779),
                               "pq": 0.557},
                "macrophage": {"gt_cells": 38, "iou": 0.131, "det_f1": 0.165, "det_f1_ci": (0.0, 0.296),
                               "pq": 0.152}},
}


def write_checkpoint(path: Path) -> Path:
    """A random-init resnet18 network with a card: tests never depend on the shipped model."""
    import torch

    from model.card import ModelCard, RecipeValidation, StainReference
    from model.checkpoint import save_checkpoint
    from model.network import build_network

    torch.manual_seed(0)
    card = ModelCard(name="tiny-test", version="test", encoder="resnet18", licence="test only",
                     stain_reference=StainReference.model_validate(TEST_STAIN_REFERENCE),
                     recipe_validation=RecipeValidation.model_validate(TEST_RECIPE_VALIDATION))
    return save_checkpoint(build_network("resnet18"), card, path)


@dataclass
class Stack:
    """The running service; ``client`` talks to the API."""

    root: Path
    env: dict[str, str]
    redis_port: int
    api_port: int
    redis: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    extra_workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)  # on top of ``env``, for every worker
    workers_started: int = 0
    worker_started_at: float = 0.0
    client: httpx.Client = field(init=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def slide_root(self) -> Path:
        return self.root / "slides"

    @property
    def model_path(self) -> Path:
        return self.root / "model" / "tiny.pt"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @classmethod
    def start(cls, root: Path, env: dict[str, str] | None = None,
              worker_env: dict[str, str] | None = None) -> Stack:
        """Start the stack; ``env`` adds to (or overrides) the ``NUCSEG_*`` settings below, and
        ``worker_env`` adds to that for the workers only."""
        stack = cls(root, {}, free_port(), free_port(), worker_env=dict(worker_env or {}))
        stack._prepare(env or {})
        try:
            stack.start_redis()
            stack.start_worker()
            stack.api = stack._spawn(["serve", "--port", str(stack.api_port), "--log-level", "warning"], "api")
            stack.client = stack.client_for("lab-a")
            stack.wait_ready()
        except BaseException:
            stack.stop()
            raise
        return stack

    @classmethod
    @contextlib.contextmanager
    def running(cls, root: Path, env: dict[str, str] | None = None,
                worker_env: dict[str, str] | None = None) -> Iterator[Stack]:
        """``start`` the stack for a ``with`` block, and ``stop`` it however the block ends."""
        stack = cls.start(root, env, worker_env)
        try:
            yield stack
        finally:
            stack.stop()

    def client_for(self, tenant: str | None, base_url: str | None = None) -> httpx.Client:
        """An HTTP client with ``tenant``'s API key (None: no key at all)."""
        return tenant_client(base_url or self.base_url, tenant)

    def start_redis(self) -> None:
        """(Re)start redis-server on the same port and data directory (its AOF is replayed)."""
        self.redis = start_redis(self.redis_port, self.data_dir / "redis", log_path=self.root / "redis.log")

    def _prepare(self, extra_env: dict[str, str]) -> None:
        self.slide_root.mkdir(parents=True)
        for name in ("cmu_small_region.svs", "small.svs", "unreadable.svs", "unopenable.tiff", "boxes.tiff"):
            shutil.copy(sample(name), self.slide_root / name)
        (self.slide_root / "cases").mkdir()
        (self.slide_root / "cases" / "tile.png").write_bytes(png_bytes(64, 64, seed=3))
        (self.slide_root / "escape.svs").symlink_to(sample("small.svs").resolve())
        (self.slide_root / "loop").symlink_to(self.slide_root / "loop")  # a symlink loop
        write_checkpoint(self.model_path)
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "NUCSEG_DATA_DIR": str(self.data_dir),
            "NUCSEG_SLIDE_ROOT": str(self.slide_root),
            "NUCSEG_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "NUCSEG_MODEL": str(self.model_path),
            "NUCSEG_DEVICE": "cpu",
            "NUCSEG_PRECISION": "fp32",
            "NUCSEG_MAX_UPLOAD_BYTES": str(UPLOAD_CAP),
            "NUCSEG_MAX_IMAGE_PIXELS": str(1000 * 1000),
            "NUCSEG_LEASE_TTL_S": "3",
            "NUCSEG_SWEEP_INTERVAL_S": "1",
            "NUCSEG_PROGRESS_INTERVAL_S": "0",
            "NUCSEG_RETRY_BACKOFF_S": "1",
            # Tests use small blocks for fine progress: a 512² image in 64 px blocks would be sharded.
            # tests/service/test_sharding.py turns sharding on for its own stack.
            "NUCSEG_SHARD_MIN_BLOCKS": "0",
            "NUCSEG_TENANTS": json.dumps({t: {"keys": [hash_api_key(k)],
                                              "webhook_secret": WEBHOOK_SECRETS[t]} for t, k in KEYS.items()}),
            "NUCSEG_SUBMIT_BURST": "100000",  # limits are tested on their own tenants
            "NUCSEG_WEBHOOK_ALLOW": json.dumps(["127.0.0.1/32"]),
            "NUCSEG_WEBHOOK_BACKOFF_S": "0.5",
            **extra_env,
        }
        for name in ("NUCSEG_AUTH", "NUCSEG_TENANTS_FILE", "NUCSEG_API_KEY", "NUCSEG_CORS_ORIGINS"):
            if name not in extra_env:
                self.env.pop(name, None)
        self.env.pop("NUCSEG_MODEL_SHA256", None)

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.root / f"{log_name}.log").open("ab")
        cmd = [sys.executable, "-m", "cli.service", *args]
        return subprocess.Popen(cmd, env={**self.env, **(env or {})}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    # workers
    @property
    def worker_name(self) -> str:
        return f"test-{self.workers_started}@localhost"

    def start_worker(self) -> None:
        """Start a fresh worker process (prefork, one pool process) named ``worker_name``."""
        self.workers_started += 1
        self.worker_started_at = time.time()
        self.worker = self._spawn(["worker", "--hostname", self.worker_name, "--pool", "prefork",
                                   "--concurrency", "1", "--loglevel", "INFO"], f"worker-{self.workers_started}",
                                  self.worker_env)

    def start_extra_worker(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Another worker process (prefork, one pool process) beside ``worker``; ``env`` adds settings."""
        proc = self._spawn(["worker", "--hostname", name, "--pool", "prefork", "--concurrency", "1",
                            "--loglevel", "INFO"], name.split("@")[0], {**self.worker_env, **(env or {})})
        self.extra_workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """SIGKILL a worker's whole process group (main process and pool child), like a lost node."""
        proc = proc or self.worker
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def spawn_api(self, extra_env: dict[str, str], *, host: str = "127.0.0.1",
                  port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """Another API process on the same Redis, with ``extra_env`` on top of the stack's settings."""
        port = port or free_port()
        log = (self.root / f"api-{port}.log").open("ab")
        cmd = [sys.executable, "-m", "cli.service", "serve", "--host", host, "--port", str(port),
               "--log-level", "warning"]
        proc = subprocess.Popen(cmd, env={**self.env, **extra_env}, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        return proc, port

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until /readyz lists the current worker and the worker's pool process has loaded the model."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                ready = self.client.get("/readyz")
                models = self.client.get("/v1/models")
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if ready.status_code == 200 and self.worker_name in ready.json()["workers"] and \
                    _model_loaded_since(models.json(), self.worker_started_at):
                return
            time.sleep(0.2)
        raise TimeoutError(f"stack not ready after {timeout_s} s; logs in {self.root}")

    def _check_alive(self) -> None:
        for name, proc in (("redis", self.redis), ("api", self.api), ("worker", self.worker)):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see logs in {self.root}")

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        for proc in (self.api, self.worker, *self.extra_workers):
            if proc is not None:
                stop_group(proc, grace_s=15.0)
        if self.redis is not None:
            stop_group(self.redis)

    # jobs
    def submit_upload(self, content: bytes, *, filename: str = "slide.png", options: dict[str, Any] | None = None,
                      metadata: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        data = {}
        if options is not None:
            data["options"] = json.dumps(options)
        if metadata is not None:
            data["metadata"] = json.dumps(metadata)
        return self.client.post("/v1/jobs", files={"file": (filename, content, "application/octet-stream")},
                                data=data, headers=headers)

    def submit_path(self, slide_path: str, *, options: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        body: dict[str, Any] = {"slide_path": slide_path}
        if options is not None:
            body["options"] = options
        if metadata is not None:
            body["metadata"] = metadata
        return self.client.post("/v1/jobs", json=body, headers=headers)

    def job(self, job_id: str, client: httpx.Client | None = None) -> dict[str, Any]:
        resp = (client or self.client).get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def wait(self, job_id: str, until: Iterable[str] = TERMINAL, timeout_s: float = 120.0,
             history: list[dict[str, Any]] | None = None, min_done: int = 0,
             stage: str | None = None, client: httpx.Client | None = None) -> dict[str, Any]:
        """Poll until the job's status is in ``until`` (with ``progress.done >= min_done``, at ``stage``),
        as ``client``'s tenant (default ``client``)."""
        wanted = set(until)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id, client)
            if history is not None:
                history.append(job)
            if job["status"] in wanted and job["progress"]["done"] >= min_done and \
                    stage in (None, job["progress"]["stage"]):
                return job
            if job["status"] in TERMINAL and job["status"] not in wanted:
                raise AssertionError(f"job {job_id} ended {job['status']}, wanted {sorted(wanted)}: {job}")
            time.sleep(0.01 if history is not None else 0.05)  # a history wants every state seen
        raise TimeoutError(f"job {job_id} not {sorted(wanted)} after {timeout_s} s: {self.job(job_id, client)}")

    def run_good_job(self) -> dict[str, Any]:
        """Submit a tiny upload and require that it succeeds."""
        resp = self.submit_upload(png_bytes(64, 64, seed=1), options=FAST)
        assert resp.status_code == 202, resp.text
        job = self.wait(resp.json()["id"])
        assert job["status"] == "succeeded", job
        return job

    def job_exists(self, job_id: str) -> bool:
        """Whether the store holds a record for ``job_id``, whatever its tenant (asks Redis directly)."""
        broker = redis.Redis(port=self.redis_port)
        try:
            return bool(broker.exists(Keys.job(job_id)))
        finally:
            broker.close()

    def wait_lease_expired(self, job_id: str, timeout_s: float = 60.0) -> None:
        """Until the job's lease has expired in Redis (its process is dead and the lease TTL ran out)."""
        broker = redis.Redis(port=self.redis_port)
        try:
            wait_until(lambda: not broker.exists(Keys.lease(job_id)), timeout_s,
                       f"the lease of job {job_id} expires")
        finally:
            broker.close()

    def job_count(self) -> int:
        ids, cursor = [], None
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = self.client.get("/v1/jobs", params=params).json()
            ids += [j["id"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if not cursor:
                return len(ids)


def wait_until(condition: Callable[[], object], timeout_s: float = 60.0, what: str = "condition",
               interval_s: float = 0.05) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not met within {timeout_s} s"
        time.sleep(interval_s)


def wait_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``url`` answers at all (any status), or fail when ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def _model_loaded_since(models: dict[str, Any], since: float) -> bool:
    from datetime import datetime

    return any(datetime.fromisoformat(m["loaded_at"]).timestamp() >= since for m in models.get("models", []))
