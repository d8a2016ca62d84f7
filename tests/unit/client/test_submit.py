"""nucseg_client against ``httpx.MockTransport``: submit.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nucseg_client
import pytest
from nucseg_client import ApiError, AsyncClient, Webhook, WebhookAttempt

from tests.helpers.client_mock import HOOK, JOB_ID, URL, Recorder, client, err, job_body, multipart_fields


def test_submit_streams_the_file_in_chunks_with_progress(tmp_path: Path) -> None:
    slide = tmp_path / "S-042.svs"
    data = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB
    slide.write_bytes(data)
    seen: list[tuple[int, int | None]] = []
    rec = Recorder(httpx.Response(202, json=job_body(), headers={"Location": f"/v1/jobs/{JOB_ID}"}))
    job = client(rec).submit(slide, options={"tile_size": 64}, metadata={"case": "S-042"},
                             progress=lambda done, total: seen.append((done, total)))
    assert job.id == JOB_ID
    req = rec.requests[0]
    assert req.headers["Content-Length"] == str(len(req.content))  # sized from the file, not chunked
    fields = multipart_fields(req)
    assert fields["file"] == ("S-042.svs", data)
    assert json.loads(fields["options"][1]) == {"tile_size": 64}
    assert json.loads(fields["metadata"][1]) == {"case": "S-042"}
    assert "Idempotency-Key" not in req.headers
    assert {total for _, total in seen} == {len(data)} and seen[-1][0] == len(data)
    steps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
    assert len(seen) > 40 and max(steps) <= 64 * 1024  # read 64 KiB at a time, never whole


def test_submit_from_a_generator_is_chunked_and_never_retried() -> None:
    def chunks() -> Iterator[bytes]:
        yield b"abc" * 1000
        yield b"def" * 1000

    rec = Recorder(err(503, "no_workers", "none"))
    with pytest.raises(ApiError, match="no_workers"):
        client(rec).submit(chunks(), filename="x.png", idempotency_key="k", progress=False)
    req = rec.requests[0]
    assert len(rec.requests) == 1 and req.headers.get("Transfer-Encoding") == "chunked"
    assert multipart_fields(req)["file"] == ("x.png", b"abc" * 1000 + b"def" * 1000)


def test_submit_path_sends_json_and_replays_by_key() -> None:
    rec = Recorder(httpx.Response(202, json=job_body()), httpx.Response(200, json=job_body()))
    c = client(rec)
    first = c.submit_path("cases/a.svs", options={"outputs": ["masks"]}, idempotency_key="A-1")
    again = c.submit_path("cases/a.svs", options={"outputs": ["masks"]}, idempotency_key="A-1")
    assert first.id == again.id
    assert json.loads(rec.requests[0].content) == {"slide_path": "cases/a.svs", "options": {"outputs": ["masks"]}}




def test_submit_sends_callback_url_as_a_multipart_field(tmp_path: Path) -> None:
    slide = tmp_path / "s.png"
    slide.write_bytes(b"png" * 100)
    rec = Recorder(httpx.Response(202, json=job_body()))
    c = client(rec)
    c.submit(slide, metadata={"case": "A"}, callback_url=HOOK, progress=False)
    c.submit(slide, progress=False)
    with_hook, without = (multipart_fields(r) for r in rec.requests)
    assert with_hook["callback_url"] == (None, HOOK.encode())  # a plain text field, not JSON
    assert with_hook["file"] == ("s.png", b"png" * 100) and json.loads(with_hook["metadata"][1]) == {"case": "A"}
    assert set(without) == {"file"}


def test_submit_path_sends_callback_url_in_the_json_body() -> None:
    rec = Recorder(httpx.Response(202, json=job_body()))
    client(rec).submit_path("cases/a.svs", options={"tile_size": 64}, callback_url=HOOK)
    assert json.loads(rec.requests[0].content) == {"slide_path": "cases/a.svs", "options": {"tile_size": 64},
                                                   "callback_url": HOOK}
    with pytest.raises(ValueError, match="callback_url"):
        client(rec).submit_path("cases/a.svs", callback_url="  ")
    assert len(rec.requests) == 1


def test_async_submits_send_callback_url(tmp_path: Path) -> None:
    slide = tmp_path / "s.png"
    slide.write_bytes(b"png")
    rec = Recorder(httpx.Response(202, json=job_body()))

    async def scenario() -> None:
        async with AsyncClient(URL, transport=httpx.MockTransport(rec)) as c:
            await c.submit(slide, callback_url=HOOK, progress=False)
            await c.submit_path("cases/a.svs", callback_url=HOOK)

    asyncio.run(scenario())
    upload, path = rec.requests
    assert multipart_fields(upload)["callback_url"] == (None, HOOK.encode())
    assert json.loads(path.content) == {"slide_path": "cases/a.svs", "callback_url": HOOK}


def test_job_exposes_webhook_delivery_and_expiry() -> None:
    body = {**job_body("succeeded"), "expires_at": "2026-01-09T03:04:05Z", "webhook": {
        "url": HOOK, "status": "retrying", "attempt_count": 2, "next_attempt_at": "2026-01-02T03:06:00Z",
        "attempts": [{"at": "2026-01-02T03:05:00Z", "status_code": 500, "error": None, "duration_ms": 12.5},
                     {"at": "2026-01-02T03:05:01Z", "status_code": None, "error": "ConnectError: refused",
                      "duration_ms": 3}]}}
    job = nucseg_client.Job(client(Recorder(httpx.Response(200))), body)
    at = datetime(2026, 1, 2, 3, 5, tzinfo=UTC)
    assert job.webhook == Webhook(HOOK, "retrying", 2, (
        WebhookAttempt(at, 500, None, 12.5),
        WebhookAttempt(at + timedelta(seconds=1), None, "ConnectError: refused", 3.0)),
        datetime(2026, 1, 2, 3, 6, tzinfo=UTC))
    assert job.expires_at == datetime(2026, 1, 9, 3, 4, 5, tzinfo=UTC)
    plain = nucseg_client.Job(client(Recorder(httpx.Response(200))), {**job_body(), "webhook": None})
    assert plain.webhook is None and plain.expires_at is None
