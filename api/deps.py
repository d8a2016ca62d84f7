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

    def celery(self, settings: Settings) -> Celery:
        with self._lock:
            url = settings.broker_url
            if url not in self._celery:
                self._celery[url] = create_celery(settings)
            return self._celery[url]

    def close(self) -> None:
        with self._lock:
            for client in self._redis.values():
                client.close()
            for app in self._celery.values():
                app.close()
            self._redis.clear()
            self._celery.clear()
            self._stores.clear()


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


def get_celery(resources: ResourcesDep, settings: SettingsDep) -> Celery:
    return resources.celery(settings)


def get_tenant() -> str:
    """The caller's tenant; one tenant until API keys arrive."""
    return "default"


StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
TenantDep = Annotated[str, Depends(get_tenant)]
JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="32 lowercase hex digits")]
