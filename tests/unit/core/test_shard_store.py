"""A sharded job's shard transitions against a real redis-server (no worker, no API)."""

from __future__ import annotations

import time

import pytest
import redis

from core.keys import SHARDS_HOLDER, Keys
from core.leases import new_token
from core.records import JobError, JobRecord, new_job_id
from core.shards import ShardStore
from core.store import JobStore

BLOCKS = [(0, 4), (4, 8), (8, 12), (12, 14)]


@pytest.fixture
def shards(redis_client: redis.Redis) -> ShardStore:
    redis_client.flushdb()
    return ShardStore(JobStore(redis_client))


def _started(shards: ShardStore, parallel: int = 2) -> tuple[str, list[int]]:
    """A claimed job, cut into ``BLOCKS``; returns its id and the shards to send first."""
    rec = JobRecord(id=new_job_id(), created_at=time.time(), slide_file="/nowhere/a.svs")
    shards.store.create(rec)
    token = new_token("coord@h")
    assert shards.store.claim(rec.id, token, lease_ttl_s=30, delivery_tag="t", worker="coord@h") == "claimed"
    sent = shards.start(rec.id, token, BLOCKS, parallel=parallel)
    assert sent is not None
    return rec.id, sent


def _claim(shards: ShardStore, job_id: str, index: int, worker: str = "w@h", ttl: float = 30) -> tuple[str, str]:
    token = new_token(worker)
    return shards.claim(job_id, index, token, lease_ttl_s=ttl, worker=worker), token


def test_start_hands_the_job_lease_to_the_shards_and_sends_only_the_first_few(shards: ShardStore) -> None:
    job_id, sent = _started(shards, parallel=2)
    assert sent == [0, 1]
    assert shards.r.get(Keys.lease(job_id)) == SHARDS_HOLDER and shards.r.ttl(Keys.lease(job_id)) == -1
    assert shards.store.orphans() == []  # the job is not taken for an orphan while shards run
    assert shards.sharded_jobs() == [job_id]
    record = shards.store.get(job_id)
    assert record is not None and record.status == "running" and record.shards is not None
    assert [(s.index, s.blocks, s.status) for s in record.shards] == [
        (0, (0, 4), "queued"), (1, (4, 8), "queued"), (2, (8, 12), "pending"), (3, (12, 14), "pending")]
    assert record.progress.total == 14 and record.progress.done == 0
    assert shards.start(job_id, "not-the-owner", BLOCKS, parallel=2) is None


def test_shards_run_once_each_then_the_job_is_claimed_to_merge(shards: ShardStore) -> None:
    job_id, _ = _started(shards, parallel=2)
    outcome, t0 = _claim(shards, job_id, 0, "a@h")
    assert outcome == "claimed"
    assert _claim(shards, job_id, 0, "b@h")[0] == "busy"  # a duplicate message while it runs
    assert shards.progress(job_id, 0, t0, 3) == (True, False)
    assert shards.progress(job_id, 0, "stranger", 3) == (False, True)
    record = shards.store.get(job_id)
    assert record is not None and record.progress.done == 3
    # the merge cannot start early
    assert shards.store.claim(job_id, new_token("m@h"), lease_ttl_s=30, delivery_tag="", worker="m@h") == "busy"
    assert shards.done(job_id, 0, t0, "shards/x/0/a").action == "next"  # shard 2 is due now
    assert _claim(shards, job_id, 0, "b@h")[0] == "done"  # finished shards are not redone
    for index in (1, 2):
        outcome, token = _claim(shards, job_id, index, "b@h")
        assert outcome == "claimed"
        step = shards.done(job_id, index, token, f"shards/x/{index}/a")
        assert (step.action, step.index) == (("next", 3) if index == 1 else ("wait", -1))
    outcome, token = _claim(shards, job_id, 3, "c@h")
    assert shards.done(job_id, 3, token, "shards/x/3/a").action == "merge"
    assert shards.done(job_id, 3, token, "shards/x/3/b").action == "lost"  # its lease is gone
    states = shards.states(job_id)
    assert [s.completions for s in states] == [1, 1, 1, 1]
    assert [s.worker for s in states] == ["a@h", "b@h", "b@h", "c@h"]
    assert [s.key for s in states] == [f"shards/x/{i}/a" for i in range(4)]
    merge = new_token("m@h")
    assert shards.store.claim(job_id, merge, lease_ttl_s=30, delivery_tag="", worker="m@h") == "claimed"
    assert shards.store.finish(job_id, merge, "succeeded", results=[])
    assert shards.sharded_jobs() == []
    record = shards.store.get(job_id)
    assert record is not None and record.status == "succeeded" and record.shards is not None


