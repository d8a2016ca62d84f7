"""The job record and its Redis store; light on purpose, because the API imports it too.

Keys (all under ``nucseg:``):

- ``job:{id}``: hash, one job. Plain strings for scalars, JSON for nested values.
- ``jobs`` and ``jobs:{status}``: indexes. Sorted sets whose scores are all 0 and whose members are
  ``{created_us:016d}:{id}``, so ``ZRANGE ... BYLEX REV`` lists newest first and a member is a
  stable cursor.
- ``t:{tenant}:jobs`` and ``t:{tenant}:jobs:{status}``: the same, per tenant (listing, queue limits).
  The scripts derive these names from the job's ``tenant`` field, so the store needs a single Redis
  (not a cluster), which is what the service runs.
- ``expiry``: finished jobs scored by when they finished (the retention sweep reads it).
- ``webhooks``: jobs with a ``callback_url`` whose terminal-state webhook is due, scored by when.
- ``lease:{id}``: the token of the process running the job. That process refreshes its TTL from
  a thread; when it dies the lease expires and the job counts as orphaned (see ``recover``).
- ``retrying``: jobs waiting for a retry, scored by when the retry is due.
- ``idem:{tenant}:{sha256(key)}``: idempotency keys, JSON ``{job_id, fingerprint}``, 24 h.
- ``models``: hash, sha256 -> JSON of the model cards that workers have loaded.
- ``metrics``: hash of counters and histogram buckets that workers add to.

Every state change is one Lua script, so the status, the index move and the lease check happen
atomically. The record in Redis is the truth about a job; Celery's ``AsyncResult`` is never asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
PREFIX = "nucseg:"
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)


def new_job_id() -> str:
    """A random 32-hex-digit job id."""
    return uuid.uuid4().hex


class Progress(BaseModel):
    """Where a job is: ``stage`` and ``done`` of ``total`` units (blocks)."""

    stage: str = "queued"
    done: int = 0
    total: int = 0


class JobError(BaseModel):
    """Why a job failed: a stable ``code`` and a message naming the bad value."""

    code: str
    message: str


class JobRecord(BaseModel):
    """One job as stored. ``slide_file`` and ``upload_dir`` are server paths, never shown to clients."""

    id: str
    status: Status = "queued"
    tenant: str = "default"
    queue: str = "cpu"
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    progress: Progress = Field(default_factory=Progress)
    slide: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    error: JobError | None = None
    results: list[dict[str, Any]] | None = None
    model: dict[str, Any] | None = None
    attempts: int = 0
    retries: int = 0
    redeliveries: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    slide_file: str = ""
    upload_dir: str | None = None
    delivery_tag: str | None = None
    callback_url: str | None = None
    webhook_status: str | None = None  # pending | retrying | delivered | failed
    webhook_attempt_count: int = 0
    webhook_attempts: list[dict[str, Any]] | None = None  # the latest few, oldest first
    webhook_next_at: float | None = None

    @property
    def index_member(self) -> str:
        return f"{round(self.created_at * 1e6):016d}:{self.id}"


_JSON_FIELDS = frozenset({"progress", "slide", "options", "metadata", "error", "results", "model",
                          "webhook_attempts"})
_INTERNAL = frozenset({"owner", "ix", "retry_at"})


def encode_fields(values: Mapping[str, Any]) -> dict[str, str]:
    """Hash values: JSON for nested fields, ``1``/``0`` for booleans, ``str`` for the rest."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in _JSON_FIELDS:
            out[key] = json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        else:
            out[key] = str(value)
    return out


def decode_record(raw: Mapping[str, str]) -> JobRecord:
    """The inverse of ``encode_fields`` for a whole hash."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _INTERNAL:
            continue
        if key in _JSON_FIELDS:
            data[key] = json.loads(value)
        elif key == "cancel_requested":
            data[key] = value == "1"
        else:
            data[key] = value
    return JobRecord.model_validate(data)


# KEYS of every script: job, lease, the five status indexes (in STATUSES order), all-jobs index, extra.
_LUA_PRELUDE = """
local IDX = {queued=3, running=4, succeeded=5, failed=6, cancelled=7}
local function status() return redis.call('HGET', KEYS[1], 'status') end
local function hset_pairs(first)
  for i = first, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local function owns(token) return redis.call('GET', KEYS[2]) == token end
