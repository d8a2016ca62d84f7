"""Check a job webhook that a nucseg server sent to your ``callback_url`` (Standard Webhooks).

A job submitted with ``callback_url=...`` makes the server POST one event when the job ends::

    {"type": "job.succeeded" | "job.failed" | "job.cancelled", "timestamp": "<ISO 8601>",
     "data": {"id", "status", "href", "finished_at", "metadata", "error", "results": [names]}}

signed with your tenant's ``whsec_...`` secret in the ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` headers. A receiver verifies the raw body before trusting it::

    from nucseg_client import WebhookVerificationError, verify_webhook

    async def nucseg_hook(request):                       # e.g. a Starlette/FastAPI route
        try:
            event = verify_webhook(SECRET, request.headers, await request.body())
        except WebhookVerificationError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        if event["type"] == "job.succeeded":
            fetch_results(event["data"]["id"])
        return PlainTextResponse("ok")

Answer with a 2xx quickly; the server retries other answers for about an hour, with the same
``webhook-id`` (use it to drop duplicates).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from nucseg_client._errors import WebhookVerificationError

__all__ = ["WebhookVerificationError", "verify_webhook"]

_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes, *,
                   tolerance_s: float = 300) -> dict[str, Any]:
    """The event of a verified delivery; raises ``WebhookVerificationError`` saying what was wrong.

    ``secret`` is the tenant's ``whsec_<base64>`` webhook secret, ``headers`` the request's headers
    (any mapping; names are matched case-insensitively) and ``body`` the raw request body, exactly
    as received (not re-serialised JSON). The ``webhook-timestamp`` must lie within ``tolerance_s``
    seconds of this machine's clock, and one of the space-separated ``v1,<base64>`` signatures in
    ``webhook-signature`` must be the HMAC-SHA256 of ``"{webhook-id}.{webhook-timestamp}." + body``.
    A malformed ``secret`` raises ``ValueError``; a body that is not bytes ``TypeError``.

    Example::

        event = verify_webhook(os.environ["NUCSEG_WEBHOOK_SECRET"], request.headers, raw_body)
        print(event["type"], event["data"]["id"])
    """
    key = _secret_key(secret)
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError(f"body must be the raw request body as bytes, got {type(body).__name__}")
    if isinstance(tolerance_s, bool) or not isinstance(tolerance_s, int | float) or not tolerance_s >= 0:
        raise ValueError(f"tolerance_s must be a number of seconds >= 0, got {tolerance_s!r}")
    body = bytes(body)
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    missing = [name for name in _HEADERS if not lowered.get(name, "").strip()]
    if missing:
        raise WebhookVerificationError(f"missing webhook header(s): {', '.join(missing)}")
    msg_id, stamp_text = lowered["webhook-id"].strip(), lowered["webhook-timestamp"].strip()
    if not (stamp_text.isascii() and stamp_text.isdigit()):
        raise WebhookVerificationError(
            f"webhook-timestamp {stamp_text[:40]!r} is not a Unix time in whole seconds")
    stamp = int(stamp_text)
    age = time.time() - stamp
    if age > tolerance_s:
        raise WebhookVerificationError(
            f"stale webhook-timestamp: {age:.0f} s old, over the tolerance of {tolerance_s:g} s")
    if -age > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {-age:.0f} s in the future, over the tolerance of {tolerance_s:g} s "
            "(is this machine's clock right?)")
    mac = hmac.new(key, f"{msg_id}.{stamp_text}.".encode() + body, hashlib.sha256)
    expected = base64.b64encode(mac.digest())
    offered = [s[3:] for s in lowered["webhook-signature"].split() if s.startswith("v1,")]
    if not offered:
        raise WebhookVerificationError("bad signature: webhook-signature holds no 'v1,<base64>' signature")
    # compare every candidate (no early exit), each in constant time
    matched = False
    for candidate in offered:
        matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    if not matched:
        raise WebhookVerificationError(
            f"bad signature: none of the {len(offered)} v1 signature(s) matches; the secret is wrong, or "
            "the body was changed (pass the raw request body, not re-serialised JSON)")
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookVerificationError(f"the signed body is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise WebhookVerificationError(f"the signed body is not a JSON object but {type(event).__name__}")
    return event


def _secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the secret itself never appears in an error)."""
    if not isinstance(secret, str) or not secret:
        raise ValueError("secret must be the tenant's webhook secret, a non-empty 'whsec_<base64>' string")
    try:
        key = base64.b64decode(secret.strip().removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("secret is not a webhook secret: expected 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("secret is not a webhook secret: its base64 part is empty")
    return key
