"""Permanent errors fail a job at once with a code; transient ones are retried with backoff."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers.service_stack import FAST, Stack, png_bytes

pytestmark = pytest.mark.service

LONG = {"tile_size": 64, "overlap": 16, "block_size": 64, "batch_size": 4, "outputs": ["masks"]}


def test_slide_broken_after_submission_fails_at_once_with_its_code(stack: Stack) -> None:
    target = stack.slide_root / "cases" / "will-break.png"
    target.write_bytes(png_bytes(64, 64, seed=51))
    blocker = stack.submit_upload(png_bytes(128, 128, seed=52), options=LONG).json()
    stack.wait(blocker["id"], until=["running"])
    job = stack.submit_path("cases/will-break.png", options=FAST)
    assert job.status_code == 202, job.text
    target.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # still sniffs as PNG, no longer decodes
    failed = stack.wait(job.json()["id"], timeout_s=120)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "unreadable_slide"
    assert "'cases/will-break.png'" in failed["error"]["message"]  # as the client named it
    assert str(stack.root) not in failed["error"]["message"]  # and no server path
    assert (failed["attempts"], failed["retries"]) == (1, 0)  # permanent: no retry
    assert failed["results"] is None
    assert stack.wait(blocker["id"])["status"] == "succeeded"


def test_transient_error_is_retried_with_backoff_then_succeeds(stack: Stack) -> None:
    partial = stack.data_dir / "results" / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.write_text("not a directory")  # every attempt now fails with an OSError
    try:
        job = stack.submit_upload(png_bytes(64, 64, seed=53), options=FAST).json()
        waiting = stack.wait(job["id"], until=["queued"], min_done=0, timeout_s=60, stage="retrying")
        assert waiting["retries"] == 1 and waiting["attempts"] == 1
    finally:
        partial.unlink()
    done = stack.wait(job["id"], timeout_s=60)
    assert done["status"] == "succeeded", done
    assert done["retries"] >= 1 and done["attempts"] == done["retries"] + 1
    assert done["error"] is None
