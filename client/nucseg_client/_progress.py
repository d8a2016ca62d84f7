"""Progress reporting: a callback of the caller's, a tqdm bar (shown on a terminal only), or nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

ProgressCallback = Callable[[int, int | None], None]
"""Called with ``(done, total)``; ``total`` is ``None`` when unknown."""
ProgressArg = bool | ProgressCallback


class ProgressSink:
    """Feeds absolute positions to a tqdm bar or to a callback."""

    def __init__(self, progress: ProgressArg, *, total: int | None, desc: str, unit: str = "B") -> None:
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress must be True, False or a callable(done, total), got {progress!r}")
        self.callback: ProgressCallback | None = progress if callable(progress) else None
        self.total = total
        self.bar: Any = None
        if progress is True:
            scale = unit == "B"
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                            disable=None, file=sys.stderr, leave=False, dynamic_ncols=True)

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self.bar is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def update(self, done: int, desc: str | None = None) -> None:
        if self.callback is not None:
            self.callback(done, self.total)
        if self.bar is not None:
            if desc is not None:
                self.bar.set_description_str(desc, refresh=False)
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
