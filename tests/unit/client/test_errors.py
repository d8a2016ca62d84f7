"""nucseg_client against ``httpx.MockTransport``: error mapping.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import httpx
import nucseg_client
import pytest
from nucseg_client import ApiError, Client, Timeout

from tests.helpers.client_mock import JOB_ID, Recorder, client, err, job_body


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


def test_network_errors_do_not_shadow_the_builtins_but_are_caught_by_them() -> None:
    import warnings

    assert issubclass(nucseg_client.TimeoutException, TimeoutError)
    assert issubclass(nucseg_client.ConnectError, ConnectionError)
    assert not {"TimeoutError", "ConnectionError"} & set(nucseg_client.__all__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert nucseg_client.TimeoutError is nucseg_client.TimeoutException  # the 0.1.0 name, deprecated
    assert [w.category for w in caught] == [DeprecationWarning]
