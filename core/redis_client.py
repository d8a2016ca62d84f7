"""The one way the service opens Redis: decoded responses, socket timeouts and health checks, so a
hung server fails a call in seconds instead of blocking a request or a worker for ever."""

from __future__ import annotations

import redis


def connect(url: str, *, timeout_s: float = 5.0, connect_timeout_s: float = 2.0) -> redis.Redis:
    """A client (with its own connection pool) for ``url``."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                socket_connect_timeout=connect_timeout_s, health_check_interval=30)
