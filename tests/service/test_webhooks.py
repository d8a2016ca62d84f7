"""Terminal-state webhooks: signed delivery with retries to a real receiver, SSRF refusals, the give-up rule."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from core.keys import Keys
from core.netguard import CallbackUrlError, check_url
from core.records import JobRecord, new_job_id
from core.settings import Settings
from core.store import JobStore
from tests.helpers.service_stack import FAST, WEBHOOK_SECRETS, Stack, free_port, png_bytes
from tests.helpers.webhook_receiver import Receiver, receiving
from worker.webhooks import Dispatcher


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving([500]) as running:
        yield running


def expected_signature(secret: str, headers: dict[str, str], body: bytes) -> str:
    """The Standard Webhooks signature, computed here independently of worker.webhooks."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _wait_webhook(stack: Stack, job_id: str, until: set[str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = stack.job(job_id)
        if job["webhook"] and job["webhook"]["status"] in until:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"webhook of {job_id} not {until}: {stack.job(job_id)['webhook']}")


@pytest.mark.service
def test_webhook_is_signed_retried_after_a_500_and_recorded_in_the_job(stack: Stack, receiver: Receiver) -> None:
    resp = stack.client.post("/v1/jobs", files={"file": ("w.png", png_bytes(64, 64, seed=5))},
                             data={"options": json.dumps(FAST), "metadata": '{"case": "W-1"}',
                                   "callback_url": receiver.url})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert resp.json()["webhook"] == {"url": receiver.url, "status": "waiting", "attempt_count": 0,
                                      "attempts": [], "next_attempt_at": None}
    job = _wait_webhook(stack, job_id, {"delivered", "failed"})
    assert job["status"] == "succeeded"
    hook = job["webhook"]
    assert hook["status"] == "delivered" and hook["attempt_count"] == 2, hook
    assert [a["status_code"] for a in hook["attempts"]] == [500, 200]
    assert len(receiver.calls) == 2
    first, second = receiver.calls
    assert first["path"] == "/hooks/nucseg?src=test"
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == f"msg_{job_id}_succeeded"
    assert first["body"] == second["body"]  # the same event, re-sent
    assert second["at"] - first["at"] >= 0.4  # NUCSEG_WEBHOOK_BACKOFF_S=0.5 in the stack
    for call in receiver.calls:
        headers = call["headers"]
        assert abs(int(headers["webhook-timestamp"]) - call["at"]) < 5
        assert headers["webhook-signature"] == expected_signature(WEBHOOK_SECRETS["lab-a"], headers, call["body"])
        assert headers["webhook-signature"] != expected_signature(WEBHOOK_SECRETS["lab-b"], headers, call["body"])
    event = json.loads(first["body"])
    assert event["type"] == "job.succeeded"
    assert event["data"]["id"] == job_id and event["data"]["href"] == f"/v1/jobs/{job_id}"
    assert event["data"]["metadata"] == {"case": "W-1"} and "semantic.png" in event["data"]["results"]


@pytest.mark.service
def test_an_unreachable_receiver_never_fails_the_job(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}/gone"
    resp = stack.client.post("/v1/jobs", json={"slide_path": "cases/tile.png", "options": FAST, "callback_url": dead})
    assert resp.status_code == 202, resp.text
    job = stack.wait(resp.json()["id"])
    assert job["status"] == "succeeded"
    job = _wait_webhook(stack, job["id"], {"retrying"})
    attempt = job["webhook"]["attempts"][0]
    assert attempt["status_code"] is None and "ConnectError" in attempt["error"]
    assert job["webhook"]["next_attempt_at"] is not None and job["status"] == "succeeded"


REFUSED = {
    "http://10.1.2.3/hook": "callback_url_refused",
    "http://169.254.169.254/latest/meta-data/": "callback_url_refused",
    "http://[::1]:8080/hook": "callback_url_refused",
    "http://[::ffff:192.168.0.1]/hook": "callback_url_refused",
    "http://0.0.0.0:9/hook": "callback_url_refused",
    "ftp://example.org/hook": "invalid_callback_url",
    "file:///etc/passwd": "invalid_callback_url",
    "http://user:secret@example.org/hook": "invalid_callback_url",
    "http://no-such-host.invalid/hook": "invalid_callback_url",
}


@pytest.mark.service
@pytest.mark.parametrize("url", list(REFUSED))
def test_callback_urls_to_private_targets_or_odd_schemes_are_refused(stack: Stack, url: str) -> None:
    before = stack.job_count()
    resp = stack.client.post("/v1/jobs", json={"slide_path": "cases/tile.png", "options": FAST, "callback_url": url})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == REFUSED[url]
    assert "secret" not in error["message"] and stack.job_count() == before


def test_guard_pins_the_checked_address_and_honours_the_allowlist() -> None:
    target = check_url("http://127.0.0.1:8080/a/b?c=1", ["127.0.0.1/32"])
    assert target.url == "http://127.0.0.1:8080/a/b?c=1" and target.host_header == "127.0.0.1:8080"
    with pytest.raises(CallbackUrlError, match="127.0.0.2"):
        check_url("http://127.0.0.2/", ["127.0.0.1/32"])
    public = check_url("https://93.184.215.14/x", [])
    assert public.url == "https://93.184.215.14/x" and public.sni_hostname is None
    with pytest.raises(ValueError, match="'nonsense'"):
        check_url("http://127.0.0.1/", ["nonsense"])


# ---------------------------------------------------------------- the give-up rule, store level




def test_delivery_backs_off_exponentially_then_gives_up_after_the_max_age(redis_client: redis.Redis,
                                                                         tmp_path: Path) -> None:
    redis_client.flushdb()
    store = JobStore(redis_client)
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    settings = Settings(data_dir=tmp_path, auth="disabled", webhook_secret=secret, webhook_allow=["127.0.0.1/32"],
                        webhook_backoff_s=0.1, webhook_max_age_s=1.0, webhook_timeout_s=1.0)
    record = JobRecord(id=new_job_id(), created_at=time.time(), slide_file="/nowhere",
                       callback_url=f"http://127.0.0.1:{free_port()}/closed")
    assert store.create(record).created
    assert store.claim(record.id, "tok", lease_ttl_s=30, delivery_tag="", worker="w") == "claimed"
    assert store.finish(record.id, "tok", "failed")
    dispatcher = Dispatcher(store, settings)
    deadline = time.monotonic() + 10
    while (rec := store.get(record.id)) is not None and rec.webhook_status != "failed":
        assert time.monotonic() < deadline, rec
        dispatcher.run_once()
        time.sleep(0.02)
    assert rec is not None and rec.webhook_attempts is not None
    times = [time.mktime(time.strptime(a["at"][:19], "%Y-%m-%dT%H:%M:%S")) for a in rec.webhook_attempts]
    assert 4 <= rec.webhook_attempt_count <= 6  # 0.1, 0.2, 0.4 s ... until 1 s after the job ended
    assert times == sorted(times)
    assert redis_client.zscore(Keys.WEBHOOKS, record.id) is None  # no longer scheduled
    assert store.delete(record.id) == "deleted" and dispatcher.run_once() == 0


@pytest.mark.parametrize("secret", ["plain-text", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()])
def test_malformed_webhook_secrets_are_refused_at_configuration(secret: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="webhook secret must be 'whsec_'"):
        Settings(tenants={"lab-a": {"keys": [], "webhook_secret": secret}})
    with pytest.raises(ValidationError, match="webhook secret must be 'whsec_'"):
        Settings(webhook_secret=secret)
