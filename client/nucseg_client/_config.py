"""Value objects that configure a client: ``Timeout`` and ``Retries``."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

_UNSET = object()


def _seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"Timeout {name} must be a positive number of seconds or None, got {value!r}")
    return float(value)


class Timeout:
    """Network timeouts in seconds (``None``: wait forever), like ``httpx.Timeout``.

    ``default`` applies to every phase not given: ``connect``, ``read`` (between two received
    chunks), ``write`` (between two sent chunks) and ``pool`` (waiting for a free connection).

    Example::

        Client("http://lims-gw:8000", timeout=Timeout(30, connect=5))
    """

    __slots__ = ("connect", "pool", "read", "write")

    def __init__(self, default: float | None = 60.0, *, connect: object = _UNSET, read: object = _UNSET,
                 write: object = _UNSET, pool: object = _UNSET) -> None:
        base = _seconds("default", default)
        self.connect = base if connect is _UNSET else _seconds("connect", connect)
        self.read = base if read is _UNSET else _seconds("read", read)
        self.write = base if write is _UNSET else _seconds("write", write)
        self.pool = base if pool is _UNSET else _seconds("pool", pool)

    def as_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Timeout) and self._tuple() == other._tuple()

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __repr__(self) -> str:
        return f"Timeout(connect={self.connect}, read={self.read}, write={self.write}, pool={self.pool})"

    def _tuple(self) -> tuple[float | None, ...]:
        return (self.connect, self.read, self.write, self.pool)


DEFAULT_TIMEOUT = Timeout(60.0, connect=10.0)


@dataclass(frozen=True)
class Retries:
    """How often and how patiently to retry a request that may be retried.

    Retried: 429, 500, 502, 503 and 504 answers and broken connections for GET and HEAD, and for
    POST only with an idempotency key; a connection that could not be opened (nothing was sent) for
    any request. The n-th retry waits ``backoff * 2**n`` seconds, capped at ``max_backoff``, with
    jitter; a ``Retry-After`` header wins (capped at ``max_retry_after``).

    Example::

        Client(url, retries=Retries(total=8, max_backoff=30))   # Retries(total=0): never retry
    """

    total: int = 4
    backoff: float = 0.5
    max_backoff: float = 10.0
    max_retry_after: float = 120.0
    statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504})
    jitter: bool = True
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.total, bool) or not isinstance(self.total, int) or self.total < 0:
            raise ValueError(f"Retries total must be an int >= 0, got {self.total!r}")
        for name in ("backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"Retries {name} must be a number >= 0, got {value!r}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (0-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        delay = min(self.backoff * 2.0**attempt, self.max_backoff)
        return delay * (0.5 + 0.5 * self.random()) if self.jitter else delay
