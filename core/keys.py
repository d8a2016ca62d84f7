"""Every Redis key the service writes, in one place: Python builds them here, the Lua scripts get
them through ``KEYS`` (never as literals), and the tests use the same names.

All keys live under ``nucseg:``:

- ``job:{id}``: hash, one job. Plain strings for scalars, JSON for nested values.
- ``jobs`` and ``jobs:{status}``: indexes. Sorted sets whose scores are all 0 and whose members are
  ``{created_us:016d}:{id}``, so ``ZRANGE ... BYLEX REV`` lists newest first and a member is a
  stable cursor.
- ``t:{tenant}:jobs`` and ``t:{tenant}:jobs:{status}``: the same, per tenant (listing, queue limits).
  The scripts derive these names from the job's ``tenant`` field through the templates
  ``TENANT_INDEX`` and ``TENANT_STATUS_INDEX``, so the store needs a single Redis (not a cluster),
  which is what the service runs.
- ``expiry``: finished jobs scored by when they finished (the retention sweep reads it).
- ``webhooks``: jobs with a ``callback_url`` whose terminal-state webhook is due, scored by when.
- ``lease:{id}``: the token of the process running the job. That process refreshes its TTL from
  a thread; when it dies the lease expires and the job counts as orphaned. While a sharded job's
  shards run, it holds ``SHARDS_HOLDER`` with no TTL: the shards' own leases stand for it.
- ``shards:{id}``: hash, shard index -> JSON of one shard (blocks, status, worker, progress).
- ``lease:{id}:{index}``: the token of the process running one shard, kept alive as a job's lease.
- ``sharded``: set of the jobs whose shards are running (the recovery sweep reads it).
- ``retrying``: jobs waiting for a retry, scored by when the retry is due.
- ``idem:{tenant}:{sha256(key)}``: idempotency keys, JSON ``{job_id, fingerprint}``, 24 h.
- ``models``: hash, sha256 -> JSON of the model cards that workers have loaded.
- ``metrics``: hash of counters and histogram buckets that workers add to.
- ``rate:submit:{tenant}``: the tenant's submission rate bucket (GCRA).
- ``lock:retention``: held by the one worker that sweeps expired jobs.
"""

from __future__ import annotations

import hashlib

PREFIX = "nucseg:"


class Keys:
    """The key layout. Methods build one key; attributes are the fixed keys."""

    EXPIRY = f"{PREFIX}expiry"
    WEBHOOKS = f"{PREFIX}webhooks"
    RETRYING = f"{PREFIX}retrying"
    MODELS = f"{PREFIX}models"
    METRICS = f"{PREFIX}metrics"
    RETENTION_LOCK = f"{PREFIX}lock:retention"
    SHARDED = f"{PREFIX}sharded"

    @staticmethod
    def job(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def lease(job_id: str) -> str:
        return f"{PREFIX}lease:{job_id}"

    @staticmethod
    def shards(job_id: str) -> str:
        return f"{PREFIX}shards:{job_id}"

    @staticmethod
    def shard_lease(job_id: str, index: int) -> str:
        return f"{PREFIX}lease:{job_id}:{index}"

    @staticmethod
    def index(status: str | None = None) -> str:
        """All jobs, or the jobs in ``status``."""
        return f"{PREFIX}jobs" if status is None else f"{PREFIX}jobs:{status}"

    @staticmethod
    def tenant_index(tenant: str, status: str | None = None) -> str:
        """A tenant's jobs, or its jobs in ``status``."""
        base = f"{PREFIX}t:{tenant}:jobs"
        return base if status is None else f"{base}:{status}"

    @staticmethod
    def idempotency(tenant: str, key: str) -> str:
        return f"{PREFIX}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"

    @staticmethod
    def submit_rate(tenant: str) -> str:
        return f"{PREFIX}rate:submit:{tenant}"


# The job lease's value while a sharded job's shards run (a value, not a key).
SHARDS_HOLDER = "shards"

# ``string.format`` templates of the per-tenant indexes, for the scripts (tenant, then status).
TENANT_INDEX = Keys.tenant_index("%s")
TENANT_STATUS_INDEX = Keys.tenant_index("%s", "%s")
