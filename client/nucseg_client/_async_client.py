"""``AsyncClient`` and ``AsyncJob``: the ``Client``/``Job`` surface for asyncio, with ``await``."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from nucseg_client._config import DEFAULT_TIMEOUT, Retries, Timeout
from nucseg_client._errors import ConnectError
from nucseg_client._http import (
    RetryState,
    api_error,
    as_retries,
    as_timeout,
    default_headers,
    expect_object,
    form_fields,
    idempotency_headers,
    job_path,
    list_params,
    parse_json,
    path_body,
    resolve_base_url,
    retry_after,
    transport_error,
)
from nucseg_client._job import DownloadPlan, Interrupted, JobBase, Poller, destination, not_ready
from nucseg_client._models import Model
from nucseg_client._progress import ProgressArg, ProgressSink
from nucseg_client._upload import Source, UploadReader, multipart_file, open_source


class AsyncClient:
    """An asyncio connection pool to one nucseg server; see ``Client`` for the arguments.

    The upload is read from disk in 64 KiB chunks on the event loop's thread.

    Example::

        async with AsyncClient("http://localhost:8000") as client:
            job = await client.submit("slide.svs")
            await job.wait()
            await job.download_all("out/")
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: Timeout | float | None = DEFAULT_TIMEOUT, retries: Retries | int = Retries(),
                 verify: ssl.SSLContext | bool = True,
                 transport: httpx.AsyncBaseTransport | None = None, headers: Mapping[str, str] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = resolve_base_url(base_url)
        self.retries = as_retries(retries)
        self._sleep, self._clock = sleep, clock
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=default_headers(api_key, headers),
                                       timeout=as_timeout(timeout), verify=verify, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"<AsyncClient {self.base_url}>"

    # ------------------------------------------------------------------ jobs

    async def submit(self, source: Source, *, filename: str | None = None,
                     options: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
                     idempotency_key: str | None = None, progress: ProgressArg = True,
                     callback_url: str | None = None) -> AsyncJob:
        """Upload a slide, streamed; see ``Client.submit``.

        Example::

            job = await client.submit("S-042.svs", idempotency_key="S-042")
        """
        raw, default_name, opened = open_source(source)
        name = filename or default_name or "slide"
        sink = ProgressSink(progress, total=None, desc=f"upload {name}")
        try:
            reader = UploadReader(raw, sink.update)
            sink.set_total(reader.size)
            request = self._http.build_request(
                "POST", "v1/jobs", files=multipart_file(name, reader),
                data=form_fields(options, metadata, callback_url), headers=idempotency_headers(idempotency_key))
            response = await self._send(request, replayable=reader.replayable)
        finally:
            sink.close()
            if opened:
                raw.close()  # type: ignore[union-attr]
        return self._job_from(response)

    async def submit_path(self, slide_path: str, *, options: Mapping[str, Any] | None = None,
                          metadata: Mapping[str, Any] | None = None,
                          idempotency_key: str | None = None, callback_url: str | None = None) -> AsyncJob:
        """Start a job on a slide under the server's slide root; see ``Client.submit_path``.

        Example::

            job = await client.submit_path("2024/S-042.svs")
        """
        body = path_body(slide_path, options, metadata, callback_url)
        request = self._http.build_request("POST", "v1/jobs", json=body, headers=idempotency_headers(idempotency_key))
        return self._job_from(await self._send(request))

    async def job(self, job_id: str) -> AsyncJob:
        """The job with this id. Example: ``job = await client.job(job_id)``."""
        return self._job_from(await self._request("GET", job_path(job_id)))

    async def jobs(self, status: str | None = None, *, page_size: int = 50) -> AsyncIterator[AsyncJob]:
        """Every job, newest first, page by page. Example::

            async for job in client.jobs(status="running"):
                print(job.id)
        """
        params = list_params(status, page_size)
        while True:
            response = await self._request("GET", "v1/jobs", params=params)
            page = expect_object(parse_json(response), "a job list", response, "jobs")
            for data in page["jobs"]:
                yield AsyncJob(self, data)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    async def models(self) -> list[Model]:
        """The models that the workers have loaded. Example: ``models = await client.models()``."""
        response = await self._request("GET", "v1/models")
        body = expect_object(parse_json(response), "a model list", response, "models")
        return [Model.from_dict(m) for m in body["models"] if isinstance(m, dict)]

    # ------------------------------------------------------------------ plumbing

    def _job_from(self, response: httpx.Response) -> AsyncJob:
        data = expect_object(parse_json(response), "a job", response, "id", "status")
        return AsyncJob(self, data, retry_after(response))

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self._send(self._http.build_request(method, path, **kwargs))

    async def _send(self, request: httpx.Request, *, stream: bool = False,
                    replayable: bool = True) -> httpx.Response:
        state = RetryState(self.retries, request, replayable=replayable)
        while True:
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.RequestError as exc:
                await self._sleep(state.after_exception(exc))
                continue
            delay = state.after_response(response)
            if delay is None:
                break
            await response.aclose()
            await self._sleep(delay)
        if not response.is_success:
            try:
                await response.aread()
            except httpx.RequestError as exc:
                raise transport_error(exc, request) from exc
            finally:
                await response.aclose()
            raise api_error(response)
        return response


