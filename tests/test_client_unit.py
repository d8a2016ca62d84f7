"""nucseg_client against ``httpx.MockTransport``: retries, back-off, error mapping, uploads, downloads.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import hashlib
import hmac
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any, cast

import httpx
import nucseg_client
import pytest
from nucseg_client import (
    ApiError,
    AsyncClient,
    Client,
    ConnectionError,
    JobFailed,
    NucsegError,
    Retries,
    Timeout,
    TimeoutError,
    Webhook,
    WebhookAttempt,
    WebhookVerificationError,
    verify_webhook,
)

URL = "http://nucseg.test"
JOB_ID = "0123456789abcdef0123456789abcdef"
Handler = Callable[[httpx.Request], httpx.Response]


def job_body(status: str = "queued", *, done: int = 0, total: int = 0, job_id: str = JOB_ID,
             results: list[dict[str, Any]] | None = None, error: dict[str, str] | None = None) -> dict[str, Any]:
    return {"id": job_id, "status": status, "progress": {"stage": status, "done": done, "total": total},
            "created_at": "2026-01-02T03:04:05Z", "slide": {"name": "s.png", "source": "upload"},
            "options": {}, "metadata": {}, "error": error, "results": results, "href": f"/v1/jobs/{job_id}"}


def err(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


class Recorder:
    """A MockTransport handler that answers from a list (or a function) and records requests."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer


