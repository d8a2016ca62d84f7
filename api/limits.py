"""Per-tenant limits on ``POST /v1/jobs``: a request rate (GCRA in Redis) and a queued-job cap.

Both answer ``429`` with ``Retry-After``. The rate limit is a generic cell rate algorithm: one
Redis key per tenant holds the theoretical arrival time, so every API replica shares the budget
and a request costs one atomic script call. The queued-job cap is checked here before the body is
read (so an over-limit tenant does not upload gigabytes for nothing) and again atomically when the
job is stored (``JobStore.create``).
"""

from __future__ import annotations

import math
import time

import redis

from api.errors import ApiError
from core.keys import Keys
from core.settings import Settings
from core.store import JobStore

QUEUE_FULL_RETRY_S = 30

# KEYS[1]: the tenant's bucket. ARGV: now_ms, interval_ms, burst. Returns 0 or the wait in ms.
_GCRA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local allow_at = tat + interval - burst * interval
if now < allow_at then return math.ceil(allow_at - now) end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
return 0
"""


class RateLimiter:
    """``submit_burst`` requests at once, then ``submit_rate_per_min`` per minute, per tenant."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_GCRA)

    def wait_ms(self, tenant: str, settings: Settings) -> int:
        """0 when the request may go ahead (and counts it), else how long to wait."""
        interval_ms = 60_000.0 / settings.submit_rate_per_min
        args = [int(time.time() * 1000), interval_ms, settings.submit_burst]
        return int(self._script(keys=[Keys.submit_rate(tenant)], args=args))

    def check(self, tenant: str, settings: Settings) -> None:
        """Raise 429 ``rate_limited`` when the tenant is over its submission rate."""
        wait = self.wait_ms(tenant, settings)
        if wait > 0:
            retry = max(1, math.ceil(wait / 1000))
            raise ApiError(429, "rate_limited",
                           f"tenant {tenant!r} is over its rate of {settings.submit_rate_per_min:g} job "
                           f"submissions per minute (burst {settings.submit_burst}); retry in {retry} s",
                           headers={"Retry-After": str(retry)})


def queue_full(tenant: str, queued: int, settings: Settings) -> ApiError:
    return ApiError(429, "too_many_queued_jobs",
                    f"tenant {tenant!r} has {queued} queued jobs, at its limit of "
                    f"{settings.max_queued_per_tenant}; wait for some to start", headers={
                        "Retry-After": str(QUEUE_FULL_RETRY_S)})


def check_queue(store: JobStore, tenant: str, settings: Settings) -> None:
    """Raise 429 ``too_many_queued_jobs`` before reading a body that could not be queued anyway."""
    queued = store.queued_count(tenant)
    if queued >= settings.max_queued_per_tenant:
        raise queue_full(tenant, queued, settings)