def test_a_failed_shard_fails_the_job_and_stops_the_others(shards: ShardStore) -> None:
    job_id, _ = _started(shards)
    _, t0 = _claim(shards, job_id, 0)
    _, t1 = _claim(shards, job_id, 1)
    assert shards.fail(job_id, 1, t1, JobError(code="unsupported_slide", message="bad tile"))
    record = shards.store.get(job_id)
    assert record is not None and record.status == "failed" and record.error is not None
    assert record.error.code == "unsupported_slide"
    assert shards.progress(job_id, 0, t0, 1) == (True, True)  # the other shard is told to stop
    assert shards.done(job_id, 0, t0, "k").action == "lost"
    assert _claim(shards, job_id, 2)[0] == "failed"
    assert shards.r.exists(Keys.lease(job_id)) == 0 and shards.sharded_jobs() == []


def test_a_cancel_reaches_running_and_queued_shards(shards: ShardStore) -> None:
    job_id, _ = _started(shards)
    _, t0 = _claim(shards, job_id, 0)
    assert shards.store.cancel(job_id) == "cancel_requested"
    assert shards.progress(job_id, 0, t0, 1) == (True, True)
    assert shards.cancel(job_id, 0, t0)
    record = shards.store.get(job_id)
    assert record is not None and record.status == "cancelled" and record.progress.stage == "cancelled"
    job_id, _ = _started(shards)
    shards.store.cancel(job_id)
    assert _claim(shards, job_id, 1)[0] == "cancelled"  # a queued shard that starts after the cancel
    record = shards.store.get(job_id)
    assert record is not None and record.status == "cancelled"


def test_a_shard_whose_worker_died_is_requeued_then_given_up(shards: ShardStore) -> None:
    job_id, _ = _started(shards)
    _, token = _claim(shards, job_id, 0, ttl=0.05)
    time.sleep(0.1)
    assert shards.orphans(job_id) == [0]
    assert shards.recover(job_id, 0, max_redeliveries=1) == "requeued"
    assert shards.recover(job_id, 0, max_redeliveries=1) == "skip"  # queued now, not running
    assert shards.done(job_id, 0, token, "k").action == "lost"  # the dead attempt cannot finish it
    _, token = _claim(shards, job_id, 0, ttl=0.05)
    time.sleep(0.1)
    assert shards.recover(job_id, 0, max_redeliveries=1) == "failed"
    record = shards.store.get(job_id)
    assert record is not None and record.status == "failed" and record.error is not None
    assert record.error.code == "worker_lost" and record.shards is not None
    assert record.shards[0].redeliveries == 1 and record.shards[0].attempts == 2


def test_a_transient_failure_puts_the_shard_back(shards: ShardStore) -> None:
    job_id, _ = _started(shards)
    _, token = _claim(shards, job_id, 0)
    assert shards.retry(job_id, 0, token, 5.0) == 1
    assert shards.retry(job_id, 0, token, 5.0) == -1
    assert shards.unsent(job_id, grace_s=0) == [1]  # shard 0's message is not due yet; shard 1 waits
    assert _claim(shards, job_id, 0)[0] == "claimed"


def test_a_shard_whose_message_was_lost_before_it_ran_is_sent_again(shards: ShardStore) -> None:
    job_id, sent = _started(shards, parallel=2)
    assert shards.unsent(job_id, grace_s=60) == []  # just sent
    assert shards.unsent(job_id, grace_s=0) == sent
    assert shards.unsent(job_id, grace_s=60) == []  # the clocks restarted
    _claim(shards, job_id, 0)
    time.sleep(0.01)
    assert shards.unsent(job_id, grace_s=0) == [1]  # a running shard is the sweep's other concern


def test_a_lost_merge_message_is_noticed(shards: ShardStore) -> None:
    job_id, _ = _started(shards, parallel=4)
    for index in range(4):
        _, token = _claim(shards, job_id, index)
        shards.done(job_id, index, token, "k")
    assert not shards.merge_overdue(job_id, grace_s=60)
    assert shards.merge_overdue(job_id, grace_s=0)
    assert not shards.merge_overdue(job_id, grace_s=60)  # the clock restarted


def test_deleting_a_finished_sharded_job_removes_its_shards(shards: ShardStore) -> None:
    job_id, _ = _started(shards)
    _, token = _claim(shards, job_id, 0)
    shards.fail(job_id, 0, token, JobError(code="x", message="y"))
    assert shards.store.delete(job_id) == "deleted"
    assert shards.r.exists(Keys.shards(job_id)) == 0
