"""Where uploads and results live: the local data folder (default) or an S3-compatible object store.

``open_storage(settings)`` picks the backend from ``NUCSEG_STORAGE_URL``. Keys are relative paths
(``uploads/<id>/slide.svs``, ``results/<id>/...``); both backends serve the same ``Storage``
protocol (``core.storage.base``). Workers fetch slides from a store into ``SlideCache``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from core.settings import Settings
from core.storage.base import ObjectInfo, Storage
from core.storage.errors import ObjectMissing, StorageUnavailable
from core.storage.local import LocalStorage
from core.storage.s3 import S3Storage, is_s3_url, s3_storage

__all__ = ["LocalStorage", "ObjectInfo", "ObjectMissing", "S3Storage", "Storage", "StorageUnavailable",
           "is_s3_url", "open_storage", "s3_storage"]


def open_storage(settings: Settings) -> Storage:
    """The configured store: ``data_dir`` when ``storage_url`` is unset, else the S3 store it names."""
    if not settings.storage_url:
        return _local(settings.data_dir)
    return s3_storage(settings.storage_url, settings)


@lru_cache(maxsize=8)
def _local(root: Path) -> LocalStorage:
    return LocalStorage(root)