local TERMINAL = {succeeded=true, failed=true, cancelled=true}
local function tenant() return redis.call('HGET', KEYS[1], 'tenant') or 'default' end
local function tkey(t, st)
  if st then return 'nucseg:t:' .. t .. ':jobs:' .. st end
  return 'nucseg:t:' .. t .. ':jobs'
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function on_terminal()
  local id = redis.call('HGET', KEYS[1], 'id')
  local at = clock()
  redis.call('ZADD', 'nucseg:expiry', at, id)
  local url = redis.call('HGET', KEYS[1], 'callback_url')
  if url and url ~= '' and not redis.call('HGET', KEYS[1], 'webhook_status') then
    redis.call('HSET', KEYS[1], 'webhook_status', 'pending', 'webhook_next_at', tostring(at))
    redis.call('ZADD', 'nucseg:webhooks', at, id)
  end
end
local function move(to)
  local from = status()
  local ix = redis.call('HGET', KEYS[1], 'ix')
  local t = tenant()
  if from and IDX[from] then
    redis.call('ZREM', KEYS[IDX[from]], ix)
    redis.call('ZREM', tkey(t, from), ix)
  end
  redis.call('ZADD', KEYS[IDX[to]], 0, ix)
  redis.call('ZADD', tkey(t, to), 0, ix)
  redis.call('HSET', KEYS[1], 'status', to)
  if TERMINAL[to] then on_terminal() end
end
"""

# ARGV: idem_value, idem_ttl_s, tenant, max_queued, then field/value pairs.
# KEYS[9]: the idempotency key or ''. Returns {'created'|'exists'|'limit', detail}.
_CREATE = """
if KEYS[9] ~= '' then
  local prior = redis.call('GET', KEYS[9])
  if prior then return {'exists', prior} end
end
local t = ARGV[3]
local queued = redis.call('ZCARD', tkey(t, 'queued'))
if queued >= tonumber(ARGV[4]) then return {'limit', tostring(queued)} end
hset_pairs(5)
redis.call('HSET', KEYS[1], 'status', 'queued', 'tenant', t)
local ix = redis.call('HGET', KEYS[1], 'ix')
redis.call('ZADD', KEYS[8], 0, ix)
redis.call('ZADD', KEYS[3], 0, ix)
redis.call('ZADD', tkey(t), 0, ix)
redis.call('ZADD', tkey(t, 'queued'), 0, ix)
if KEYS[9] ~= '' then redis.call('SET', KEYS[9], ARGV[1], 'EX', tonumber(ARGV[2])) end
return {'created', ''}
"""

# ARGV: token, lease_ms, now, delivery_tag, worker, stale_owner. KEYS[9]: the retrying index.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local st = status()
if st == 'running' and redis.call('EXISTS', KEYS[2]) == 1 then
  if ARGV[6] == '' or redis.call('GET', KEYS[2]) ~= ARGV[6] then return 'busy' end
end
if st ~= 'queued' and st ~= 'running' then return st end
redis.call('ZREM', KEYS[9], redis.call('HGET', KEYS[1], 'id'))
redis.call('HDEL', KEYS[1], 'retry_at')
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  move('cancelled')
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3], 'updated_at', ARGV[3])
  return 'cancelled'
end
move('running')
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'delivery_tag', ARGV[4], 'worker', ARGV[5],
           'started_at', ARGV[3], 'updated_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[2]))
return 'claimed'
"""

# ARGV: token, then field/value pairs. Returns {owned, cancel_requested}.
_UPDATE = """
if not owns(ARGV[1]) or status() ~= 'running' then return {0, 0} end
hset_pairs(2)
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') == '1' and 1 or 0
return {1, cancel}
"""

# ARGV: token, lease_ms.
_RENEW = """
if not owns(ARGV[1]) then return 0 end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""

# ARGV: token, to_status, then field/value pairs.
_FINISH = """
if not owns(ARGV[1]) or status() ~= 'running' then return 0 end
move(ARGV[2])
hset_pairs(3)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('DEL', KEYS[2])
return 1
"""

# ARGV: token, retry_at, then field/value pairs. KEYS[9]: the retrying index.
_RETRY = """
if not owns(ARGV[1]) or status() ~= 'running' then return 0 end
move('queued')
hset_pairs(3)
redis.call('HINCRBY', KEYS[1], 'retries', 1)
redis.call('HSET', KEYS[1], 'retry_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZADD', KEYS[9], tonumber(ARGV[2]), redis.call('HGET', KEYS[1], 'id'))
redis.call('DEL', KEYS[2])
return 1
"""

# ARGV: now, cancelled_progress_json.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local st = status()
if st == 'queued' then
  move('cancelled')
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'finished_at', ARGV[1], 'updated_at', ARGV[1],
             'progress', ARGV[2])
  return 'cancelled'
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
  return 'cancel_requested'
end
return st
"""

