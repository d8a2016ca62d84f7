"""Dependencies, as ``Annotated`` aliases: ``SettingsDep``, ``RedisDep``, ``StoreDep``, ``CeleryDep``.

Tests override settings with ``app.dependency_overrides[get_settings]``; the Redis client and the
Celery app follow whatever settings are in force (one of each per broker URL, kept on the app).
"""

from __future__ import annotations

import threading
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Path, Request

from api.auth import KeyTable, authenticate
from api.limits import RateLimiter
from worker.celery_app import create_celery
from worker.jobs import JOB_ID_PATTERN, JobStore
from worker.settings import Settings, get_settings


class Resources:
    """Clients the app opens lazily and closes at shutdown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._redis: dict[str, redis.Redis] = {}
        self._celery: dict[str, Celery] = {}
        self._stores: dict[str, JobStore] = {}
        self._keys: dict[int, tuple[Settings, KeyTable]] = {}
        self._limiters: dict[str, RateLimiter] = {}

    def redis(self, settings: Settings) -> redis.Redis:
        with self._lock:
            url = settings.broker_url
            if url not in self._redis:
                self._redis[url] = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                                        socket_connect_timeout=2, health_check_interval=30)
            return self._redis[url]

    def store(self, settings: Settings) -> JobStore:
        client = self.redis(settings)
        with self._lock:
            url = settings.broker_url
            if url not in self._stores:
                self._stores[url] = JobStore(client)
            return self._stores[url]

    def limiter(self, settings: Settings) -> RateLimiter:
        client = self.redis(settings)
        with self._lock:
            url = settings.broker_url
            if url not in self._limiters:
                self._limiters[url] = RateLimiter(client)
            return self._limiters[url]

    def celery(self, settings: Settings) -> Celery:
        with self._lock:
            url = settings.broker_url
            if url not in self._celery:
                self._celery[url] = create_celery(settings)
            return self._celery[url]

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
            for client in self._redis.values():
                client.close()
            for app in self._celery.values():
                app.close()
            self._redis.clear()
            self._celery.clear()
            self._stores.clear()
            self._limiters.clear()


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
