"""The synchronous ``Client`` and its ``Job``."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
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


class Client:
    """A connection pool to one nucseg server.

    ``base_url`` defaults to ``$NUCSEG_URL`` and ``api_key`` to ``$NUCSEG_API_KEY`` (sent as
    ``Authorization: Bearer``). ``verify`` is an ``ssl.SSLContext`` for a site CA (or ``False``).
    ``transport`` replaces the network (``httpx.MockTransport`` in tests);
    ``sleep`` and ``clock`` replace ``time.sleep`` and ``time.monotonic`` for retries and ``wait``.

    Example::

        with Client("http://localhost:8000") as client:
            job = client.submit("slide.svs", options={"tile_size": 256}, metadata={"case": "S-042"})
            job.wait()
            job.download_all("results/S-042")
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: Timeout | float | None = DEFAULT_TIMEOUT, retries: Retries | int = Retries(),
                 verify: ssl.SSLContext | bool = True,
                 transport: httpx.BaseTransport | None = None, headers: Mapping[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = resolve_base_url(base_url)
        self.retries = as_retries(retries)
        self._sleep, self._clock = sleep, clock
        self._http = httpx.Client(base_url=self.base_url, headers=default_headers(api_key, headers),
                                  timeout=as_timeout(timeout), verify=verify, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __repr__(self) -> str:
        return f"<Client {self.base_url}>"

    # ------------------------------------------------------------------ jobs

    def submit(self, source: Source, *, filename: str | None = None, options: Mapping[str, Any] | None = None,
               metadata: Mapping[str, Any] | None = None, idempotency_key: str | None = None,
               progress: ProgressArg = True, callback_url: str | None = None) -> Job:
        """Upload a slide (streamed from disk in chunks) and return its queued ``Job``.

        ``source`` is a path, a binary file object, or an iterable of bytes (then it is not retried).
        ``progress``: ``True`` shows a bar on a terminal, or pass ``callback(sent, total)``. With an
        ``idempotency_key`` a repeated submit returns the original job, so the POST is retried too.
        With a ``callback_url`` the server POSTs a signed event there when the job ends (check it
        with ``verify_webhook``); ``job.webhook`` shows the delivery.

        Example::

            job = client.submit("S-042.svs", options={"outputs": ["masks"]}, idempotency_key="S-042")
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
            response = self._send(request, replayable=reader.replayable)
        finally:
            sink.close()
            if opened:
                raw.close()  # type: ignore[union-attr]
        return self._job_from(response)

    def submit_path(self, slide_path: str, *, options: Mapping[str, Any] | None = None,
                    metadata: Mapping[str, Any] | None = None, idempotency_key: str | None = None,
                    callback_url: str | None = None) -> Job:
        """Start a job on a slide that already lies under the server's slide root (``callback_url``: as
        for ``submit``).

        Example::

            job = client.submit_path("2024/S-042.svs", metadata={"case": "S-042"})
        """
        body = path_body(slide_path, options, metadata, callback_url)
        request = self._http.build_request("POST", "v1/jobs", json=body, headers=idempotency_headers(idempotency_key))
        return self._job_from(self._send(request))

    def job(self, job_id: str) -> Job:
        """The job with this id.

        Example::

            print(client.job("9f0c...").status)
        """
        return self._job_from(self._request("GET", job_path(job_id)))

    def jobs(self, status: str | None = None, *, page_size: int = 50) -> Iterator[Job]:
        """Every job, newest first (optionally only those with ``status``), fetching pages as needed.

        Example::

            failed = [job.id for job in client.jobs(status="failed")]
        """
        params = list_params(status, page_size)
        while True:
            response = self._request("GET", "v1/jobs", params=params)
            page = expect_object(parse_json(response), "a job list", response, "jobs")
            for data in page["jobs"]:
                yield Job(self, data)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def models(self) -> list[Model]:
        """The models that the workers have loaded, newest first.

        Example::

            print([m.name for m in client.models()])
        """
        response = self._request("GET", "v1/models")
        body = expect_object(parse_json(response), "a model list", response, "models")
        return [Model.from_dict(m) for m in body["models"] if isinstance(m, dict)]

    # ------------------------------------------------------------------ plumbing

    def _job_from(self, response: httpx.Response) -> Job:
        data = expect_object(parse_json(response), "a job", response, "id", "status")
        return Job(self, data, retry_after(response))

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._send(self._http.build_request(method, path, **kwargs))

    def _send(self, request: httpx.Request, *, stream: bool = False, replayable: bool = True) -> httpx.Response:
        """Send with retries; returns a 2xx response or raises ``ApiError``/``ConnectError``/``TimeoutException``."""
        state = RetryState(self.retries, request, replayable=replayable)
        while True:
            try:
                response = self._http.send(request, stream=stream)
            except httpx.RequestError as exc:
                self._sleep(state.after_exception(exc))
                continue
            delay = state.after_response(response)
            if delay is None:
                break
            response.close()
            self._sleep(delay)
        if not response.is_success:
            try:
                response.read()
            except httpx.RequestError as exc:
                raise transport_error(exc, request) from exc
            finally:
                response.close()
            raise api_error(response)
        return response


class Job(JobBase):
    """A job on the server; ``Client.submit``, ``Client.job`` and ``Client.jobs`` make them.

    Example::

        job = client.submit("slide.svs")
        job.wait(timeout=3600)            # raises JobFailed if it failed or was cancelled
        print(job.stats()["nuclei"]["count"])
        job.download_all("out/")
    """

    def __init__(self, client: Client, data: dict[str, Any], retry_after: float | None = None) -> None:
        super().__init__(data)
        self._client = client
        self._retry_after = retry_after

    def refresh(self) -> Job:
        """Read the job's state again from the server; returns ``self``.

        Example::

            while not job.refresh().done:
                time.sleep(5)
        """
        response = self._client._request("GET", job_path(self.id))
        self._set(expect_object(parse_json(response), "a job", response, "id", "status"), retry_after(response))
        return self

    def wait(self, *, timeout: float | None = None, poll: float = 0.5, max_poll: float = 10.0,
             progress: ProgressArg = True) -> Job:
        """Poll until the job has finished; returns ``self`` if it succeeded.

        Polls every ``poll`` seconds, growing x1.5 up to ``max_poll`` (a ``Retry-After`` from the
        server wins). Raises ``JobFailed`` if the job failed or was cancelled, and ``TimeoutException``
        after ``timeout`` seconds (the job keeps running). ``progress=True`` shows a bar on a terminal.

        Example::

            job.wait(timeout=600, progress=lambda done, total: print(done, total))
        """
        poller = Poller(self.id, timeout=timeout, poll=poll, max_poll=max_poll, clock=self._client._clock)
        sink = ProgressSink(progress, total=None, desc=self.id[:8], unit="block")
        try:
            while True:
                self.refresh()
                p = self.progress
                sink.set_total(p.total or None)
                sink.update(p.done, f"{self.id[:8]} {p.stage}")
                if self.done:
                    break
                self._client._sleep(poller.next_delay(self.status, self._retry_after))
        finally:
            sink.close()
        if failure := self._failure():
            raise failure
        return self

    def cancel(self) -> Job:
        """Cancel the job if it is queued or running (a finished job is left as it is); returns ``self``.

        A running job stops within one block. Example::

            job.cancel().wait()   # raises JobFailed('cancelled', ...) unless it finished first
        """
        if self.refresh().done:
            return self
        response = self._client._request("DELETE", job_path(self.id))
        if response.status_code == 204:  # it finished in the meantime, and DELETE removed it
            self.deleted = True
            return self
        self._set(expect_object(parse_json(response), "a job", response, "id", "status"))
        return self

    def delete(self) -> None:
        """The server's ``DELETE``: cancels a queued or running job; removes a finished one and its files.

        Example::

            job.delete()
        """
        response = self._client._request("DELETE", job_path(self.id))
        self.deleted = response.status_code == 204

    def stats(self) -> dict[str, Any]:
        """The parsed ``stats.json`` of a succeeded job (areas, nucleus counts, timings).

        Example::

            counts = job.stats()["nuclei"]["classes"]
        """
        response = self._client._request("GET", job_path(self.id, "results", "stats.json"))
        return expect_object(parse_json(response), "stats.json", response)

    def download(self, name: str, dest: str | os.PathLike[str] | None = None, *,
                 progress: ProgressArg = False) -> Path:
        """Stream one result file to ``dest`` (a file, or a folder to put ``name`` in; default: here).

        Interrupted downloads resume from ``<dest>.part`` with an HTTP Range request, also across
        calls. Returns the path written. Example::

            job.download("semantic.png", "out/")
        """
        path = destination(name, dest)
        if self.status != "succeeded" or not self.results:
            self.refresh()
        plan = DownloadPlan(path, self._expected_size(name))
        sink = ProgressSink(progress, total=plan.expected, desc=name)
        retries, attempt = self._client.retries, 0
        try:
            while True:
                try:
                    return self._download_once(name, plan, sink)
                except Interrupted as exc:
                    if attempt >= retries.total:
                        raise exc.error from exc
                    self._client._sleep(retries.delay(attempt))
                    attempt += 1
        finally:
            sink.close()

    def download_all(self, dest_dir: str | os.PathLike[str], *, progress: ProgressArg = False) -> list[Path]:
        """Download every result file into ``dest_dir`` (created); returns the paths.

        Example::

            paths = job.wait().download_all("results/S-042")
        """
        if self.status != "succeeded":
            self.refresh()
        if self.status != "succeeded":
            raise not_ready(self)
        folder = Path(dest_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return [self.download(f.name, folder / f.name, progress=progress) for f in self.results]

    def _download_once(self, name: str, plan: DownloadPlan, sink: ProgressSink) -> Path:
        offset = plan.offset()
        if plan.complete(offset):
            return plan.finish()
        request = self._client._http.build_request("GET", job_path(self.id, "results", name),
                                                   headers=plan.headers(offset))
        response = self._client._send(request, stream=True)
        try:
            with plan.open(response, offset) as out:
                done = out.tell()
                sink.set_total(plan.total)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    done += len(chunk)
                    sink.update(done)
        except httpx.RequestError as exc:
            raise Interrupted(transport_error(exc, request)) from exc
        finally:
            response.close()
        try:
            return plan.finish()
        except ConnectError as exc:
            raise Interrupted(exc) from exc

