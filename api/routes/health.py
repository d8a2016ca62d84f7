"""``/healthz`` (liveness) and ``/readyz`` (Redis and the store answer, and a worker replies to a ping)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from api.deps import CeleryDep, RedisDep, SettingsDep
from api.errors import ApiError
from api.schemas import Health, Ready, error_responses
from core.celery_app import ping_workers
from core.storage import StorageUnavailable, open_storage

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The API process is alive (checks nothing else)."""
    return Health()


@router.get("/readyz", response_model=Ready, responses=error_responses(503))
async def readyz(client: RedisDep, celery: CeleryDep, settings: SettingsDep) -> Ready:
    """Ready to take jobs: Redis answers a PING, the store answers, and a worker answers a broadcast
    ping within 1 s."""
    try:
        await run_in_threadpool(client.ping)
    except Exception as exc:
        raise ApiError(503, "store_unavailable", f"Redis does not answer: {exc}",
                       headers={"Retry-After": "5"}) from exc
    try:
        await run_in_threadpool(open_storage(settings).check)
    except StorageUnavailable as exc:
        detail = f"{settings.storage_url}: {exc}" if settings.storage_url else "the data folder is not writable"
        raise ApiError(503, exc.code, f"the store cannot be used: {detail}", headers={"Retry-After": "5"}) from exc
    workers = await run_in_threadpool(ping_workers, celery, 1.0)
    if not workers:
        raise ApiError(503, "no_workers", "no worker answered a ping within 1 s",
                       headers={"Retry-After": "5"})
    return Ready(workers=workers)
