"""Where a job's slide is, and the local file that OpenSlide opens.

A job's ``slide_file`` is one of: an absolute path (a slide under ``NUCSEG_SLIDE_ROOT``, or an
upload in the local data folder), a key in the configured store (an upload to an object store), or
an ``s3://bucket/key`` URL (a ``slide_path`` naming an object). The last two are fetched into the
process's ``SlideCache``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from core.settings import Settings
from core.storage import open_storage
from core.storage.base import Storage
from core.storage.cache import SlideCache
from core.storage.s3 import is_s3_url, s3_storage, split_s3_url


def slide_cache(settings: Settings) -> SlideCache:
    return SlideCache(settings.cache_dir / "slides", settings.slide_cache_bytes)


def slide_object(settings: Settings, slide_file: str) -> tuple[Storage, str] | None:
    """The store and key holding ``slide_file``, or None for a plain local file."""
    if is_s3_url(slide_file):
        bucket, key = split_s3_url(slide_file)
        return s3_storage(f"s3://{bucket}", settings), key
    if os.path.isabs(slide_file):
        return None
    return open_storage(settings), slide_file


def local_slide(settings: Settings, slide_file: str, sha256: str | None,
                should_stop: Callable[[], bool] | None = None) -> tuple[Path, str | None]:
    """A local file with the slide's bytes, and its sha256 when a fetch computed or checked it."""
    found = slide_object(settings, slide_file)
    if found is None:
        return Path(slide_file), sha256
    storage, key = found
    return slide_cache(settings).fetch(storage, key, sha256=sha256, should_stop=should_stop)


def allowed_slide_url(url: str, prefixes: list[str]) -> bool:
    """Whether the ``s3://`` object ``url`` lies under one of ``prefixes`` (no ``..`` games)."""
    if ".." in PurePosixPath(url.removeprefix("s3://")).parts or "\x00" in url:
        return False
    for prefix in prefixes:
        base = prefix if prefix.endswith("/") else prefix + "/"
        if url.startswith(base) and len(url) > len(base):
            return True
    return False
