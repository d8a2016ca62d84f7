"""``/healthz`` (liveness) and ``/readyz`` (Redis answers and at least one worker replies to a ping)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from api.deps import CeleryDep, RedisDep
from api.errors import ApiError
from api.schemas import Health, Ready, error_responses
from core.celery_app import ping_workers

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The API process is alive (checks nothing else)."""
    return Health()


@router.get("/readyz", response_model=Ready, responses=error_responses(503))
async def readyz(client: RedisDep, celery: CeleryDep) -> Ready:
    """Ready to take jobs: Redis answers a PING and a worker answers a broadcast ping within 1 s."""
    try:
        await run_in_threadpool(client.ping)
    except Exception as exc:
        raise ApiError(503, "store_unavailable", f"Redis does not answer: {exc}",
                       headers={"Retry-After": "5"}) from exc
    workers = await run_in_threadpool(ping_workers, celery, 1.0)
    if not workers:
        raise ApiError(503, "no_workers", "no worker answered a ping within 1 s",
                       headers={"Retry-After": "5"})
    return Ready(workers=workers)
