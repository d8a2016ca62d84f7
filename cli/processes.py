"""Stopping the service's child processes: each runs in its own session (process group), so a
stop reaches its children too (a Celery worker's pool processes, uvicorn's workers)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> int:
    """Send ``sig`` to the child's process group, SIGKILL it after ``grace_s``; returns the exit code.

    Stragglers of a leader that exited (pool children) are killed as well."""
    if proc.poll() is None:
        _signal_group(proc, sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("process %s ignored %s for %s s; killing it", proc.pid, sig.name, grace_s)
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    _signal_group(proc, signal.SIGKILL)
    return int(proc.returncode)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
