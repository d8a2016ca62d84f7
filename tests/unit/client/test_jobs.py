"""nucseg_client against ``httpx.MockTransport``: wait, cancel, list.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

from typing import Any

import httpx
import nucseg_client
import pytest
from nucseg_client import JobFailed, TimeoutException

from tests.helpers.client_mock import JOB_ID, Recorder, Sleeps, client, job_body, sequence


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
    with pytest.raises(TimeoutException, match=f"job {JOB_ID} is still running after waiting 5"):
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
