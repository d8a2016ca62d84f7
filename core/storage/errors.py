"""Errors of the store. Neither is a ``NucsegError``: a store that is down is not the job's fault.

- ``StorageUnavailable``: the store is down, too slow, or refuses us (HTTP 503 at the API; a
  transient failure, retried, at the worker).
- ``ObjectMissing``: the store answered, and the object is not there.
"""

from __future__ import annotations


class StorageUnavailable(Exception):
    """The store cannot be used right now (down, slow, denied)."""

    code = "storage_unavailable"


class ObjectMissing(FileNotFoundError):
    """No object at this key."""

    code = "object_missing"
