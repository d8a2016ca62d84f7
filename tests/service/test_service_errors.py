"""Bad input gets the exact status and error code, creates no job and leaves no file; a good job follows."""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import Callable

import httpx
import pytest

from tests.helpers.service_stack import UPLOAD_CAP, Stack, png_bytes, wait_until

pytestmark = pytest.mark.service

Case = Callable[[Stack], httpx.Response]


def _random_bytes(n: int) -> bytes:
    return os.urandom(n)


def _declare_only(stack: Stack, length: int) -> httpx.Response:
    """Headers announcing ``length`` body bytes and ``Expect: 100-continue``; no body is ever sent."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.api_port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
        conn.putheader("Authorization", stack.client.headers["authorization"])
        conn.putheader("Content-Length", str(length))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        resp = conn.getresponse()
        return httpx.Response(resp.status, headers=resp.getheaders(), content=resp.read())
    finally:
        conn.close()


def _truncated_svs(stack: Stack) -> bytes:
    return (stack.slide_root / "cmu_small_region.svs").read_bytes()[:200_000]


CASES: dict[str, tuple[Case, int, str]] = {
    "non-slide file": (lambda s: s.submit_upload(_random_bytes(4096), filename="notes.svs"), 415, "unsupported_slide"),
    "text file": (lambda s: s.submit_upload(b"patient,case\n1,2\n", filename="x.csv"), 415, "unsupported_slide"),
    "zero-byte file": (lambda s: s.submit_upload(b"", filename="empty.svs"), 422, "unreadable_slide"),
    "upload over the cap": (lambda s: s.submit_upload(_random_bytes(UPLOAD_CAP + 4096)), 413, "upload_too_large"),
    "declared length over the cap": (lambda s: _declare_only(s, UPLOAD_CAP * 2), 413, "upload_too_large"),
    "image over the pixel cap": (lambda s: s.submit_upload(png_bytes(1024, 1024), filename="big.png"), 422,
                                 "slide_too_large"),
    "truncated svs": (lambda s: s.submit_upload(_truncated_svs(s), filename="cut.svs"), 422, "unreadable_slide"),
    "unreadable svs by path": (lambda s: s.submit_path("unreadable.svs"), 422, "unreadable_slide"),
    "unopenable tiff by path": (lambda s: s.submit_path("unopenable.tiff"), 422, "unreadable_slide"),
    "slide_path with ..": (lambda s: s.submit_path("cases/../../etc/passwd"), 422, "invalid_slide_path"),
    "absolute slide_path outside the root": (lambda s: s.submit_path("/etc/hosts"), 422, "invalid_slide_path"),
    "symlink escaping the root": (lambda s: s.submit_path("escape.svs"), 422, "invalid_slide_path"),
    "missing slide_path file": (lambda s: s.submit_path("cases/none.svs"), 422, "slide_not_found"),
    "slide_path through a symlink loop": (lambda s: s.submit_path("loop/x.svs"), 422, "invalid_slide_path"),
    "unknown option (json)": (lambda s: s.submit_path("cases/tile.png", options={"tile": 64}), 422,
                              "validation_error"),
    "unknown option (upload)": (lambda s: s.submit_upload(png_bytes(64, 64), options={"colour": "red"}), 422,
                                "validation_error"),
    "overlap >= tile_size": (lambda s: s.submit_path("cases/tile.png", options={"tile_size": 64, "overlap": 64}),
                             422, "validation_error"),
    "unknown stain method": (lambda s: s.submit_path("cases/tile.png", options={"stain": "sepia"}), 422,
                             "validation_error"),
    "unknown output": (lambda s: s.submit_path("cases/tile.png", options={"outputs": ["heatmap"]}), 422,
                       "validation_error"),
    "metadata over 16 KiB": (lambda s: s.submit_path("cases/tile.png", metadata={"x": "y" * 17000}), 413,
                             "metadata_too_large"),
    "unknown form field": (lambda s: s.client.post("/v1/jobs", files={"slide": ("a.png", b"x")}), 422,
                           "validation_error"),
    "no file part": (lambda s: s.client.post("/v1/jobs", files={"options": (None, "{}")}), 422,
                     "validation_error"),
    "malformed json": (lambda s: s.client.post("/v1/jobs", content=b"{nope", headers={
        "content-type": "application/json"}), 400, "invalid_json"),
    "wrong content type": (lambda s: s.client.post("/v1/jobs", content=b"x", headers={
        "content-type": "text/plain"}), 415, "unsupported_content_type"),
    "malformed id": (lambda s: s.client.get("/v1/jobs/not-a-job-id"), 422, "invalid_job_id"),
    "malformed id on delete": (lambda s: s.client.delete("/v1/jobs/ABC"), 422, "invalid_job_id"),
    "unknown job": (lambda s: s.client.get("/v1/jobs/" + "0" * 32), 404, "job_not_found"),
    "unknown job's results": (lambda s: s.client.get("/v1/jobs/" + "0" * 32 + "/results/semantic.png"), 404,
                              "job_not_found"),
    "unknown route": (lambda s: s.client.get("/v2/jobs"), 404, "not_found"),
    "wrong method": (lambda s: s.client.put("/v1/jobs"), 405, "method_not_allowed"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_then_a_good_job(stack: Stack, name: str) -> None:
    make, status, code = CASES[name]
    jobs_before = stack.job_count()
    resp = make(stack)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert stack.job_count() == jobs_before  # nothing was enqueued
    assert _leftover_uploads(stack) == []  # partial and rejected uploads are removed
    stack.run_good_job()


def test_error_messages_name_the_bad_value(stack: Stack) -> None:
    msg = stack.submit_path("cases/../../etc/passwd").json()["error"]["message"]
    assert "'cases/../../etc/passwd'" in msg
    msg = stack.submit_path("cases/tile.png", options={"tile_size": 100}).json()["error"]["message"]
    assert "options.tile_size" in msg and "100" in msg
    msg = stack.submit_upload(_random_bytes(64), filename="scan.svs").json()["error"]["message"]
    assert "'scan.svs'" in msg and str(stack.data_dir) not in msg  # the client's name, no server path
    msg = stack.client.get("/v1/jobs/xyz").json()["error"]["message"]
    assert "'xyz'" in msg


def _leftover_uploads(stack: Stack) -> list[str]:
    uploads = stack.data_dir / "uploads"
    if not uploads.exists():
        return []
    partial = [p.name for p in (uploads / ".partial").glob("*")] if (uploads / ".partial").exists() else []
    orphans = [p.name for p in uploads.iterdir() if p.name != ".partial" and not stack.job_exists(p.name)]
    return partial + orphans



def test_client_that_disconnects_mid_upload_leaves_no_partial_file(stack: Stack) -> None:
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.svs\"\r\n\r\n" + b"x" * 1_500_000
    with socket.create_connection(("127.0.0.1", stack.api_port)) as sock:
        auth = stack.client.headers["authorization"].encode()
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                     b"Authorization: " + auth + b"\r\nContent-Length: 3000000\r\n\r\n" + body)
        partial = stack.data_dir / "uploads" / ".partial"  # authorised: it really streams to disk
        wait_until(lambda: partial.is_dir() and any(partial.iterdir()), what="a partial upload file appears")
    wait_until(lambda: not _leftover_uploads(stack), what="no partial or orphaned upload is left")
    stack.run_good_job()
