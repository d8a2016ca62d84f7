"""A mock nucseg server for the client unit tests: ``httpx.MockTransport`` handlers, canned job bodies,
and an injected sleep and clock, so no client test waits for real."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from nucseg_client import Client, Retries

URL = "http://nucseg.test"
JOB_ID = "0123456789abcdef0123456789abcdef"
Handler = Callable[[httpx.Request], httpx.Response]


def job_body(status: str = "queued", *, done: int = 0, total: int = 0, job_id: str = JOB_ID,
             results: list[dict[str, Any]] | None = None, error: dict[str, str] | None = None) -> dict[str, Any]:
    return {"id": job_id, "status": status, "progress": {"stage": status, "done": done, "total": total},
            "created_at": "2026-01-02T03:04:05Z", "slide": {"name": "s.png", "source": "upload"},
            "options": {}, "metadata": {}, "error": error, "results": results, "href": f"/v1/jobs/{job_id}"}


def err(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


class Recorder:
    """A MockTransport handler that answers from a list (or a function) and records requests."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer


class Sleeps(list[float]):
    """An injected ``sleep`` that records delays and moves a fake clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def client(handler: Any, sleeps: Sleeps | None = None, **kwargs: Any) -> Client:
    sleeps = sleeps if sleeps is not None else Sleeps()
    kwargs.setdefault("retries", Retries(jitter=False))
    return Client(URL, transport=httpx.MockTransport(handler), sleep=sleeps, clock=sleeps.clock, **kwargs)


def multipart_fields(request: httpx.Request) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, content) of a multipart body."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    fields = {}
    for part in request.content.split(b"--" + boundary)[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        disposition = head.decode()
        name = disposition.split('name="')[1].split('"')[0]
        filename = disposition.split('filename="')[1].split('"')[0] if "filename=" in disposition else None
        fields[name] = (filename, body[:-2])
    return fields


HOOK = "https://lims.example.org/hooks/nucseg?src=lab-a"


def sequence(*bodies: dict[str, Any], headers: dict[str, str] | None = None) -> Recorder:
    return Recorder(*[httpx.Response(200, json=b, headers=headers or {}) for b in bodies])


CONTENT = bytes(range(256)) * 40  # 10240 bytes


RESULTS = [{"name": "semantic.png", "href": f"/v1/jobs/{JOB_ID}/results/semantic.png",
            "content_type": "image/png", "size_bytes": len(CONTENT)}]
