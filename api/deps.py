"""Dependencies, as ``Annotated`` aliases: ``SettingsDep``, ``RedisDep``, ``StoreDep``, ``CeleryDep``.

Tests override settings with ``app.dependency_overrides[get_settings]``; the Redis client and the
Celery app follow whatever settings are in force (one of each per broker URL, kept on the app).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import redis
from celery import Celery
from fastapi import Depends, Path, Request

from api.auth import KeyTable, authenticate
from api.limits import RateLimiter
from core.celery_app import create_celery
from core.records import JOB_ID_PATTERN
from core.redis_client import connect
from core.settings import Settings, get_settings
from core.store import JobStore

T = TypeVar("T")


class Resources:
    """Clients the app opens lazily and closes at shutdown."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._by_url: dict[tuple[str, str], Any] = {}  # (what, broker URL) -> client
        self._keys: dict[int, tuple[Settings, KeyTable]] = {}

    def _per_url(self, what: str, settings: Settings, make: Callable[[], T]) -> T:
        """One ``what`` per broker URL, made on first use."""
        with self._lock:
            key = (what, settings.broker_url)
            if key not in self._by_url:
                self._by_url[key] = make()
            value: T = self._by_url[key]
            return value

    def redis(self, settings: Settings) -> redis.Redis:
        return self._per_url("redis", settings, lambda: connect(settings.broker_url))

    def store(self, settings: Settings) -> JobStore:
        return self._per_url("store", settings, lambda: JobStore(self.redis(settings)))

    def limiter(self, settings: Settings) -> RateLimiter:
        return self._per_url("limiter", settings, lambda: RateLimiter(self.redis(settings)))

    def celery(self, settings: Settings) -> Celery:
        return self._per_url("celery", settings, lambda: create_celery(settings))

    def keys(self, settings: Settings) -> KeyTable:
        """The key table of these settings (built once per settings object)."""
        with self._lock:
            known = self._keys.get(id(settings))
            if known is None or known[0] is not settings:
                known = (settings, KeyTable.from_settings(settings))
                self._keys[id(settings)] = known
            return known[1]

    def close(self) -> None:
        with self._lock:
            for (what, _url), value in self._by_url.items():
                if what in ("redis", "celery"):
                    value.close()
            self._by_url.clear()


def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


SettingsDep = Annotated[Settings, Depends(get_settings)]
ResourcesDep = Annotated[Resources, Depends(get_resources)]


def get_redis(resources: ResourcesDep, settings: SettingsDep) -> redis.Redis:
    return resources.redis(settings)


RedisDep = Annotated[redis.Redis, Depends(get_redis)]


def get_store(resources: ResourcesDep, settings: SettingsDep) -> JobStore:
    return resources.store(settings)


def get_limiter(resources: ResourcesDep, settings: SettingsDep) -> RateLimiter:
    return resources.limiter(settings)


def get_celery(resources: ResourcesDep, settings: SettingsDep) -> Celery:
    return resources.celery(settings)


def get_tenant(request: Request, resources: ResourcesDep, settings: SettingsDep) -> str:
    """The caller's tenant, from its API key (401 without a valid one); ``default`` without auth."""
    server = request.scope.get("server")
    return authenticate(request.headers.get("authorization"), resources.keys(settings), settings,
                        server[0] if server else None)


StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]
TenantDep = Annotated[str, Depends(get_tenant)]
JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="32 lowercase hex digits")]