class Sleeps(list[float]):
    """An injected ``sleep`` that records delays and moves a fake clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def client(handler: Any, sleeps: Sleeps | None = None, **kwargs: Any) -> Client:
    sleeps = sleeps if sleeps is not None else Sleeps()
    kwargs.setdefault("retries", Retries(jitter=False))
    return Client(URL, transport=httpx.MockTransport(handler), sleep=sleeps, clock=sleeps.clock, **kwargs)


# ---------------------------------------------------------------- retries and back-off


def test_5xx_on_get_is_retried_with_exponential_backoff() -> None:
    rec, sleeps = Recorder(err(503, "no_workers", "no worker"), httpx.Response(502), err(500, "internal_error", "x"),
                           httpx.Response(200, json=job_body())), Sleeps()
    job = client(rec, sleeps).job(JOB_ID)
    assert job.status == "queued" and len(rec.requests) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_backoff_is_capped_and_jittered() -> None:
    r = Retries(backoff=0.5, max_backoff=10.0, jitter=False)
    assert [r.delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 10, 10, 10]
    low, high = Retries(random=lambda: 0.0), Retries(random=lambda: 1.0)
    assert (low.delay(2), high.delay(2)) == (1.0, 2.0)


def test_429_retry_after_seconds_and_http_date_are_honoured() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    rec, sleeps = Recorder(err(429, "too_many_requests", "slow down", **{"Retry-After": "7"}),
                           err(503, "store_unavailable", "redis", **{"Retry-After": later}),
                           httpx.Response(200, json={"models": []})), Sleeps()
    assert client(rec, sleeps).models() == []
    assert sleeps[0] == 7.0 and 25 < sleeps[1] <= 30


def test_exhausted_retries_raise_the_servers_error() -> None:
    busy = err(503, "no_workers", "no worker answered a ping within 1 s", **{"Retry-After": "5"})
    rec, sleeps = Recorder(busy), Sleeps()
    with pytest.raises(ApiError) as info:
        client(rec, sleeps, retries=Retries(total=2, jitter=False)).job(JOB_ID)
    exc = info.value
    assert (exc.status, exc.code, exc.message, exc.retry_after) == (503, "no_workers",
                                                                    "no worker answered a ping within 1 s", 5.0)
    assert len(rec.requests) == 3 and sleeps == [5.0, 5.0]
    assert "503 no_workers" in str(exc) and f"/v1/jobs/{JOB_ID}" in str(exc)


def test_401_names_the_servers_code_and_is_not_retried() -> None:
    rec = Recorder(err(401, "invalid_api_key", "the Bearer key in the Authorization header (9 characters) "
                                               "is not a configured API key", **{"WWW-Authenticate": "Bearer"}))
    with pytest.raises(ApiError) as info:
        client(rec, api_key="wrong-key").models()
    assert (info.value.status, info.value.code) == (401, "invalid_api_key") and len(rec.requests) == 1
    assert str(info.value).startswith("401 invalid_api_key: the Bearer key")
    assert "NUCSEG_API_KEY" in str(info.value)


def test_429_on_a_submit_is_retried_after_retry_after_only_with_an_idempotency_key() -> None:
    full = err(429, "too_many_queued_jobs", "tenant 'lab-a' has 20 queued jobs", **{"Retry-After": "30"})
    rec, sleeps = Recorder(full, err(429, "rate_limited", "over the rate", **{"Retry-After": "2"}),
                           httpx.Response(202, json=job_body())), Sleeps()
    assert client(rec, sleeps).submit_path("cases/a.svs", idempotency_key="A-1").id == JOB_ID
    assert sleeps == [30.0, 2.0] and len(rec.requests) == 3
    rec, sleeps = Recorder(full), Sleeps()
    with pytest.raises(ApiError) as info:
        client(rec, sleeps).submit_path("cases/a.svs")
    assert (info.value.code, info.value.retry_after) == ("too_many_queued_jobs", 30.0)
    assert len(rec.requests) == 1 and sleeps == []


def test_post_without_idempotency_key_is_not_retried_on_5xx(tmp_path: Path) -> None:
    slide = tmp_path / "s.png"
    slide.write_bytes(b"x" * 100)
    rec = Recorder(err(500, "internal_error", "internal server error; see the server log"))
    with pytest.raises(ApiError, match="internal_error"):
        client(rec).submit(slide, progress=False)
    assert len(rec.requests) == 1


def test_post_with_idempotency_key_is_retried_and_resends_the_whole_file(tmp_path: Path) -> None:
    slide = tmp_path / "s.png"
    slide.write_bytes(bytes(range(256)) * 1000)
    rec, sleeps = Recorder(err(503, "broker_unavailable", "down"), httpx.ReadError("reset by peer"),
                           httpx.Response(202, json=job_body())), Sleeps()
    job = client(rec, sleeps).submit(slide, idempotency_key="case-1", progress=False)
    assert job.id == JOB_ID and len(rec.requests) == 3 and sleeps == [0.5, 1.0]
    bodies = {r.content for r in rec.requests}
    assert len(bodies) == 1 and slide.read_bytes() in bodies.pop()
    assert all(r.headers["Idempotency-Key"] == "case-1" for r in rec.requests)


def test_non_idempotent_requests_are_retried_only_if_nothing_was_sent() -> None:
    rec, sleeps = Recorder(httpx.ConnectError("refused"), httpx.Response(204)), Sleeps()
    job = nucseg_client.Job(client(rec, sleeps), job_body("succeeded"))
    job.delete()
    assert job.deleted and len(rec.requests) == 2 and sleeps == [0.5]
    rec = Recorder(httpx.ReadError("connection reset"))
    job = nucseg_client.Job(client(rec), job_body("succeeded"))
    with pytest.raises(ConnectionError, match="connection broke during DELETE"):
        job.delete()
    assert len(rec.requests) == 1


def test_connection_refused_by_a_real_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    sleeps = Sleeps()
    with Client(f"http://127.0.0.1:{port}", retries=Retries(total=2, jitter=False), sleep=sleeps) as c, \
            pytest.raises(ConnectionError) as info:
        c.models()
    assert sleeps == [0.5, 1.0]
    assert f"127.0.0.1:{port}" in str(info.value) and "NUCSEG_URL" in str(info.value)
    assert isinstance(info.value, builtins.ConnectionError) and isinstance(info.value, NucsegError)


def test_timeouts_map_to_our_timeout_error() -> None:
    rec = Recorder(httpx.ReadTimeout("timed out"))
    with pytest.raises(TimeoutError, match="read timeout during GET") as info:
        client(rec, retries=Retries(total=1, jitter=False)).job(JOB_ID)
    assert isinstance(info.value, builtins.TimeoutError) and len(rec.requests) == 2


# ---------------------------------------------------------------- error mapping


def test_error_body_is_parsed_with_its_extra_fields() -> None:
    rec = Recorder(httpx.Response(404, json={"error": {"code": "result_not_found", "message": "no result 'x'",
                                                       "valid_names": ["semantic.png"]}}))
    with pytest.raises(ApiError) as info:
        client(rec).job(JOB_ID)
    assert (info.value.status, info.value.code) == (404, "result_not_found")
    assert info.value.details == {"valid_names": ["semantic.png"]}


@pytest.mark.parametrize(("response", "code", "text"), [
    (httpx.Response(502, text="<html><body>Bad Gateway, nginx</body></html>"), "http_502", "Bad Gateway, nginx"),
    (httpx.Response(400, json={"detail": "plain starlette"}), "http_400", "plain starlette"),
    (httpx.Response(418, json={"error": "just a string"}), "http_418", "just a string"),
    (httpx.Response(200, text="<html>a captive portal</html>"), "invalid_response", "captive portal"),
    (httpx.Response(200, json=["not", "a", "job"]), "invalid_response", "keys ['id', 'status']"),
    (httpx.Response(200, content=b"\xff\xfe{", headers={"content-type": "application/json"}),
     "invalid_response", "expected a JSON body"),
])
def test_malformed_bodies_are_reported_not_swallowed(response: httpx.Response, code: str, text: str) -> None:
    with pytest.raises(ApiError) as info:
        client(Recorder(response), retries=0).job(JOB_ID)
    assert info.value.code == code and text in info.value.message
    assert info.value.status == response.status_code


def test_arguments_are_checked_and_named() -> None:
    with pytest.raises(ValueError, match="'ftp://x'"):
        Client("ftp://x")
    with pytest.raises(ValueError, match="-1"):
        Timeout(-1)
    with pytest.raises(ValueError, match=r"page_size.*got 0"):
        next(client(Recorder(httpx.Response(200))).jobs(page_size=0))
    with pytest.raises(TypeError, match=r"options must be a mapping.*'tile'"):
        client(Recorder(httpx.Response(200))).submit_path("a.svs", options=cast(Any, "tile"))
    with pytest.raises(FileNotFoundError, match=r"missing\.svs"):
        client(Recorder(httpx.Response(200))).submit("missing.svs")
    with pytest.raises(ValueError, match="idempotency_key"):
        client(Recorder(httpx.Response(200))).submit_path("a.svs", idempotency_key="")


def test_env_defaults_and_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUCSEG_URL", "http://gw.lab:9000/nucseg")
    monkeypatch.setenv("NUCSEG_API_KEY", "s3cret")
    rec = Recorder(httpx.Response(200, json={"models": []}))
    with Client(transport=httpx.MockTransport(rec)) as c:
        c.models()
    req = rec.requests[0]
    assert str(req.url) == "http://gw.lab:9000/nucseg/v1/models"  # a path prefix is kept
    assert req.headers["Authorization"] == "Bearer s3cret"
    assert req.headers["User-Agent"].startswith(f"nucseg-client/{nucseg_client.__version__}")
    monkeypatch.delenv("NUCSEG_URL")
    with pytest.raises(ValueError, match="NUCSEG_URL"):
        Client()


def test_ids_and_names_cannot_escape_their_path_segment(tmp_path: Path) -> None:
    rec = Recorder(err(422, "invalid_job_id", "bad id"))
    with pytest.raises(ApiError):
        client(rec).job("../models")
    assert rec.requests[0].url.raw_path == b"/v1/jobs/..%2Fmodels"
    job = nucseg_client.Job(client(rec), job_body("succeeded"))
    with pytest.raises(ValueError, match=r"'\.\./etc/passwd'"):
        job.download("../etc/passwd", tmp_path)


# ---------------------------------------------------------------- submit


def multipart_fields(request: httpx.Request) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, content) of a multipart body."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    fields = {}
    for part in request.content.split(b"--" + boundary)[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        disposition = head.decode()
        name = disposition.split('name="')[1].split('"')[0]
        filename = disposition.split('filename="')[1].split('"')[0] if "filename=" in disposition else None
        fields[name] = (filename, body[:-2])
    return fields


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


HOOK = "https://lims.example.org/hooks/nucseg?src=lab-a"


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


# ---------------------------------------------------------------- webhooks

SECRET = "whsec_" + base64.b64encode(b"a tenant webhook secret, 32 byte").decode()
EVENT = {"type": "job.succeeded", "timestamp": "2026-01-02T03:04:05+00:00",
         "data": {"id": JOB_ID, "status": "succeeded", "href": f"/v1/jobs/{JOB_ID}",
                  "finished_at": "2026-01-02T03:04:05+00:00", "metadata": {"case": "S-042"}, "error": None,
                  "results": ["semantic.png", "stats.json"]}}


def signed(body: bytes, *, secret: str = SECRET, stamp: int | None = None,
           msg_id: str = f"msg_{JOB_ID}_succeeded") -> dict[str, str]:
    """Standard Webhooks headers, signed here independently of nucseg_client (and of the server)."""
    stamp = int(time.time()) if stamp is None else stamp
    key = base64.b64decode(secret[len("whsec_"):])
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
            "webhook-signature": "v1," + base64.b64encode(mac).decode()}


def test_verify_webhook_accepts_a_correct_signature_and_returns_the_event() -> None:
    body = json.dumps(EVENT, separators=(",", ":")).encode()
    assert verify_webhook(SECRET, signed(body), body) == EVENT
    # header names in any case (a framework's Headers object), among other signatures (key rotation)
    headers = {k.title(): v for k, v in signed(body, stamp=int(time.time()) - 200).items()}
    other = "v1," + base64.b64encode(b"\0" * 32).decode()
    headers["Webhook-Signature"] = f"v2,xyz {other} {headers['Webhook-Signature']}"
    assert verify_webhook(SECRET, httpx.Headers(headers), body) == EVENT
    assert verify_webhook(SECRET, headers, body, tolerance_s=250)["data"]["id"] == JOB_ID


def test_verify_webhook_rejects_a_tampered_body_and_a_wrong_secret() -> None:
    body = json.dumps(EVENT).encode()
    headers = signed(body)
    tampered = body.replace(b"job.succeeded", b"job.failed")
    with pytest.raises(WebhookVerificationError, match="bad signature: none of the 1 v1 signature") as info:
        verify_webhook(SECRET, headers, tampered)
    assert isinstance(info.value, NucsegError)
    wrong = "whsec_" + base64.b64encode(b"another tenant's secret, 32 byte").decode()
    with pytest.raises(WebhookVerificationError, match="bad signature"):
        verify_webhook(wrong, headers, body)
    with pytest.raises(WebhookVerificationError, match="bad signature"):  # the id is signed too
        verify_webhook(SECRET, {**headers, "webhook-id": "msg_other"}, body)
    with pytest.raises(WebhookVerificationError, match="no 'v1,<base64>' signature"):
        verify_webhook(SECRET, {**headers, "webhook-signature": "v2,abc"}, body)


def test_verify_webhook_rejects_stale_and_future_timestamps() -> None:
    body = json.dumps(EVENT).encode()
    with pytest.raises(WebhookVerificationError, match=r"stale webhook-timestamp: (600|601) s old.*300 s"):
        verify_webhook(SECRET, signed(body, stamp=int(time.time()) - 600), body)
    with pytest.raises(WebhookVerificationError, match=r"stale webhook-timestamp: .* over the tolerance of 10 s"):
        verify_webhook(SECRET, signed(body, stamp=int(time.time()) - 60), body, tolerance_s=10)
    with pytest.raises(WebhookVerificationError, match="in the future"):
        verify_webhook(SECRET, signed(body, stamp=int(time.time()) + 3600), body)
    with pytest.raises(WebhookVerificationError, match="not a Unix time"):
        verify_webhook(SECRET, {**signed(body), "webhook-timestamp": "yesterday"}, body)


@pytest.mark.parametrize("drop", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_webhook_names_a_missing_header(drop: str) -> None:
    body = json.dumps(EVENT).encode()
    headers = {k: v for k, v in signed(body).items() if k != drop}
    with pytest.raises(WebhookVerificationError, match=f"missing webhook header\\(s\\): {drop}$"):
        verify_webhook(SECRET, headers, body)
    with pytest.raises(WebhookVerificationError, match="webhook-id, webhook-timestamp, webhook-signature"):
        verify_webhook(SECRET, {}, body)


def test_verify_webhook_checks_its_arguments() -> None:
    body = json.dumps(EVENT).encode()
    with pytest.raises(ValueError, match="whsec_") as info:
        verify_webhook("whsec_not base64!", signed(body), body)
    assert "not base64!" not in str(info.value)  # never echoes the secret
    with pytest.raises(TypeError, match="raw request body as bytes"):
        verify_webhook(SECRET, signed(body), cast(Any, body.decode()))
    with pytest.raises(WebhookVerificationError, match="not a JSON object"):
        verify_webhook(SECRET, signed(b"[1, 2]"), b"[1, 2]")


# ---------------------------------------------------------------- wait, cancel, list


def sequence(*bodies: dict[str, Any], headers: dict[str, str] | None = None) -> Recorder:
    return Recorder(*[httpx.Response(200, json=b, headers=headers or {}) for b in bodies])


def test_wait_backs_off_from_half_a_second_to_ten() -> None:
    bodies = [job_body("queued")] * 3 + [job_body("running", done=d, total=12) for d in range(10)]
    rec, sleeps = sequence(*bodies, job_body("succeeded", done=12, total=12)), Sleeps()
    seen: list[tuple[int, int | None]] = []
    job = nucseg_client.Job(client(rec, sleeps), job_body())
    assert job.wait(progress=lambda d, t: seen.append((d, t))) is job and job.status == "succeeded"
    assert sleeps[:4] == [0.5, 0.75, 1.125, 1.6875] and max(sleeps) == 10.0 == sleeps[-1]
    assert seen[-1] == (12, 12)


def test_wait_honours_retry_after_on_the_job() -> None:
    rec = Recorder(httpx.Response(200, json=job_body("running"), headers={"Retry-After": "4"}),
                   httpx.Response(200, json=job_body("succeeded")))
    sleeps = Sleeps()
    nucseg_client.Job(client(rec, sleeps), job_body()).wait(progress=False)
    assert sleeps == [4.0]


def test_wait_times_out_on_the_injected_clock() -> None:
    sleeps = Sleeps()
    job = nucseg_client.Job(client(sequence(job_body("running")), sleeps), job_body())
    with pytest.raises(TimeoutError, match=f"job {JOB_ID} is still running after waiting 5"):
        job.wait(timeout=5, progress=False)
    assert sum(sleeps) == pytest.approx(5.0)


@pytest.mark.parametrize(("body", "code"), [
    (job_body("failed", error={"code": "unreadable_slide", "message": "level 0 is corrupt"}), "unreadable_slide"),
    (job_body("cancelled"), "cancelled"),
])
def test_wait_raises_job_failed(body: dict[str, Any], code: str) -> None:
    job = nucseg_client.Job(client(sequence(body)), job_body())
    with pytest.raises(JobFailed) as info:
        job.wait(progress=False)
    assert info.value.code == code and info.value.job is job and JOB_ID in str(info.value)


def test_cancel_leaves_a_finished_job_alone() -> None:
    rec = sequence(job_body("succeeded"))
    job = nucseg_client.Job(client(rec), job_body("running"))
    assert job.cancel().status == "succeeded"
    assert [r.method for r in rec.requests] == ["GET"]
    rec = Recorder(httpx.Response(200, json=job_body("running")),
                   httpx.Response(202, json={**job_body("running"), "cancel_requested": True}))
    job = nucseg_client.Job(client(rec), job_body("running"))
    assert job.cancel().data["cancel_requested"] is True
    assert [r.method for r in rec.requests] == ["GET", "DELETE"]


def test_jobs_iterates_across_pages() -> None:
    ids = [f"{n:032x}" for n in range(5)]
    pages = {None: (ids[:2], "c1"), "c1": (ids[2:4], "c2"), "c2": (ids[4:], None)}

    def handler(request: httpx.Request) -> httpx.Response:
        got, nxt = pages[request.url.params.get("cursor")]
        assert request.url.params["status"] == "failed" and request.url.params["limit"] == "2"
        return httpx.Response(200, json={"jobs": [job_body("failed", job_id=i) for i in got], "next_cursor": nxt})

    rec = Recorder(handler)
    assert [j.id for j in client(rec).jobs(status="failed", page_size=2)] == ids
    assert len(rec.requests) == 3


# ---------------------------------------------------------------- downloads

CONTENT = bytes(range(256)) * 40  # 10240 bytes
RESULTS = [{"name": "semantic.png", "href": f"/v1/jobs/{JOB_ID}/results/semantic.png",
            "content_type": "image/png", "size_bytes": len(CONTENT)}]


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


# ---------------------------------------------------------------- async


def test_async_client_has_the_same_surface(tmp_path: Path) -> None:
    slide = tmp_path / "s.png"
    slide.write_bytes(b"png" * 100)
    bodies = iter([job_body("running", done=1, total=2), job_body("succeeded", done=2, total=2, results=RESULTS)])
    slept: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=job_body())
        if request.url.path.endswith("/results/semantic.png"):
            return httpx.Response(200, content=CONTENT)
        if request.url.path == "/v1/jobs":
            return httpx.Response(200, json={"jobs": [job_body()], "next_cursor": None})
        if request.url.path == "/v1/models":
            return err(503, "no_workers", "none") if not slept else httpx.Response(200, json={"models": []})
        return httpx.Response(200, json=next(bodies))

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def scenario() -> None:
        async with AsyncClient(URL, transport=httpx.MockTransport(handler), sleep=sleep,
                               retries=Retries(jitter=False)) as c:
            assert await c.models() == [] and slept == [0.5]  # retried once
            job = await c.submit(slide, progress=False)
            await job.wait(progress=False)
            paths = await job.download_all(tmp_path / "out")
            assert [p.read_bytes() for p in paths] == [CONTENT]
            assert [j.id async for j in c.jobs()] == [JOB_ID]

    asyncio.run(scenario())


# ---------------------------------------------------------------- CLI


@pytest.fixture
def cli_server(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Recorder]:
    """Point the CLI's Client at a MockTransport handler (and never sleep)."""
    from nucseg_client import cli

    def install(handler: Any) -> Recorder:
        rec = handler if isinstance(handler, Recorder) else Recorder(handler)

        def make(url: str, **kwargs: Any) -> Client:
            return Client(url, transport=httpx.MockTransport(rec), sleep=lambda s: None,
                          retries=Retries(total=2), **kwargs)

        monkeypatch.setattr(cli, "Client", make)
        return rec

    return install


