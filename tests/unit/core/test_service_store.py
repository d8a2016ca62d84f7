"""The job store's Lua transitions against a real redis-server (no worker, no API)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from core.keys import Keys
from core.leases import dead_local_owner, new_token
from core.records import JobError, JobRecord, new_job_id
from core.store import JobStore


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    redis_client.flushdb()
    return JobStore(redis_client)


def _record(created_at: float | None = None) -> JobRecord:
    return JobRecord(id=new_job_id(), created_at=created_at or time.time(), slide={"name": "a.png"},
                     options={"tile_size": 64}, slide_file="/nowhere/a.png")


def _claim(store: JobStore, job_id: str, token: str, ttl: float = 30.0) -> str:
    return store.claim(job_id, token, lease_ttl_s=ttl, delivery_tag="tag-1", worker="w@h")


def test_listing_is_newest_first_with_a_stable_cursor_even_for_equal_times(store: JobStore) -> None:
    same = time.time()
    records = [_record(same) for _ in range(4)] + [_record(same + i) for i in range(1, 4)]
    for rec in records:
        assert store.create(rec).created
    seen, cursor = [], None
    while True:
        page, cursor = store.page(limit=3, cursor=cursor)
        seen += [r.id for r in page]
        if cursor is None:
            break
    expected = [r.id for r in sorted(records, key=lambda r: (r.index_member,), reverse=True)]
    assert seen == expected and len(set(seen)) == 7
    assert store.count_by_status() == {"queued": 7, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}


def test_claim_finish_and_status_indexes(store: JobStore) -> None:
    rec = _record()
    store.create(rec)
    token = new_token("w@h")
    assert _claim(store, rec.id, token) == "claimed"
    assert _claim(store, rec.id, new_token("other@h")) == "busy"  # a live owner has it
    assert store.update(rec.id, token, progress={"stage": "inference", "done": 1, "total": 2}) == (True, False)
    assert store.update(rec.id, "not-the-owner", progress={}) == (False, False)
    assert store.finish(rec.id, token, "succeeded", results=[])
    assert not store.finish(rec.id, token, "failed")  # terminal now
    assert _claim(store, rec.id, new_token("w@h")) == "succeeded"  # a duplicate message is dropped
    got = store.get(rec.id)
    assert got is not None and got.status == "succeeded" and got.attempts == 1
    assert [r.id for r in store.page(status="succeeded")[0]] == [rec.id]
    assert store.page(status="running")[0] == []


def test_cancel_queued_and_running(store: JobStore) -> None:
    queued, running = _record(), _record()
    store.create(queued)
    store.create(running)
    token = new_token("w@h")
    _claim(store, running.id, token)
    assert store.cancel(queued.id) == "cancelled"
    assert _claim(store, queued.id, new_token("w@h")) == "cancelled"
    assert store.cancel(running.id) == "cancel_requested"
    assert store.update(running.id, token, progress={}) == (True, True)
    assert store.cancel(new_job_id()) == "missing"
    assert store.delete(running.id) == "running"  # not while it runs
    assert store.finish(running.id, token, "cancelled")
    assert store.delete(running.id) == "deleted" and store.get(running.id) is None
    assert running.id not in {r.id for r in store.page(limit=100)[0]}


def test_recover_requeues_orphans_then_fails_them_as_worker_lost(store: JobStore) -> None:
    rec = _record()
    store.create(rec)
    for attempt in range(3):
        assert _claim(store, rec.id, new_token("w@h"), ttl=0.05) == "claimed"
        time.sleep(0.1)  # the owner "dies": its lease expires
        assert store.orphans() == [rec.id]
        orphan = store.recover(rec.id, max_redeliveries=2)
        assert orphan is not None
        assert orphan.action == ("requeued" if attempt < 2 else "failed")
        assert orphan.delivery_tag == "tag-1"
    got = store.get(rec.id)
    assert got is not None and got.status == "failed" and got.error is not None
    assert got.error.code == "worker_lost" and got.redeliveries == 2
    assert store.recover(rec.id, max_redeliveries=2) is None


def test_retry_goes_back_to_queued_and_overdue_retries_are_found(store: JobStore) -> None:
    rec = _record()
    store.create(rec)
    token = new_token("w@h")
    _claim(store, rec.id, token)
    assert store.schedule_retry(rec.id, token, 0.05, JobError(code="io_error", message="disk"))
    got = store.get(rec.id)
    assert got is not None and (got.status, got.retries, got.progress.stage) == ("queued", 1, "retrying")
    time.sleep(0.2)
    assert store.overdue_retries(grace_s=0.1) == [rec.id]
    assert _claim(store, rec.id, new_token("w@h")) == "claimed"
    assert store.overdue_retries(grace_s=0) == []


def test_idempotency_key_is_kept_for_a_day_and_discard_forgets_it(store: JobStore) -> None:
    rec = _record()
    key = Keys.idempotency("default", "k1")
    assert store.create(rec, idempotency=(key, "fp1"), idempotency_ttl_s=86400).created
    again = store.create(_record(), idempotency=(key, "fp2"))
    assert not again.created and (again.job_id, again.fingerprint) == (rec.id, "fp1")
    assert 86000 < store.r.ttl(key) <= 86400
    store.discard(rec.id, key)
    assert store.get(rec.id) is None and store.lookup_idempotency(key) is None
    assert store.page()[0] == []


def test_claim_takes_over_only_from_the_named_stale_owner(store: JobStore) -> None:
    rec = _record()
    store.create(rec)
    dead = new_token("w@h")
    assert _claim(store, rec.id, dead) == "claimed"
    fresh = new_token("w@h")
    claim = store.claim(rec.id, fresh, lease_ttl_s=30, delivery_tag="t2", worker="w@h", stale_owner="w@h:1:x")
    assert claim == "busy"
    claim = store.claim(rec.id, fresh, lease_ttl_s=30, delivery_tag="t2", worker="w@h", stale_owner=dead)
    assert claim == "claimed" and store.lease_owner(rec.id) == fresh
    got = store.get(rec.id)
    assert got is not None and got.attempts == 2 and got.delivery_tag == "t2"


def test_dead_local_owner_only_for_this_workers_dead_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    assert dead_local_owner(f"w@h:{pid}:abc", "w@h")
    assert not dead_local_owner(f"w@h:{pid}:abc", "other@h")  # another host: cannot tell
    assert not dead_local_owner(new_token("w@h"), "w@h")  # this very process
    assert not dead_local_owner("w@h:1:abc", "w@h")  # pid 1 is alive


def _tenant_record(tenant: str) -> JobRecord:
    return _record().model_copy(update={"tenant": tenant})


def test_tenant_indexes_limits_and_expiry_follow_every_transition(store: JobStore) -> None:
    a = [_tenant_record("lab-a") for _ in range(3)]
    for rec in a:
        assert store.create(rec, max_queued=3).created
    refused = store.create(_tenant_record("lab-a"), max_queued=3)
    assert (refused.created, refused.queued) == (False, 3)  # nothing stored
    b = _tenant_record("lab-b")
    assert store.create(b, max_queued=3).created  # another tenant's count is its own
    assert {r.id for r in store.page(tenant="lab-a")[0]} == {r.id for r in a}
    assert [r.id for r in store.page(tenant="lab-b")[0]] == [b.id] and store.queued_count("lab-a") == 3

    assert _claim(store, a[0].id, "tok") == "claimed"
    assert store.queued_count("lab-a") == 2
    assert [r.id for r in store.page(tenant="lab-a", status="running")[0]] == [a[0].id]
    assert store.expired(time.time() + 1) == []  # running: not finished, never expires
    assert store.finish(a[0].id, "tok", "succeeded")
    assert store.cancel(a[1].id) == "cancelled"
    assert set(store.expired(time.time() + 1)) == {a[0].id, a[1].id}
    assert store.delete(a[0].id) == "deleted"
    assert a[0].id not in {r.id for r in store.page(tenant="lab-a")[0]}
    assert store.expired(time.time() + 1) == [a[1].id]
    assert store.page(tenant="lab-a", status="succeeded")[0] == []


def test_retention_sweep_deletes_expired_jobs_and_orphans_never_live_ones(store: JobStore, tmp_path: Path) -> None:
    from core.retention import sweep
    from core.settings import Settings

    settings = Settings(data_dir=tmp_path, result_ttl=10, retention_interval_s=60)
    old, live = _record(), _record()
    for rec in (old, live):
        (settings.results_dir / rec.id).mkdir(parents=True)
        (settings.uploads_dir / rec.id).mkdir(parents=True)
        assert store.create(rec.model_copy(update={"upload_dir": str(settings.uploads_dir / rec.id)})).created
    assert _claim(store, old.id, "t1") == "claimed" and store.finish(old.id, "t1", "failed")
    assert _claim(store, live.id, "t2") == "claimed"  # running for ever
    orphan = settings.results_dir / ("f" * 32)
    orphan.mkdir()

    assert sweep(store, settings, now=time.time() + 5) == 0  # not yet expired
    store.r.delete(Keys.RETENTION_LOCK)
    assert sweep(store, settings, now=time.time() + 3 * 3600) == 1
    assert store.get(old.id) is None and not (settings.results_dir / old.id).exists()
    assert not (settings.uploads_dir / old.id).exists() and not orphan.exists()  # an hour old, no record
    assert store.get(live.id) is not None and (settings.results_dir / live.id).is_dir()
    assert sweep(store, settings, now=time.time() + 3 * 3600) == 0  # another sweep waits for the lock


def test_no_lua_script_spells_a_key_name() -> None:
    """Key names come from ``core.keys`` through KEYS; a prefix literal in Lua would be a second spelling."""
    from core import scripts
    from core.keys import PREFIX

    bodies = {name: body for name, body in vars(scripts).items() if name.isupper() and isinstance(body, str)}
    assert len(bodies) >= 10 and [name for name, body in bodies.items() if PREFIX in body] == []
