"""Both storage backends against the same checks: the local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from api.deepzoom import MaskPyramid
from core.records import JobRecord, new_job_id
from core.retention import ORPHAN_GRACE_S, remove_job_files, sweep
from core.settings import Settings
from core.storage import LocalStorage, ObjectMissing, S3Storage, Storage, StorageUnavailable
from core.storage.cache import SlideCache
from core.storage.slides import allowed_slide_url
from core.store import JobStore
from model.errors import UnreadableSlideError
from tests.helpers.s3_server import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server
from tests.helpers.service_stack import free_port


def s3_settings(endpoint: str, **extra: object) -> Settings:
    return Settings(s3_endpoint_url=endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                    storage_timeout_s=3, storage_retries=0, **extra)  # type: ignore[arg-type]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "store")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    yield S3Storage(f"s3://{BUCKET}/unit-{uuid.uuid4().hex[:8]}", s3_settings(server.endpoint))


def test_write_read_range_stream_list_delete(storage: Storage, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    with storage.writer("results/a/big.bin") as out:
        for i in range(0, len(data), 1 << 20):
            out.write(data[i:i + (1 << 20)])
    small = tmp_path / "small.json"
    small.write_bytes(b'{"x": 1}')
    storage.put_file("results/a/stats.json", small)
    storage.put_file("uploads/b/slide.png", small)
    info = storage.head("results/a/big.bin")
    assert info.size == len(data) and info.etag
    assert storage.read("results/a/stats.json") == b'{"x": 1}'
    assert storage.read_range("results/a/big.bin", 1_000_000, 4096) == data[1_000_000:1_004_096]
    assert b"".join(storage.stream("results/a/big.bin", 5, 2_500_000)) == data[5:2_500_000]
    assert b"".join(storage.stream("results/a/big.bin")) == data
    with storage.open_reader("results/a/big.bin") as fh:
        fh.seek(2_000_000)
        assert fh.read(10) == data[2_000_000:2_000_010]
    storage.download("results/a/big.bin", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data
    assert set(storage.folders("results")) == {"a"} and set(storage.folders("uploads")) == {"b"}
    storage.delete_prefix("results/a")
    with pytest.raises(ObjectMissing):
        storage.head("results/a/big.bin")
    assert storage.folders("results") == {} and set(storage.folders("uploads")) == {"b"}


def test_a_failed_write_leaves_no_object(storage: Storage) -> None:
    with pytest.raises(RuntimeError, match="client went away"), storage.writer("uploads/c/slide.svs") as out:
        out.write(os.urandom(9 * 1024 * 1024))  # past one multipart part
        raise RuntimeError("client went away")
    with pytest.raises(ObjectMissing):
        storage.head("uploads/c/slide.svs")


def test_a_store_that_is_down_or_refuses_is_unavailable(s3_server: S3Server) -> None:
    down = S3Storage(f"s3://{BUCKET}/x", s3_settings(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageUnavailable, match="failed to read 'a'"):
        down.read("a")
    denied = S3Storage(f"s3://{BUCKET}/x", Settings(s3_endpoint_url=s3_server.endpoint, storage_retries=0,
                                                    AWS_ACCESS_KEY_ID="nobody", AWS_SECRET_ACCESS_KEY="wrong"))  # type: ignore[call-arg]
    with pytest.raises(StorageUnavailable, match="failed to write 'b'"), denied.writer("b") as out:
        out.write(b"x")


def test_a_store_failure_is_a_transient_job_error() -> None:
    from worker.tasks import classify_failure

    transient, error = classify_failure(StorageUnavailable("the object store failed to read 'k'"))
    assert transient and error.code == "storage_unavailable"


def test_slide_cache_fetches_once_checks_sha256_and_evicts_by_bytes(storage: Storage, tmp_path: Path) -> None:
    blobs = {name: os.urandom(1000 + i) for i, name in enumerate(("a.svs", "b.svs", "c.svs"))}
    for name, blob in blobs.items():
        with storage.writer(f"slides/{name}") as out:
            out.write(blob)
    sha = {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}
    cache = SlideCache(tmp_path / "cache", max_bytes=2100)
    path, digest = cache.fetch(storage, "slides/a.svs")  # sha256 unknown: hashed on the way
    assert digest == sha["a.svs"] and path.read_bytes() == blobs["a.svs"] and path.suffix == ".svs"
    again, _ = cache.fetch(storage, "slides/a.svs")  # same version: found through its ETag alias
    assert again == path
    with pytest.raises(UnreadableSlideError, match="changed after it was submitted"):
        cache.fetch(storage, "slides/b.svs", sha256=sha["c.svs"])
    os.utime(path, (1, 1))  # a.svs is the least recently used
    cache.fetch(storage, "slides/b.svs", sha256=sha["b.svs"])
    newest, _ = cache.fetch(storage, "slides/c.svs", sha256=sha["c.svs"])
    assert not path.exists() and newest.exists() and cache.path(sha["b.svs"], ".svs").exists()
    storage.delete_prefix("slides")
    hit, _ = cache.fetch(storage, "slides/c.svs", sha256=sha["c.svs"])  # cached: the store is not asked
    assert hit == newest


def test_mask_tiles_read_by_range_from_the_store(storage: Storage, tmp_path: Path) -> None:
    from model.writers import ClassMapStore, write_tiff_from_store

    rng = np.random.default_rng(0)
    classes = rng.integers(0, 5, (700, 1100), dtype=np.uint8)
    raw = ClassMapStore(tmp_path / "raw.u8", 1100, 700)
    raw.write_block(0, 0, classes)
    write_tiff_from_store(raw, tmp_path / "m.tiff", palette=[(i, i, i) for i in range(5)])
    storage.put_file("results/j/m.tiff", tmp_path / "m.tiff")
    local = MaskPyramid(LocalStorage(tmp_path), "m.tiff")
    remote = MaskPyramid(storage, "results/j/m.tiff")
    for level, col, row in ((11, 0, 0), (11, 3, 2), (10, 1, 1), (5, 0, 0)):
        assert np.array_equal(remote.tile(level, col, row), local.tile(level, col, row))
    assert np.array_equal(remote.tile(11, 0, 0), classes[:256, :256])


@pytest.mark.parametrize(("url", "ok"), [
    ("s3://lab/slides/a.svs", True), ("s3://lab/slides/sub/a.svs", True), ("s3://lab/slides/", False),
    ("s3://lab/slidesX/a.svs", False), ("s3://lab/slides/../secret/a.svs", False), ("s3://other/slides/a", False),
])
def test_slide_urls_must_be_under_an_allowed_prefix(url: str, ok: bool) -> None:
    assert allowed_slide_url(url, ["s3://lab/slides"]) is ok


def test_retention_deletes_a_job_and_orphans_from_the_object_store(s3_server: S3Server,
                                                                   redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    prefix = f"s3://{BUCKET}/retention-{uuid.uuid4().hex[:8]}"
    settings = s3_settings(s3_server.endpoint, storage_url=prefix, result_ttl=60)
    storage = S3Storage(prefix, settings)
    kept, gone, orphan = (new_job_id() for _ in range(3))
    for job_id in (kept, gone, orphan):
        with storage.writer(f"results/{job_id}/attempt/stats.json") as out:
            out.write(b"{}")
    with storage.writer(f"uploads/{gone}/slide.svs") as out:
        out.write(b"slide")
    store = JobStore(redis_client)
    store.create(JobRecord(id=kept, created_at=time.time(), slide_file="uploads/x/slide.svs"))
    remove_job_files(settings, JobRecord(id=gone, created_at=0, upload_dir=f"uploads/{gone}"))
    assert set(storage.folders("results")) == {kept, orphan} and storage.folders("uploads") == {}
    sweep(store, settings, now=time.time() + 2 * ORPHAN_GRACE_S)  # the orphan is old enough now
    assert set(storage.folders("results")) == {kept}
