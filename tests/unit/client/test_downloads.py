"""nucseg_client against ``httpx.MockTransport``: downloads.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import nucseg_client
import pytest
from nucseg_client import JobFailed

from tests.helpers.client_mock import CONTENT, RESULTS, Recorder, Sleeps, client, job_body, sequence


def range_server(broken_after: int | None = None, ignore_range: bool = False) -> Recorder:
    """Serves CONTENT with Range support; the first body breaks off after ``broken_after`` bytes."""
    state = {"broken": broken_after is not None}

    def handler(request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("range")
        start = int(rng.split("=")[1].rstrip("-")) if rng and not ignore_range else 0
        body = CONTENT[start:]
        headers = {"content-length": str(len(body)), "content-type": "image/png"}
        if start:
            headers["content-range"] = f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}"
        if state["broken"]:
            state["broken"] = False
            return httpx.Response(206 if start else 200, headers=headers, stream=Broken(body[:broken_after]))
        return httpx.Response(206 if start else 200, headers=headers, content=body)

    return Recorder(handler)


class Broken(httpx.SyncByteStream):
    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset by peer")


def test_download_resumes_a_part_file_with_range(tmp_path: Path) -> None:
    (tmp_path / "semantic.png.part").write_bytes(CONTENT[:4000])
    rec = range_server()
    job = nucseg_client.Job(client(rec), job_body("succeeded", results=RESULTS))
    assert job.download("semantic.png", tmp_path) == tmp_path / "semantic.png"
    assert (tmp_path / "semantic.png").read_bytes() == CONTENT
    assert not (tmp_path / "semantic.png.part").exists()
    assert rec.requests[0].headers["Range"] == "bytes=4000-"


def test_download_continues_after_the_connection_breaks(tmp_path: Path) -> None:
    rec, sleeps = range_server(broken_after=3000), Sleeps()
    job = nucseg_client.Job(client(rec, sleeps), job_body("succeeded", results=RESULTS))
    dest = job.download("semantic.png", tmp_path / "out" / "mask.png")
    assert dest.read_bytes() == CONTENT and sleeps == [0.5]
    assert "range" not in rec.requests[0].headers and rec.requests[1].headers["Range"] == "bytes=3000-"


def test_download_restarts_when_the_server_ignores_range(tmp_path: Path) -> None:
    (tmp_path / "semantic.png.part").write_bytes(b"garbage")
    job = nucseg_client.Job(client(range_server(ignore_range=True)), job_body("succeeded", results=RESULTS))
    assert job.download("semantic.png", tmp_path).read_bytes() == CONTENT


def test_download_all_refuses_a_failed_job(tmp_path: Path) -> None:
    failed = job_body("failed", error={"code": "slide_too_large", "message": "too many pixels"})
    job = nucseg_client.Job(client(sequence(failed)), job_body("running"))
    with pytest.raises(JobFailed, match="slide_too_large"):
        job.download_all(tmp_path)
