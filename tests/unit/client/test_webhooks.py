"""nucseg_client against ``httpx.MockTransport``: webhooks.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, cast

import httpx
import pytest
from nucseg_client import NucsegError, WebhookVerificationError, verify_webhook

from tests.helpers.client_mock import JOB_ID

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