# ARGV: now, max_redeliveries, worker_lost_error_json, requeued_progress_json, cancelled_progress_json.
_RECOVER = """
if status() ~= 'running' or redis.call('EXISTS', KEYS[2]) == 1 then return {'skip', ''} end
local tag = redis.call('HGET', KEYS[1], 'delivery_tag') or ''
redis.call('HDEL', KEYS[1], 'owner')
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  move('cancelled')
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[1], 'updated_at', ARGV[1], 'progress', ARGV[5])
  return {'cancelled', tag}
end
local n = tonumber(redis.call('HGET', KEYS[1], 'redeliveries') or '0')
if n >= tonumber(ARGV[2]) then
  move('failed')
  redis.call('HSET', KEYS[1], 'error', ARGV[3], 'finished_at', ARGV[1], 'updated_at', ARGV[1])
  return {'failed', tag}
end
move('queued')
redis.call('HINCRBY', KEYS[1], 'redeliveries', 1)
redis.call('HSET', KEYS[1], 'progress', ARGV[4], 'updated_at', ARGV[1])
return {'requeued', tag}
"""

_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local st = status()
if st == 'queued' or st == 'running' then return st end
local ix = redis.call('HGET', KEYS[1], 'ix')
local id = redis.call('HGET', KEYS[1], 'id')
local t = tenant()
redis.call('ZREM', KEYS[IDX[st]], ix)
redis.call('ZREM', KEYS[8], ix)
redis.call('ZREM', tkey(t, st), ix)
redis.call('ZREM', tkey(t), ix)
redis.call('ZREM', 'nucseg:expiry', id)
redis.call('ZREM', 'nucseg:webhooks', id)
redis.call('DEL', KEYS[1])
return 'deleted'
"""


WEBHOOKS_KEY = f"{PREFIX}webhooks"
EXPIRY_KEY = f"{PREFIX}expiry"
MAX_WEBHOOK_ATTEMPTS_SHOWN = 10

# KEYS[1]: the due set. ARGV: now, lease_s, limit. Takes due webhooks, hiding each for lease_s.
_TAKE_WEBHOOKS = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id) end
return due
"""

# KEYS: job, due set. ARGV: status, attempt_json, max_shown, next_at ('' when done), job_id.
_WEBHOOK_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[5])
  return 0
end
local attempts = cjson.decode(redis.call('HGET', KEYS[1], 'webhook_attempts') or '[]')
table.insert(attempts, cjson.decode(ARGV[2]))
while #attempts > tonumber(ARGV[3]) do table.remove(attempts, 1) end
redis.call('HSET', KEYS[1], 'webhook_status', ARGV[1], 'webhook_attempts', cjson.encode(attempts))
redis.call('HINCRBY', KEYS[1], 'webhook_attempt_count', 1)
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'webhook_next_at')
  redis.call('ZREM', KEYS[2], ARGV[5])
else
  redis.call('HSET', KEYS[1], 'webhook_next_at', ARGV[4])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[5])
