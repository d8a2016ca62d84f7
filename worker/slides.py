"""The local file of a job's slide, for OpenSlide: a path under the slide root, re-checked, or an
object fetched into this worker's slide cache (checked against its sha256)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core.records import JobRecord
from core.settings import Settings
from core.storage.slides import local_slide, slide_object
from model.errors import UnsupportedSlideError


def stored_slide(settings: Settings, record: JobRecord) -> bool:
    """Whether the slide is an object that has to be fetched (perhaps from the cache)."""
    return slide_object(settings, record.slide_file) is not None


def job_slide(settings: Settings, record: JobRecord, should_stop: Callable[[], bool]) -> Path:
    """The slide file; a path job is re-checked against the slide root (symlinks may have moved)."""
    if stored_slide(settings, record):
        local, _ = local_slide(settings, record.slide_file, record.slide.get("sha256"), should_stop=should_stop)
        return local
    path = Path(record.slide_file)
    root = settings.slide_root
    outside = root is not None and not path.resolve().is_relative_to(root.resolve())
    if record.slide.get("source") == "path" and outside:
        raise UnsupportedSlideError(f"slide_path {record.slide.get('path')!r} now resolves outside the slide root")
    return path
