"""nucseg_client against ``httpx.MockTransport``: retries and back-off.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

import builtins
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import nucseg_client
import pytest
from nucseg_client import ApiError, Client, ConnectError, NucsegError, Retries, TimeoutException

from tests.helpers.client_mock import JOB_ID, Recorder, Sleeps, client, err, job_body


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
    with pytest.raises(ConnectError, match="connection broke during DELETE"):
        job.delete()
    assert len(rec.requests) == 1


def test_connection_refused_by_a_real_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    sleeps = Sleeps()
    with Client(f"http://127.0.0.1:{port}", retries=Retries(total=2, jitter=False), sleep=sleeps) as c, \
            pytest.raises(ConnectError) as info:
        c.models()
    assert sleeps == [0.5, 1.0]
    assert f"127.0.0.1:{port}" in str(info.value) and "NUCSEG_URL" in str(info.value)
    assert isinstance(info.value, builtins.ConnectionError) and isinstance(info.value, NucsegError)


def test_timeouts_map_to_our_timeout_error() -> None:
    rec = Recorder(httpx.ReadTimeout("timed out"))
    with pytest.raises(TimeoutException, match="read timeout during GET") as info:
        client(rec, retries=Retries(total=1, jitter=False)).job(JOB_ID)
    assert isinstance(info.value, builtins.TimeoutError) and len(rec.requests) == 2