class AsyncJob(JobBase):
    """A job on the server, for ``AsyncClient``; the same methods as ``Job``, awaited.

    Example::

        job = await (await client.submit("slide.svs")).wait()
        paths = await job.download_all("out/")
    """

    def __init__(self, client: AsyncClient, data: dict[str, Any], retry_after: float | None = None) -> None:
        super().__init__(data)
        self._client = client
        self._retry_after = retry_after

    async def refresh(self) -> AsyncJob:
        """Read the job's state again. Example: ``await job.refresh()``."""
        response = await self._client._request("GET", job_path(self.id))
        self._set(expect_object(parse_json(response), "a job", response, "id", "status"), retry_after(response))
        return self

    async def wait(self, *, timeout: float | None = None, poll: float = 0.5, max_poll: float = 10.0,
                   progress: ProgressArg = True) -> AsyncJob:
        """Poll until finished; raises ``JobFailed``/``TimeoutException``; see ``Job.wait``.

        Example: ``await job.wait(timeout=600)``.
        """
        poller = Poller(self.id, timeout=timeout, poll=poll, max_poll=max_poll, clock=self._client._clock)
        sink = ProgressSink(progress, total=None, desc=self.id[:8], unit="block")
        try:
            while True:
                await self.refresh()
                p = self.progress
                sink.set_total(p.total or None)
                sink.update(p.done, f"{self.id[:8]} {p.stage}")
                if self.done:
                    break
                await self._client._sleep(poller.next_delay(self.status, self._retry_after))
        finally:
            sink.close()
        if failure := self._failure():
            raise failure
        return self

    async def cancel(self) -> AsyncJob:
        """Cancel a queued or running job (a finished one is left alone); see ``Job.cancel``.

        Example: ``await job.cancel()``.
        """
        if (await self.refresh()).done:
            return self
        response = await self._client._request("DELETE", job_path(self.id))
        if response.status_code == 204:
            self.deleted = True
            return self
        self._set(expect_object(parse_json(response), "a job", response, "id", "status"))
        return self

    async def delete(self) -> None:
        """The server's ``DELETE``; see ``Job.delete``. Example: ``await job.delete()``."""
        response = await self._client._request("DELETE", job_path(self.id))
        self.deleted = response.status_code == 204

    async def stats(self) -> dict[str, Any]:
        """The parsed ``stats.json``. Example: ``stats = await job.stats()``."""
        response = await self._client._request("GET", job_path(self.id, "results", "stats.json"))
        return expect_object(parse_json(response), "stats.json", response)

    async def download(self, name: str, dest: str | os.PathLike[str] | None = None, *,
                       progress: ProgressArg = False) -> Path:
        """Stream one result file, resumable; see ``Job.download``.

        Example: ``await job.download("semantic.png", "out/")``.
        """
        path = destination(name, dest)
        if self.status != "succeeded" or not self.results:
            await self.refresh()
        plan = DownloadPlan(path, self._expected_size(name))
        sink = ProgressSink(progress, total=plan.expected, desc=name)
        retries, attempt = self._client.retries, 0
        try:
            while True:
                try:
                    return await self._download_once(name, plan, sink)
                except Interrupted as exc:
                    if attempt >= retries.total:
                        raise exc.error from exc
                    await self._client._sleep(retries.delay(attempt))
                    attempt += 1
        finally:
            sink.close()

    async def download_all(self, dest_dir: str | os.PathLike[str], *,
                           progress: ProgressArg = False) -> list[Path]:
        """Download every result file into ``dest_dir``. Example: ``await job.download_all("out/")``."""
        if self.status != "succeeded":
            await self.refresh()
        if self.status != "succeeded":
            raise not_ready(self)
        folder = Path(dest_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return [await self.download(f.name, folder / f.name, progress=progress) for f in self.results]

    async def _download_once(self, name: str, plan: DownloadPlan, sink: ProgressSink) -> Path:
        offset = plan.offset()
        if plan.complete(offset):
            return plan.finish()
        request = self._client._http.build_request("GET", job_path(self.id, "results", name),
                                                   headers=plan.headers(offset))
        response = await self._client._send(request, stream=True)
        try:
            with plan.open(response, offset) as out:
                done = out.tell()
                sink.set_total(plan.total)
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
                    done += len(chunk)
                    sink.update(done)
        except httpx.RequestError as exc:
            raise Interrupted(transport_error(exc, request)) from exc
        finally:
            await response.aclose()
        try:
            return plan.finish()
        except ConnectError as exc:
            raise Interrupted(exc) from exc