end
return 1
"""


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
        self._scripts = {
            name: client.register_script(_LUA_PRELUDE + body)
            for name, body in (("create", _CREATE), ("claim", _CLAIM), ("update", _UPDATE),
                               ("renew", _RENEW), ("finish", _FINISH), ("retry", _RETRY),
                               ("cancel", _CANCEL), ("recover", _RECOVER), ("delete", _DELETE))
        }
        self._take_webhooks = client.register_script(_TAKE_WEBHOOKS)
        self._webhook_attempt = client.register_script(_WEBHOOK_ATTEMPT)

    # keys
    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def index_key(status: str | None = None) -> str:
        return f"{PREFIX}jobs" if status is None else f"{PREFIX}jobs:{status}"

    def _keys(self, job_id: str, extra: str = "") -> list[str]:
        return [self.job_key(job_id), f"{PREFIX}lease:{job_id}",
                *(self.index_key(s) for s in STATUSES), self.index_key(), extra]

    def _run(self, name: str, job_id: str, args: Iterable[Any], extra: str = "") -> Any:
        result = self._scripts[name](keys=self._keys(job_id, extra), args=list(args))
        return _decode(result)

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
        return int(self.r.zcard(tenant_index_key(tenant, "queued")))

    def lookup_idempotency(self, key: str) -> tuple[str, str] | None:
        """``(job_id, fingerprint)`` stored under an idempotency key, if any."""
        raw = self.r.get(key)
        if raw is None:
            return None
        known = json.loads(raw)
        return known["job_id"], known["fingerprint"]

    @staticmethod
    def idempotency_key(tenant: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{PREFIX}idem:{tenant}:{digest}"

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.hgetall(self.job_key(job_id))
        return decode_record(_decode(raw)) if raw else None

    def page(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None,
             tenant: str | None = None) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first (of ``tenant``, else all), after ``cursor`` (an index member);
        returns the next cursor or None."""
        top = f"({cursor}" if cursor else "+"
        index = self.index_key(status) if tenant is None else tenant_index_key(tenant, status)
        members = _decode(self.r.zrange(index, top, "-", desc=True, bylex=True, offset=0, num=limit + 1))
        more = len(members) > limit
        members = members[:limit]
        pipe = self.r.pipeline(transaction=False)
        for member in members:
            pipe.hgetall(self.job_key(member.split(":", 1)[1]))
        records = [decode_record(_decode(raw)) for raw in pipe.execute() if raw]
        return records, (members[-1] if more and members else None)

    def count_by_status(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(self.index_key(status))
        return dict(zip(STATUSES, (int(n) for n in pipe.execute()), strict=True))

    def discard(self, job_id: str, idempotency_key: str | None = None) -> None:
        """Forget a job that could not be enqueued (and the idempotency key that names it)."""
        record = self.get(job_id)
        if record is None:
            return
        pipe = self.r.pipeline(transaction=True)
        for index in (self.index_key(), self.index_key(record.status), tenant_index_key(record.tenant),
                      tenant_index_key(record.tenant, record.status)):
            pipe.zrem(index, record.index_member)
        pipe.delete(self.job_key(job_id))
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
        args = [token, _ms(lease_ttl_s), now(), delivery_tag, worker, stale_owner]
        return str(self._run("claim", job_id, args, f"{PREFIX}retrying"))

    def lease_owner(self, job_id: str) -> str | None:
        return _decode(self.r.get(f"{PREFIX}lease:{job_id}"))

    def update(self, job_id: str, token: str, **fields: Any) -> tuple[bool, bool]:
        """Set fields if ``token`` still owns the running job; returns ``(owned, cancel_requested)``."""
        values = encode_fields({**fields, "updated_at": now()})
        owned, cancel = self._run("update", job_id, [token, *_flat(values)])
        return bool(owned), bool(cancel)

    def renew(self, job_id: str, token: str, lease_ttl_s: float) -> bool:
        return bool(self._run("renew", job_id, [token, _ms(lease_ttl_s)]))

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
                              f"{PREFIX}retrying"))

    def overdue_retries(self, grace_s: float) -> list[str]:
        """Jobs whose retry message is ``grace_s`` late: it was probably lost with its worker."""
        return list(_decode(self.r.zrange(f"{PREFIX}retrying", "-inf", now() - grace_s, byscore=True)))

    def touch_retry(self, job_id: str, delay_s: float) -> None:
        self.r.zadd(f"{PREFIX}retrying", {job_id: now() + delay_s}, xx=True)

    def orphans(self) -> list[str]:
        """Running jobs whose lease has expired (their process is gone)."""
        ids = [m.split(":", 1)[1] for m in _decode(self.r.zrange(self.index_key("running"), 0, -1))]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(f"{PREFIX}lease:{job_id}")
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
        queue = _decode(self.r.hget(self.job_key(job_id), "queue")) or "cpu"
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
        result = self._take_webhooks(keys=[WEBHOOKS_KEY], args=[now(), lease_s, limit])
        return [str(job_id) for job_id in _decode(result)]

    def record_webhook_attempt(self, job_id: str, attempt: Mapping[str, Any], *, status: str,
                               next_at: float | None) -> bool:
        """Append an attempt; ``next_at`` schedules another, None ends delivery. False: job gone."""
        args: list[str | int] = [status, json.dumps(dict(attempt)), MAX_WEBHOOK_ATTEMPTS_SHOWN,
                                 "" if next_at is None else repr(next_at), job_id]
        return bool(self._webhook_attempt(keys=[self.job_key(job_id), WEBHOOKS_KEY], args=args))

    def drop_webhook(self, job_id: str) -> None:
        self.r.zrem(WEBHOOKS_KEY, job_id)

    # retention
    def expired(self, before: float, limit: int = 100) -> list[str]:
        """Finished jobs that finished before ``before`` (oldest first)."""
        return [str(j) for j in _decode(self.r.zrange(EXPIRY_KEY, "-inf", before, byscore=True,
                                                      offset=0, num=limit))]

    def forget_expiry(self, job_id: str) -> None:
        self.r.zrem(EXPIRY_KEY, job_id)

    # models and metrics
    def publish_model(self, sha256: str, info: Mapping[str, Any]) -> None:
        self.r.hset(f"{PREFIX}models", sha256, json.dumps(dict(info)))

    def models(self) -> list[dict[str, Any]]:
        raw = _decode(self.r.hgetall(f"{PREFIX}models"))
        cards = [json.loads(v) for v in raw.values()]
        return sorted(cards, key=lambda m: m.get("loaded_at", 0), reverse=True)

    def observe(self, status: str, duration_s: float, tiles: int) -> None:
        """Add one finished job to the duration histogram and the tile counter."""
        bucket = next((f"{b:g}" for b in DURATION_BUCKETS if duration_s <= b), "+Inf")
        pipe = self.r.pipeline(transaction=False)
        key = f"{PREFIX}metrics"
        pipe.hincrby(key, f"duration:{status}:{bucket}", 1)
        pipe.hincrbyfloat(key, f"duration_sum:{status}", duration_s)
        pipe.hincrby(key, "tiles", tiles)
        pipe.execute()

    def metric_counters(self) -> dict[str, float]:
        return {k: float(v) for k, v in _decode(self.r.hgetall(f"{PREFIX}metrics")).items()}


