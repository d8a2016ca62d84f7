"""Access over real HTTP: API keys, tenant isolation (404, never 403), per-tenant limits, CORS, start-up refusal."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.service_stack import FAST, REPO, Stack, png_bytes, wait_http

pytestmark = pytest.mark.service


@contextlib.contextmanager
def extra_api(stack: Stack, env: dict[str, str], tenant: str | None = "lab-b") -> Iterator[httpx.Client]:
    """A second API process on the stack's Redis with ``env`` on top; yields a client for ``tenant``."""
    proc, port = stack.spawn_api(env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        with stack.client_for(tenant, f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(15)


def test_requests_without_a_valid_key_get_401_with_a_challenge(stack: Stack) -> None:
    job = stack.run_good_job()
    with stack.client_for(None) as anonymous:
        for method, path in (("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job['id']}"), ("POST", "/v1/jobs"),
                             ("DELETE", f"/v1/jobs/{job['id']}"), ("GET", f"/v1/jobs/{job['id']}/results/stats.json"),
                             ("GET", f"/v1/jobs/{job['id']}/dzi"), ("GET", "/v1/models"), ("GET", "/metrics")):
            resp = anonymous.request(method, path)
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "unauthorized"
            assert resp.headers["www-authenticate"].startswith("Bearer")
        bad = anonymous.get("/v1/jobs", headers={"Authorization": "Bearer nsk_not_a_real_key"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert "nsk_not_a_real_key" not in bad.text  # a wrong key is never echoed
        basic = anonymous.get("/v1/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert basic.status_code == 401 and "'Basic'" in basic.json()["error"]["message"]
        for path in ("/healthz", "/", "/openapi.json"):  # probes, the page shell and the schema stay open
            assert anonymous.get(path).status_code == 200, path
    assert stack.job(job["id"])["status"] == "succeeded"  # the 401 DELETE touched nothing


def test_another_tenants_job_is_404_everywhere_and_not_listed(stack: Stack) -> None:
    job = stack.run_good_job()  # lab-a's
    job_id = job["id"]
    with stack.client_for("lab-b") as other:
        for method, path in (("GET", f"/v1/jobs/{job_id}"), ("DELETE", f"/v1/jobs/{job_id}"),
                             ("GET", f"/v1/jobs/{job_id}/results/stats.json"),
                             ("HEAD", f"/v1/jobs/{job_id}/results/stats.json"),
                             ("GET", f"/v1/jobs/{job_id}/dzi"), ("GET", f"/v1/jobs/{job_id}/dzi/slide.dzi"),
                             ("GET", f"/v1/jobs/{job_id}/dzi/slide_files/0/0_0.jpeg")):
            resp = other.request(method, path)
            assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
            if method != "HEAD":
                assert resp.json()["error"]["code"] == "job_not_found"
        listed = other.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
        assert job_id not in {j["id"] for j in listed}
        # lab-b's own job is visible to lab-b only
        mine = other.post("/v1/jobs", files={"file": ("b.png", png_bytes(64, 64, seed=9))},
                          data={"options": '{"tile_size": 64, "overlap": 0, "outputs": ["masks"]}'})
        assert mine.status_code == 202, mine.text
        assert mine.json()["id"] in {j["id"] for j in other.get("/v1/jobs").json()["jobs"]}
    assert stack.client.get(f"/v1/jobs/{mine.json()['id']}").status_code == 404
    assert stack.client.get(f"/v1/jobs/{job_id}/results/stats.json").status_code == 200  # still there


def test_idempotency_keys_are_per_tenant(stack: Stack) -> None:
    headers = {"Idempotency-Key": "shared-key-across-tenants"}
    first = stack.submit_path("cases/tile.png", options=FAST, headers=headers)
    with stack.client_for("lab-b") as other:
        second = other.post("/v1/jobs", json={"slide_path": "cases/tile.png", "options": FAST}, headers=headers)
    assert first.status_code == 202 and second.status_code == 202, (first.text, second.text)
    assert first.json()["id"] != second.json()["id"]


def test_queued_job_limit_answers_429_with_retry_after(stack: Stack) -> None:
    # Jobs go to the 'gpu' queue, which no test worker consumes, so they stay queued.
    with extra_api(stack, {"NUCSEG_QUEUE": "gpu", "NUCSEG_MAX_QUEUED_PER_TENANT": "2"}, tenant="lab-c") as api:
        ids = []
        for n in range(2):
            resp = api.post("/v1/jobs", json={"slide_path": "cases/tile.png", "options": FAST},
                            headers={"Idempotency-Key": f"queued-{n}"})
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
        replay = api.post("/v1/jobs", json={"slide_path": "cases/tile.png", "options": FAST},
                          headers={"Idempotency-Key": "queued-1"})
        assert replay.status_code == 200 and replay.json()["id"] == ids[1]  # a retry still gets its job
        over = api.post("/v1/jobs", files={"file": ("big.png", png_bytes(512, 512))})
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "too_many_queued_jobs" and "'lab-c'" in over.json()["error"]["message"]
        assert int(over.headers["retry-after"]) > 0
        with stack.client_for("lab-b", str(api.base_url)) as other:  # another tenant is not limited
            fine = other.post("/v1/jobs", json={"slide_path": "cases/tile.png", "options": FAST})
            assert fine.status_code == 202, fine.text
            ids_b = [fine.json()["id"]]
            assert other.delete(f"/v1/jobs/{ids_b[0]}").status_code == 200
        assert api.delete(f"/v1/jobs/{ids[0]}").status_code == 200  # cancelled: room for one more
        again = api.post("/v1/jobs", json={"slide_path": "cases/tile.png", "options": FAST})
        assert again.status_code == 202, again.text
        for job_id in (ids[1], again.json()["id"]):
            assert api.delete(f"/v1/jobs/{job_id}").status_code == 200


def test_submission_rate_limit_answers_429_with_retry_after(stack: Stack) -> None:
    env = {"NUCSEG_SUBMIT_BURST": "2", "NUCSEG_SUBMIT_RATE_PER_MIN": "6"}
    with extra_api(stack, env, tenant="lab-d") as api:
        codes = [api.post("/v1/jobs", json={"slide_path": "cases/none.svs"}).status_code for _ in range(3)]
        assert codes == [422, 422, 429], codes  # the limit counts requests, even bad ones
        limited = api.post("/v1/jobs", json={"slide_path": "cases/none.svs"})
        body = limited.json()["error"]
        assert limited.status_code == 429 and body["code"] == "rate_limited" and "'lab-d'" in body["message"]
        assert 1 <= int(limited.headers["retry-after"]) <= 10
        assert api.get("/v1/jobs").status_code == 200  # reads are not limited


def test_cors_is_off_unless_origins_are_configured(stack: Stack) -> None:
    preflight = {"Origin": "https://lims.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    resp = stack.client.options("/v1/jobs", headers=preflight)
    assert "access-control-allow-origin" not in resp.headers
    resp = stack.client.get("/v1/jobs", headers={"Origin": "https://lims.example"})
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
    with extra_api(stack, {"NUCSEG_CORS_ORIGINS": '["https://lims.example"]'}) as api:
        allowed = api.options("/v1/jobs", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://lims.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other = api.options("/v1/jobs", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        assert other.status_code == 400 and other.json()["error"]["code"] == "cors_refused"
        assert "'https://evil.example'" in other.json()["error"]["message"]


def test_responses_forbid_content_sniffing(stack: Stack) -> None:
    job = stack.run_good_job()
    for path in ("/v1/jobs", f"/v1/jobs/{job['id']}/results/semantic.png", "/v1/jobs/" + "0" * 32):
        assert stack.client.get(path).headers["x-content-type-options"] == "nosniff"


def _serve(env: dict[str, str], host: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cli.service", "serve", "--host", host, "--port", "1"]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_start_up_refuses_auth_disabled_off_loopback_and_auth_without_keys(stack: Stack) -> None:
    disabled = {**stack.env, "NUCSEG_AUTH": "disabled"}
    out = _serve(disabled, "0.0.0.0")
    assert out.returncode == 2 and "NUCSEG_AUTH=disabled is allowed only on a loopback" in out.stderr
    assert "'0.0.0.0'" in out.stderr
    no_keys = {k: v for k, v in stack.env.items() if k != "NUCSEG_TENANTS"}
    out = _serve(no_keys, "127.0.0.1")
    assert out.returncode == 2 and "no API key is configured" in out.stderr


def test_auth_disabled_on_loopback_serves_everyone_as_the_default_tenant(stack: Stack) -> None:
    with extra_api(stack, {"NUCSEG_AUTH": "disabled"}, tenant=None) as api:
        resp = api.post("/v1/jobs", json={"slide_path": "cases/tile.png", "options": FAST})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        assert stack.client.get(f"/v1/jobs/{job_id}").status_code == 404  # not lab-a's
        deadline = time.monotonic() + 60
        while (job := api.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] == "succeeded", job


def test_keys_new_prints_a_key_once_and_the_entry_holding_only_its_hash() -> None:
    import json as _json
    import re

    from core.settings import hash_api_key

    cmd = [sys.executable, "-m", "cli.service", "keys", "new", "lab-x"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = re.search(r"^\s+(nsk_\S+)$", out.stdout, re.M)
    assert key is not None and len(key.group(1)) > 40
    entry = _json.loads(out.stdout[out.stdout.index("{"):])
    assert entry["lab-x"]["keys"] == [hash_api_key(key.group(1))]
    assert entry["lab-x"]["webhook_secret"].startswith("whsec_") and key.group(1) not in _json.dumps(entry)
    bad = subprocess.run([*cmd[:-1], "Lab X/../"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'Lab X/../'" in bad.stderr