def run_cli(*argv: str) -> int:
    from nucseg_client.cli import main

    return main(list(argv))


def test_cli_status_table_and_json(cli_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cli_server(httpx.Response(200, json=job_body("running", done=3, total=8)))
    assert run_cli("status", JOB_ID) == 0
    out = capsys.readouterr().out
    assert f"id        {JOB_ID}" in out and "running 3/8" in out
    assert run_cli("status", JOB_ID, "--json") == 0
    assert json.loads(capsys.readouterr().out)["progress"] == {"stage": "running", "done": 3, "total": 8}


def test_cli_exit_codes(cli_server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cli_server(err(404, "job_not_found", f"no job with id {JOB_ID!r}"))
    assert run_cli("status", JOB_ID) == 2
    assert f"job_not_found: no job with id '{JOB_ID}'" in capsys.readouterr().err

    cli_server(err(503, "store_unavailable", "the job store (Redis) is unavailable"))
    assert run_cli("list", "--json") == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["code"] == "store_unavailable" and "Redis" in captured.err

    cli_server(httpx.ConnectError("[Errno 111] Connection refused"))
    assert run_cli("cancel", JOB_ID) == 3
    assert "cannot connect to http://127.0.0.1:8000" in capsys.readouterr().err

    slide = tmp_path / "s.png"
    slide.write_bytes(b"png")
    failed = job_body("failed", error={"code": "slide_too_large", "message": "100000x100000 px is over the cap"})
    cli_server(Recorder(httpx.Response(202, json=job_body()), httpx.Response(200, json=failed)))
    assert run_cli("submit", str(slide), "--wait", "-q") == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == JOB_ID and "slide_too_large: 100000x100000" in captured.err

    assert run_cli("submit", str(slide), "--options", "{tile") == 2
    assert "--options is not valid JSON" in capsys.readouterr().err
    assert run_cli("submit", str(tmp_path / "nope.svs")) == 2
    assert "nope.svs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run_cli("status")
    assert info.value.code == 2


def test_cli_submit_builds_options_from_flags(cli_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rec = cli_server(httpx.Response(202, json=job_body()))
    assert run_cli("submit", "cases/a.svs", "--path", "--options", '{"tile_size": 128, "overlap": 8}',
                   "--tile", "64", "--no-tissue", "--outputs", "masks, nuclei", "--metadata", '{"case": "A"}',
                   "--idempotency-key", "A-1", "--json") == 0
    body = json.loads(rec.requests[0].content)
    assert body == {"slide_path": "cases/a.svs", "metadata": {"case": "A"},
                    "options": {"tile_size": 64, "overlap": 8, "tissue": False, "outputs": ["masks", "nuclei"]}}
    assert rec.requests[0].headers["Idempotency-Key"] == "A-1"
    assert json.loads(capsys.readouterr().out)["id"] == JOB_ID


def test_cli_submit_callback_url(cli_server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    waiting = {**job_body(), "webhook": {"url": HOOK, "status": "waiting", "attempt_count": 0, "attempts": [],
                                         "next_attempt_at": None}}
    rec = cli_server(httpx.Response(202, json=waiting))
    assert run_cli("submit", "cases/a.svs", "--path", "--callback-url", HOOK) == 0
    assert json.loads(rec.requests[0].content) == {"slide_path": "cases/a.svs", "callback_url": HOOK}
    assert f"webhook   waiting -> {HOOK}" in capsys.readouterr().out
    slide = tmp_path / "s.png"
    slide.write_bytes(b"png")
    rec = cli_server(httpx.Response(202, json=waiting))
    assert run_cli("submit", str(slide), "--callback-url", HOOK, "-q") == 0
    assert multipart_fields(rec.requests[0])["callback_url"] == (None, HOOK.encode())
    assert capsys.readouterr().out.strip() == JOB_ID


def test_add_client_commands_hooks_into_another_parser() -> None:
    import argparse

    from nucseg_client.cli import add_client_commands

    parser = argparse.ArgumentParser(prog="nucseg")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("predict")
    add_client_commands(sub)
    args = parser.parse_args(["download", JOB_ID, "--out", "x", "--url", URL])
    assert args.command == "download" and callable(args.func) and args.url == URL


# ---------------------------------------------------------------- memory

UPLOAD_SCRIPT = """
import http.server, json, re, sys, threading
from nucseg_client import Client

class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        left = int(self.headers["Content-Length"])
        while left:
            left -= len(self.rfile.read(min(left, 1 << 20)))
        body = json.dumps({"id": "a" * 32, "status": "queued"}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
threading.Thread(target=server.serve_forever, daemon=True).start()
with Client(f"http://127.0.0.1:{server.server_address[1]}") as client:
    assert client.submit(sys.argv[1], progress=False).id == "a" * 32
# VmHWM: this process's peak RSS (ru_maxrss would count the forked copy of the parent)
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_a_large_upload_is_streamed_not_loaded(tmp_path: Path) -> None:
    big = tmp_path / "big.svs"
    with big.open("wb") as f:
        f.truncate(512 * 1024 * 1024)  # sparse: costs no disk
    proc = subprocess.run([sys.executable, "-c", UPLOAD_SCRIPT, str(big)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 128, f"peak RSS {proc.stdout.strip()} MiB for a 512 MiB upload"
