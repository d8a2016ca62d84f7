"""nucseg_client against ``httpx.MockTransport``: the async client, and its surface against the sync one.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import Any

import httpx
from nucseg_client import AsyncClient, AsyncJob, Client, Job, Retries

from tests.helpers.client_mock import CONTENT, JOB_ID, RESULTS, URL, err, job_body


def test_async_client_runs_the_sync_scenario(tmp_path: Path) -> None:
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


RENAMED = {"close": "aclose"}  # httpx's convention: the async close is aclose


def _surface(cls: type) -> dict[str, Any]:
    """Public methods and properties (and ``__init__``), by name."""
    return {RENAMED.get(name, name): member for name, member in inspect.getmembers(cls)
            if (not name.startswith("_") or name == "__init__")
            and (inspect.isfunction(member) or isinstance(member, property))}


def _parameters(func: Any) -> list[tuple[str, Any, Any]]:
    params = inspect.signature(func).parameters.values()
    return [(p.name, p.kind, "<sleep>" if p.name == "sleep" else p.default) for p in params]


def test_async_client_has_the_sync_clients_names_and_signatures() -> None:
    """Same methods and properties, same parameters (names, kinds, defaults); the async ones await."""
    assert inspect.signature(Client.__init__).parameters["sleep"].default is time.sleep
    assert inspect.signature(AsyncClient.__init__).parameters["sleep"].default is asyncio.sleep
    for sync_cls, async_cls in ((Client, AsyncClient), (Job, AsyncJob)):
        sync, asynchronous = _surface(sync_cls), _surface(async_cls)
        assert sorted(sync) == sorted(asynchronous), (sync_cls.__name__, set(sync) ^ set(asynchronous))
        assert len(sync) > 5
        for name, member in sync.items():
            other = asynchronous[name]
            assert isinstance(member, property) == isinstance(other, property), name
            if isinstance(member, property):
                continue
            assert _parameters(member) == _parameters(other), (sync_cls.__name__, name)
            if name != "__init__" and not inspect.isgeneratorfunction(member):
                assert inspect.iscoroutinefunction(other) or inspect.isasyncgenfunction(other), name
