"""Errors raised by the model package.

One small tree, so callers can tell permanent input problems from bugs:

- ``NucsegError``: base of everything we raise on purpose.
  - ``SlideError``: the slide cannot be used (permanent for a job).
    - ``UnsupportedSlideError``: the format is not one we can read (HTTP 415, CLI exit 3).
    - ``UnreadableSlideError``: the format is known but the file is broken (HTTP 422, CLI exit 3).
    - ``SlideTooLargeError``: over the configured pixel cap (HTTP 413/422, CLI exit 3).
  - ``CheckpointError``: a model file is missing, corrupt, or does not fit the network.
  - ``OptionsError``: engine options that cannot work together (tile <= overlap, ...).
  - ``CancelledError``: a caller asked the engine to stop between blocks.
  - ``PostprocessError``: a nuclei post-processing worker died or failed (the run stops).
  - ``ShardError``: shard parts that cannot be merged (missing, incomplete, from another run).

Every message names the value received and what was allowed. Third-party errors are wrapped
where they enter, with ``raise ... from exc``.
"""

from __future__ import annotations


class NucsegError(Exception):
    """Base class for errors raised on purpose by nucseg."""

    code = "nucseg_error"


class SlideError(NucsegError):
    """The slide cannot be processed; retrying will not help."""

    code = "slide_error"


class UnsupportedSlideError(SlideError):
    """The file is not in a format nucseg can read."""

    code = "unsupported_slide"


class UnreadableSlideError(SlideError):
    """The file claims a known format but cannot be decoded."""

    code = "unreadable_slide"


class SlideTooLargeError(SlideError):
    """The slide exceeds the configured pixel cap."""

    code = "slide_too_large"


class CheckpointError(NucsegError):
    """A checkpoint is missing, corrupt, or incompatible with the network."""

    code = "checkpoint_error"


class OptionsError(NucsegError):
    """Engine options are out of range or inconsistent."""

    code = "invalid_options"


class CancelledError(NucsegError):
    """The run was cancelled between blocks."""

    code = "cancelled"


class PostprocessError(NucsegError):
    """Nuclei post-processing failed in a worker process; the run is stopped."""

    code = "postprocess_failed"


class ShardError(NucsegError):
    """Shard parts cannot be merged: one is missing, incomplete, corrupt, or made for another run."""

    code = "shard_error"
