"""A sharded job's shards in the job store: start, claim, progress, done, end, retry, recover.

A job with enough blocks is cut into shards (ranges of whole block rows). The process that claimed
the job calls ``start``: the shards are stored, the job's lease passes to ``SHARDS_HOLDER`` (so the
job is never taken for an orphan while its shards run) and the first ``parallel`` shards are
returned to be sent. Each shard is one Celery task that claims its shard under its own lease. The
shard that completes the set is told to ``merge``: it sends the job's own message again, and the job
task claims the job from ``SHARDS_HOLDER`` and merges. Every other completion hands back the next
pending shard, so one job never holds more than ``parallel`` workers and other jobs interleave.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from core.keys import SHARDS_HOLDER, Keys
from core.records import JobError, Progress, ShardState, decode, now
from core.scripts import PRELUDE
from core.shard_scripts import SHARD_PRELUDE, SHARD_SCRIPTS
from core.store import JobStore, milliseconds

DONE_AT = "shards_done_at"  # job field: when the last shard finished (set by the DONE script)


@dataclass(frozen=True)
class ShardOutcome:
    """What a completed shard tells its worker to send next: ``merge`` (the job), ``next`` (shard
    ``index``), ``wait`` (nothing: other shards are still running) or ``lost`` (not its shard)."""

    action: str
    index: int = -1


class ShardStore:
    """The shards of sharded jobs, beside the ``JobStore`` whose key layout they share."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.r: redis.Redis = store.r
        self._scripts = {name: self.r.register_script(PRELUDE + SHARD_PRELUDE + body)
                         for name, body in SHARD_SCRIPTS.items()}

    def _run(self, name: str, job_id: str, index: int | None, args: Iterable[Any]) -> Any:
        lease = Keys.shard_lease(job_id, index) if index is not None else ""
        keys = self.store.script_keys(job_id, lease)
        return decode(self._scripts[name](keys=keys, args=list(args)))

    def start(self, job_id: str, token: str, blocks: list[tuple[int, int]], *, parallel: int) -> list[int] | None:
        """Store the shards of the job ``token`` owns; the indexes to send now (None: not the owner)."""
        docs = [ShardState(index=i, blocks=b).model_dump_json() for i, b in enumerate(blocks)]
        total = blocks[-1][1] - blocks[0][0] if blocks else 0
        sent = self._run("start", job_id, None, [token, total, parallel, now(), *docs])
        return None if sent is None else [int(i) for i in sent]

    def claim(self, job_id: str, index: int, token: str, *, lease_ttl_s: float, worker: str) -> str:
        """``claimed``, ``done`` (already), ``busy`` (a live owner, or the job is merging), ``cancelled``
        (a cancel was pending: the job is now cancelled), ``missing`` or the job's status."""
        args = [index, token, milliseconds(lease_ttl_s), worker, now(), Progress(stage="cancelled").model_dump_json()]
        return str(self._run("claim", job_id, index, args))

    def renew(self, job_id: str, index: int, token: str, lease_ttl_s: float) -> bool:
        return bool(self._run("renew", job_id, index, [token, milliseconds(lease_ttl_s)]))

    def progress(self, job_id: str, index: int, token: str, done: int) -> tuple[bool, bool]:
        """Record blocks done; returns ``(held, stop)``: stop when cancelled or the job has ended."""
        held, stop = self._run("progress", job_id, index, [index, token, done])
        return bool(held), bool(stop)

    def done(self, job_id: str, index: int, token: str, key: str) -> ShardOutcome:
        """The shard's parts are complete under ``key``."""
        action, nxt = self._run("done", job_id, index, [index, token, key, now()])
        return ShardOutcome(str(action), int(nxt))

    def fail(self, job_id: str, index: int, token: str, error: JobError) -> bool:
        """The shard failed for good, and so does its job."""
        return bool(self._run("end", job_id, index, [index, token, "failed", now(), "error", error.model_dump_json()]))

    def cancel(self, job_id: str, index: int, token: str) -> bool:
        """The shard saw the job's cancel: the job is cancelled."""
        progress = Progress(stage="cancelled").model_dump_json()
        return bool(self._run("end", job_id, index, [index, token, "cancelled", now(), "progress", progress]))

    def retry(self, job_id: str, index: int, token: str, delay_s: float) -> int:
        """Back to ``queued`` after a transient failure, its message due in ``delay_s``; the shard's
        retries so far (-1: not held)."""
        return int(self._run("retry", job_id, index, [index, token, now() + delay_s]))

    def recover(self, job_id: str, index: int, *, max_redeliveries: int) -> str:
        """A running shard whose lease expired: ``requeued``, ``failed`` (too many), ``cancelled`` or ``skip``."""
        lost = JobError(code="worker_lost", message=(
            f"the worker running shard {index} of job {job_id} was lost {max_redeliveries + 1} times; giving up"))
        args = [index, max_redeliveries, now(), lost.model_dump_json(), Progress(stage="cancelled").model_dump_json()]
        return str(self._run("recover", job_id, index, args))

    # the recovery sweep
    def sharded_jobs(self) -> list[str]:
        return sorted(decode(self.r.smembers(Keys.SHARDED)))

    def orphans(self, job_id: str) -> list[int]:
        """Indexes of the job's running shards whose lease has expired."""
        states = self.states(job_id)
        running = [s.index for s in states if s.status == "running"]
        pipe = self.r.pipeline(transaction=False)
        for index in running:
            pipe.exists(Keys.shard_lease(job_id, index))
        return [i for i, alive in zip(running, pipe.execute(), strict=True) if not alive]

    def unsent(self, job_id: str, grace_s: float) -> list[int]:
        """Queued shards whose message went out ``grace_s`` ago and never ran; their clocks restart."""
        queued = [s.index for s in self.states(job_id) if s.status == "queued"]
        return [i for i in queued if self._run("resend", job_id, i, [i, now(), grace_s])]

    def all_done_at(self, job_id: str) -> float | None:
        """When the job's last shard finished (None until every shard has; the sweep may move it)."""
        total, done, at = decode(self.r.hmget(Keys.job(job_id), "shards_total", "shards_done", DONE_AT))
        return float(at) if total and total == done and at else None

    def merge_overdue(self, job_id: str, grace_s: float) -> bool:
        """True (and the clock restarted) when every shard is done, ``grace_s`` ago, and no merge has
        claimed the job: the merge message was probably lost with its worker."""
        at = self.all_done_at(job_id)
        if at is None or at > now() - grace_s or decode(self.r.get(Keys.lease(job_id))) != SHARDS_HOLDER:
            return False
        self.r.hset(Keys.job(job_id), DONE_AT, now())
        return True

    def states(self, job_id: str) -> list[ShardState]:
        raw = decode(self.r.hgetall(Keys.shards(job_id)))
        return sorted((ShardState.model_validate_json(v) for v in raw.values()), key=lambda s: s.index)
