"""Terminal-state webhooks, signed the Standard Webhooks way, delivered from the worker's main process.

When a job with a ``callback_url`` reaches ``succeeded``, ``failed`` or ``cancelled``, the store's
scripts put it in the ``webhooks`` due set (atomically with the state change). Every worker's main
process runs ``dispatch_forever`` in a daemon thread: it takes due deliveries (each hidden from the
other dispatchers while in flight), POSTs the event and records the attempt in the job. A non-2xx
answer, a timeout or a refused address schedules another try after ``webhook_backoff_s``, doubling,
capped at 15 minutes, until ``webhook_max_age_s`` (about an hour) after the job finished; then the
delivery is ``failed``. Delivery never touches the job's own state, so it can neither block nor fail it.

Headers (https://www.standardwebhooks.com): ``webhook-id`` (the same on every retry of one event),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``:
``v1,<base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))>`` with the tenant's ``whsec_`` secret.
Receivers verify with ``nucseg_client.verify_webhook``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from core.netguard import CallbackUrlError, check_url
from core.records import JobRecord
from core.settings import Settings
from core.store import JobStore

log = logging.getLogger(__name__)

WEBHOOK_MAX_BACKOFF_S = 900.0
USER_AGENT = "nucseg-webhooks/1"


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; raises ValueError for a malformed one."""
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret must be 'whsec_' followed by base64") from exc


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    mac = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def event(record: JobRecord) -> tuple[str, bytes]:
    """``(webhook-id, body)``: the same bytes on every retry of this job's terminal event."""
    finished = datetime.fromtimestamp(record.finished_at or record.updated_at or 0, UTC)
    data = {
        "id": record.id, "status": record.status, "href": f"/v1/jobs/{record.id}",
        "finished_at": finished.isoformat(), "metadata": record.metadata,
        "error": record.error.model_dump() if record.error and record.status == "failed" else None,
        "results": [r["name"] for r in record.results or []] if record.status == "succeeded" else [],
    }
    doc = {"type": f"job.{record.status}", "timestamp": finished.isoformat(), "data": data}
    return f"msg_{record.id}_{record.status}", json.dumps(doc, separators=(",", ":")).encode()


class Dispatcher:
    """Takes due deliveries from the store and makes one attempt at each."""

    def __init__(self, store: JobStore, settings: Settings, client: httpx.Client | None = None) -> None:
        self.store, self.settings = store, settings
        self.client = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False,
                                             trust_env=False, headers={"User-Agent": USER_AGENT})

    def run_once(self) -> int:
        """Deliver what is due now; returns how many attempts were made."""
        due = self.store.take_webhooks(lease_s=self.settings.webhook_timeout_s + 30)
        for job_id in due:
            self.deliver(job_id)
        return len(due)

    def deliver(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None or not record.callback_url or record.webhook_status not in ("pending", "retrying"):
            self.store.drop_webhook(job_id)  # deleted, or delivered meanwhile
            return
        started = time.time()
        attempt = self._attempt(record)
        attempt["duration_ms"] = round((time.time() - started) * 1000, 1)
        ok = attempt.get("status_code") is not None and 200 <= attempt["status_code"] < 300
        if ok:
            self.store.record_webhook_attempt(job_id, attempt, status="delivered", next_at=None)
            return
        next_at = self._next_at(record)
        status = "retrying" if next_at is not None else "failed"
        self.store.record_webhook_attempt(job_id, attempt, status=status, next_at=next_at)
        log.warning("job %s: webhook attempt %d failed (%s); %s", job_id, record.webhook_attempt_count + 1,
                    attempt.get("error") or attempt.get("status_code"),
                    "giving up" if next_at is None else f"next at {next_at:.0f}")

    def _attempt(self, record: JobRecord) -> dict[str, Any]:
        at = time.time()
        attempt: dict[str, Any] = {"at": datetime.fromtimestamp(at, UTC).isoformat(), "status_code": None,
                                   "error": None}
        secret = self.settings.webhook_secret_for(record.tenant)
        if secret is None:
            attempt["error"] = f"tenant {record.tenant!r} has no webhook secret configured"
            return attempt
        assert record.callback_url is not None
        try:
            target = check_url(record.callback_url, self.settings.webhook_allow)
        except CallbackUrlError as exc:
            attempt["error"] = str(exc)
            return attempt
        msg_id, body = event(record)
        stamp = int(at)
        headers = {"content-type": "application/json", "host": target.host_header, "webhook-id": msg_id,
                   "webhook-timestamp": str(stamp), "webhook-signature": sign(secret, msg_id, stamp, body)}
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else None
        try:
            resp = self.client.post(target.url, content=body, headers=headers, extensions=extensions)
            attempt["status_code"] = resp.status_code
        except httpx.HTTPError as exc:
            attempt["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return attempt

    def _next_at(self, record: JobRecord) -> float | None:
        """When to try again, or None once the retry window after the job's end has passed."""
        delay = min(self.settings.webhook_backoff_s * 2 ** record.webhook_attempt_count, WEBHOOK_MAX_BACKOFF_S)
        first = record.finished_at or time.time()
        next_at = time.time() + delay
        return next_at if next_at - first <= self.settings.webhook_max_age_s else None


def dispatch_forever(store: JobStore, settings: Settings, stop: threading.Event | None = None) -> None:
    """The dispatcher loop of a worker's main process (a daemon thread); survives Redis outages."""
    stop = stop or threading.Event()
    dispatcher = Dispatcher(store, settings)
    while not stop.is_set():
        try:
            busy = dispatcher.run_once()
        except Exception:
            log.exception("webhook dispatch failed")
            busy = 0
        stop.wait(0.05 if busy else 0.5)
