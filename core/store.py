"""The job store: job records, their indexes and transitions in Redis.

Every method is one round trip or one atomic script (``core.scripts``); key names come from
``core.keys``. Model cards and metrics live beside it in ``core.metrics``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from core.keys import TENANT_INDEX, TENANT_STATUS_INDEX, Keys
from core.metrics import ServiceMetrics
from core.records import (
    STATUSES,
    JobError,
    JobRecord,
    Progress,
    ShardState,
    Status,
    decode,
    decode_record,
    encode_fields,
    now,
)
from core.scripts import JOB_SCRIPTS, PRELUDE, TAKE_WEBHOOKS, WEBHOOK_ATTEMPT

MAX_WEBHOOK_ATTEMPTS_SHOWN = 10


@dataclass(frozen=True)
class CreateOutcome:
    """``created`` is False when the idempotency key already named ``job_id``, or when the tenant
    already had ``queued`` jobs, at or over its limit (then ``job_id`` is empty)."""

    created: bool
    job_id: str
    fingerprint: str
    queued: int | None = None


@dataclass(frozen=True)
class Orphan:
    """A running job whose lease expired, and what ``recover`` did with it."""

    job_id: str
    action: str  # requeued | failed | cancelled
    delivery_tag: str
    queue: str


class JobStore:
    """Job records in Redis. Every method is one round trip or one atomic script."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.metrics = ServiceMetrics(client)
        self._scripts = {name: client.register_script(PRELUDE + body) for name, body in JOB_SCRIPTS.items()}
        self._take_webhooks = client.register_script(TAKE_WEBHOOKS)
        self._webhook_attempt = client.register_script(WEBHOOK_ATTEMPT)

    @staticmethod
    def script_keys(job_id: str, extra: str = "") -> list[str]:
        """The KEYS of every job script, in the order ``core.scripts`` documents."""
        return [Keys.job(job_id), Keys.lease(job_id), *(Keys.index(s) for s in STATUSES), Keys.index(), extra,
                Keys.EXPIRY, Keys.WEBHOOKS, TENANT_INDEX, TENANT_STATUS_INDEX, Keys.shards(job_id), Keys.SHARDED]

    def _run(self, name: str, job_id: str, args: Iterable[Any], extra: str = "") -> Any:
        result = self._scripts[name](keys=self.script_keys(job_id, extra), args=list(args))
        return decode(result)

    # creation and reads
    def create(self, record: JobRecord, *, idempotency: tuple[str, str] | None = None,
               idempotency_ttl_s: int = 86400, max_queued: int = 1 << 62) -> CreateOutcome:
        """Store a new queued job, or return the job an idempotency key already names.

        ``idempotency`` is ``(redis_key, fingerprint)``; see ``idempotency_key``. Nothing is stored
        when ``record.tenant`` already has ``max_queued`` queued jobs (checked atomically).
        """
        key, fingerprint = idempotency or ("", "")
        value = json.dumps({"job_id": record.id, "fingerprint": fingerprint})
        fields = encode_fields(record.model_dump(exclude={"status", "tenant"}))
        fields["ix"] = record.index_member
        flat = [item for pair in fields.items() for item in pair]
        args = [value, idempotency_ttl_s, record.tenant, max_queued, *flat]
        outcome, detail = self._run("create", record.id, args, key)
        if outcome == "exists":
            known = json.loads(detail)
            return CreateOutcome(False, known["job_id"], known["fingerprint"])
        if outcome == "limit":
            return CreateOutcome(False, "", fingerprint, queued=int(detail))
        return CreateOutcome(True, record.id, fingerprint)

    def queued_count(self, tenant: str) -> int:
        """How many of ``tenant``'s jobs are queued."""
        return int(self.r.zcard(Keys.tenant_index(tenant, "queued")))

    def lookup_idempotency(self, key: str) -> tuple[str, str] | None:
        """``(job_id, fingerprint)`` stored under an idempotency key, if any."""
        raw = self.r.get(key)
        if raw is None:
            return None
        known = json.loads(raw)
        return known["job_id"], known["fingerprint"]

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(Keys.job(job_id)))

    def get(self, job_id: str) -> JobRecord | None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(Keys.job(job_id))
        pipe.hgetall(Keys.shards(job_id))
        raw, shards = pipe.execute()
        return with_shards(decode(raw), decode(shards)) if raw else None

    def page(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None,
             tenant: str | None = None) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first (of ``tenant``, else all), after ``cursor`` (an index member);
        returns the next cursor or None."""
        top = f"({cursor}" if cursor else "+"
        index = Keys.index(status) if tenant is None else Keys.tenant_index(tenant, status)
        members = decode(self.r.zrange(index, top, "-", desc=True, bylex=True, offset=0, num=limit + 1))
        more = len(members) > limit
        members = members[:limit]
        pipe = self.r.pipeline(transaction=False)
        for member in members:
            job_id = member.split(":", 1)[1]
            pipe.hgetall(Keys.job(job_id))
            pipe.hgetall(Keys.shards(job_id))
        replies = decode(pipe.execute())
        records = [with_shards(raw, shards) for raw, shards in zip(replies[::2], replies[1::2], strict=True) if raw]
        return records, (members[-1] if more and members else None)

    def count_by_status(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(Keys.index(status))
        return dict(zip(STATUSES, (int(n) for n in pipe.execute()), strict=True))

    def discard(self, job_id: str, idempotency_key: str | None = None) -> None:
        """Forget a job that could not be enqueued (and the idempotency key that names it)."""
        record = self.get(job_id)
        if record is None:
            return
        pipe = self.r.pipeline(transaction=True)
        for index in (Keys.index(), Keys.index(record.status), Keys.tenant_index(record.tenant),
                      Keys.tenant_index(record.tenant, record.status)):
            pipe.zrem(index, record.index_member)
        pipe.delete(Keys.job(job_id))
        known = self.lookup_idempotency(idempotency_key) if idempotency_key else None
        if idempotency_key and known and known[0] == job_id:
            pipe.delete(idempotency_key)
        pipe.execute()

    # worker side
    def claim(self, job_id: str, token: str, *, lease_ttl_s: float, delivery_tag: str, worker: str,
              stale_owner: str = "") -> str:
        """Make ``token`` the owner of a queued (or orphaned running) job.

        Returns ``claimed``, ``cancelled`` (a cancel was pending), ``busy`` (a live owner has it),
        ``missing`` or the terminal status; only ``claimed`` means run it. A lease held by
        ``stale_owner`` (known dead) does not count as live.
        """
        args = [token, milliseconds(lease_ttl_s), now(), delivery_tag, worker, stale_owner]
        return str(self._run("claim", job_id, args, Keys.RETRYING))

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for the job (``DELETE`` on a running job sets the flag)."""
        return bool(decode(self.r.hget(Keys.job(job_id), "cancel_requested")) == "1")

    def lease_owner(self, job_id: str) -> str | None:
        return decode(self.r.get(Keys.lease(job_id)))

    def update(self, job_id: str, token: str, **fields: Any) -> tuple[bool, bool]:
        """Set fields if ``token`` still owns the running job; returns ``(owned, cancel_requested)``."""
        values = encode_fields({**fields, "updated_at": now()})
        owned, cancel = self._run("update", job_id, [token, *_flat(values)])
        return bool(owned), bool(cancel)

    def renew(self, job_id: str, token: str, lease_ttl_s: float) -> bool:
        return bool(self._run("renew", job_id, [token, milliseconds(lease_ttl_s)]))

    def finish(self, job_id: str, token: str, status: Status, **fields: Any) -> bool:
        """Move an owned running job to a terminal ``status``; False when the lease was lost."""
        stamp = now()
        values = encode_fields({**fields, "finished_at": stamp, "updated_at": stamp})
        return bool(self._run("finish", job_id, [token, status, *_flat(values)]))

    def schedule_retry(self, job_id: str, token: str, delay_s: float, error: JobError) -> bool:
        """Back to ``queued`` until a retry message, due in ``delay_s``, picks it up."""
        values = encode_fields({"error": error, "updated_at": now(),
                                "progress": Progress(stage="retrying"), "worker": ""})
        return bool(self._run("retry", job_id, [token, now() + delay_s, *_flat(values)],
                              Keys.RETRYING))

    def overdue_retries(self, grace_s: float) -> list[str]:
        """Jobs whose retry message is ``grace_s`` late: it was probably lost with its worker."""
        return list(decode(self.r.zrange(Keys.RETRYING, "-inf", now() - grace_s, byscore=True)))

    def touch_retry(self, job_id: str, delay_s: float) -> None:
        self.r.zadd(Keys.RETRYING, {job_id: now() + delay_s}, xx=True)

    def orphans(self) -> list[str]:
        """Running jobs whose lease has expired (their process is gone)."""
        ids = [m.split(":", 1)[1] for m in decode(self.r.zrange(Keys.index("running"), 0, -1))]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(Keys.lease(job_id))
        return [job_id for job_id, alive in zip(ids, pipe.execute(), strict=True) if not alive]

    def recover(self, job_id: str, *, max_redeliveries: int) -> Orphan | None:
        """Requeue an orphaned running job, or fail it (``worker_lost``) after too many requeues."""
        lost = JobError(code="worker_lost", message=(
            f"the worker running job {job_id} was lost {max_redeliveries + 1} times; giving up"))
        args = [now(), max_redeliveries, lost.model_dump_json(), Progress(stage="requeued").model_dump_json(),
                Progress(stage="cancelled").model_dump_json()]
        action, tag = self._run("recover", job_id, args)
        if action == "skip":
            return None
        queue = decode(self.r.hget(Keys.job(job_id), "queue")) or "cpu"
        return Orphan(job_id, action, tag, queue)

    # API side
    def cancel(self, job_id: str) -> str:
        """``cancelled`` (was queued), ``cancel_requested`` (running), ``missing`` or the terminal status."""
        return str(self._run("cancel", job_id, [now(), Progress(stage="cancelled").model_dump_json()]))

    def delete(self, job_id: str) -> str:
        """Remove a finished job's record: ``deleted``, ``missing``, or the live status (not deleted)."""
        return str(self._run("delete", job_id, []))

    # webhooks
    def take_webhooks(self, lease_s: float, limit: int = 16) -> list[str]:
        """Ids of jobs whose webhook is due, each hidden from other takers for ``lease_s``."""
        result = self._take_webhooks(keys=[Keys.WEBHOOKS], args=[now(), lease_s, limit])
        return [str(job_id) for job_id in decode(result)]

    def record_webhook_attempt(self, job_id: str, attempt: Mapping[str, Any], *, status: str,
                               next_at: float | None) -> bool:
        """Append an attempt; ``next_at`` schedules another, None ends delivery. False: job gone."""
        args: list[str | int] = [status, json.dumps(dict(attempt)), MAX_WEBHOOK_ATTEMPTS_SHOWN,
                                 "" if next_at is None else repr(next_at), job_id]
        return bool(self._webhook_attempt(keys=[Keys.job(job_id), Keys.WEBHOOKS], args=args))

    def drop_webhook(self, job_id: str) -> None:
        self.r.zrem(Keys.WEBHOOKS, job_id)

    # retention
    def expired(self, before: float, limit: int = 100) -> list[str]:
        """Finished jobs that finished before ``before`` (oldest first)."""
        return [str(j) for j in decode(self.r.zrange(Keys.EXPIRY, "-inf", before, byscore=True,
                                                      offset=0, num=limit))]

    def forget_expiry(self, job_id: str) -> None:
        self.r.zrem(Keys.EXPIRY, job_id)


def with_shards(raw: Mapping[str, str], shards: Mapping[str, str]) -> JobRecord:
    """A record from its hash and its shards hash; while shards run, progress counts their blocks."""
    record = decode_record(raw)
    if not shards:
        return record
    states = sorted((ShardState.model_validate_json(v) for v in shards.values()), key=lambda s: s.index)
    record.shards = states
    if record.status == "running" and raw.get("shards_done") != raw.get("shards_total"):
        total = int(raw.get("blocks_total") or sum(s.size for s in states))
        record.progress = Progress(stage="inference", done=sum(s.done for s in states), total=total)
    return record


def milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _flat(values: Mapping[str, str]) -> list[str]:
    return [item for pair in values.items() for item in pair]