class LeaseLostError(Exception):
    """This process no longer owns the job (its lease expired and another worker took it)."""


class LeaseKeeper:
    """Keeps a job's lease alive from a daemon thread while the job runs in this process."""

    def __init__(self, store: JobStore, job_id: str, token: str, ttl_s: float) -> None:
        self.store, self.job_id, self.token, self.ttl_s = store, job_id, token, ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.store.renew(self.job_id, self.token, self.ttl_s):
                    log.warning("job %s: lease lost; stopping at the next block", self.job_id)
                    self.lost.set()
                    return
            except redis.RedisError as exc:  # keep trying: the lease outlives short outages
                log.warning("job %s: lease renewal failed: %s", self.job_id, exc)


class Throttle:
    """True at most once per ``interval_s`` (and always when forced)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.clock, self._last = interval_s, clock, -float("inf")

    def ready(self, *, force: bool = False) -> bool:
        t = self.clock()
        if force or t - self._last >= self.interval_s:
            self._last = t
            return True
        return False


def new_token(worker: str) -> str:
    """A unique owner token for one attempt of one job: ``worker:pid:random``."""
    return f"{worker}:{os.getpid()}:{secrets.token_hex(6)}"


def dead_local_owner(token: str, worker: str) -> bool:
    """True when ``token`` belongs to a process of this same worker that no longer exists.

    A prefork pool child killed mid-job (say by the OOM killer) has its message requeued at once
    (``reject_on_worker_lost``); this lets the next child take the job over without waiting for
    the dead child's lease to expire.
    """
    owner, _, _random = token.rpartition(":")
    owner, _, pid_text = owner.rpartition(":")
    if owner != worker or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def tenant_index_key(tenant: str, status: str | None = None) -> str:
    """The per-tenant index (all jobs, or those in ``status``); the scripts build the same names."""
    base = f"{PREFIX}t:{tenant}:jobs"
    return base if status is None else f"{base}:{status}"


def now() -> float:
    return time.time()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _flat(values: Mapping[str, str]) -> list[str]:
    return [item for pair in values.items() for item in pair]


def _decode(value: Any) -> Any:
    """bytes -> str, recursively through lists and dicts (clients may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {_decode(k): _decode(v) for k, v in value.items()}
    return value
