"""Transport-independent pieces shared by ``Client`` and ``AsyncClient``.

Building headers, turning responses and httpx exceptions into our errors, deciding whether to
retry: nothing here does I/O, so the sync and async clients stay two thin loops.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from nucseg_client._config import Retries, Timeout
from nucseg_client._errors import ApiError, ConnectError, NucsegError, TimeoutException
from nucseg_client._version import __version__

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT"})
# The request never reached the server: retrying is safe whatever the method.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
USER_AGENT = f"nucseg-client/{__version__} httpx/{httpx.__version__}"


def resolve_base_url(base_url: str | None) -> str:
    """``base_url``, else ``$NUCSEG_URL``; must be an http(s) URL."""
    url = base_url or os.environ.get("NUCSEG_URL")
    if not url:
        raise ValueError("no server URL: pass base_url or set NUCSEG_URL (e.g. http://localhost:8000)")
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"base_url must be an http:// or https:// URL with a host, got {url!r}")
    return url.rstrip("/") + "/"


def default_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("NUCSEG_API_KEY")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers | dict(extra or {})


def as_timeout(timeout: Timeout | float | None) -> httpx.Timeout:
    if isinstance(timeout, Timeout):
        return timeout.as_httpx()
    if timeout is None:
        return Timeout(None).as_httpx()
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        return Timeout(timeout).as_httpx()
    raise TypeError(f"timeout must be a Timeout, a number of seconds or None, got {timeout!r}")


def as_retries(retries: Retries | int) -> Retries:
    if isinstance(retries, Retries):
        return retries
    if isinstance(retries, int) and not isinstance(retries, bool):
        return Retries(total=retries)
    raise TypeError(f"retries must be a Retries or an int, got {retries!r}")


def job_path(job_id: str, *rest: str) -> str:
    """``v1/jobs/<id>/...`` relative to the base URL, each segment quoted (ids never add path parts)."""
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job id must be a non-empty string, got {job_id!r}")
    return "/".join(["v1/jobs", *(quote(p, safe="") for p in (job_id, *rest))])


def is_retriable(method: str, headers: Mapping[str, str] | httpx.Headers) -> bool:
    """GET/HEAD/...; a POST only when it carries an ``Idempotency-Key``."""
    method = method.upper()
    return method in IDEMPOTENT_METHODS or (method == "POST" and "idempotency-key" in httpx.Headers(headers))


class RetryState:
    """Counts attempts of one request and says how long to sleep before the next (or raises)."""

    def __init__(self, retries: Retries, request: httpx.Request, *, replayable: bool = True) -> None:
        self.retries, self.request = retries, request
        self.replayable = replayable
        self.retriable = replayable and is_retriable(request.method, request.headers)
        self.attempt = 0

    def after_exception(self, exc: httpx.RequestError) -> float:
        """Delay before retrying after ``exc``; raises our mapped error when it must not retry."""
        safe = self.retriable or (self.replayable and isinstance(exc, NOT_SENT))
        if not isinstance(exc, httpx.TransportError) or not safe or self.attempt >= self.retries.total:
            raise transport_error(exc, self.request) from exc
        return self._next(None)

    def after_response(self, response: httpx.Response) -> float | None:
        """Delay before retrying this response, or ``None`` to keep it."""
        if response.status_code not in self.retries.statuses or not self.retriable:
            return None
        if self.attempt >= self.retries.total:
            return None
        return self._next(retry_after(response))

    def _next(self, retry_after_s: float | None) -> float:
        delay = self.retries.delay(self.attempt, retry_after_s)
        self.attempt += 1
        return delay


def transport_error(exc: httpx.RequestError, request: httpx.Request) -> NucsegError:
    """Map an httpx transport exception to ``TimeoutException`` or ``ConnectError``."""
    what = f"{request.method} {request.url}"
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__.replace("Timeout", " timeout").lower().strip()
        return TimeoutException(f"{kind} during {what}: {exc or 'no answer in time'}")
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(f"cannot connect to {request.url.scheme}://{request.url.netloc.decode()}: "
                               f"{exc} (is the service running, and is NUCSEG_URL right?)")
    return ConnectError(f"connection broke during {what}: {type(exc).__name__}: {exc}")


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (a number or an HTTP date), or ``None``."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def api_error(response: httpx.Response) -> ApiError:
    """The ``ApiError`` for an error response (already read): the server's code and message when the
    body is ``{"error": {"code", "message"}}``, else ``http_<status>`` and the start of the body."""
    request = response.request
    status = response.status_code
    code, message, details = f"http_{status}", _snippet(response) or response.reason_phrase, {}
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str):
        code, message = err["code"], err["message"]
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
    elif isinstance(body, dict) and "detail" in body:  # a plain FastAPI/Starlette error
        message = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
    return ApiError(status, code, message, method=request.method, url=str(request.url),
                    details=details, retry_after=retry_after(response))


def parse_json(response: httpx.Response) -> Any:
    """The JSON body of a successful response; ``ApiError(code='invalid_response')`` if it is not JSON."""
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError) as exc:
        ctype = response.headers.get("content-type", "(none)")
        raise ApiError(response.status_code, "invalid_response",
                       f"expected a JSON body, got Content-Type {ctype!r}: {_snippet(response)!r}",
                       method=response.request.method, url=str(response.request.url)) from exc


def expect_object(data: Any, what: str, response: httpx.Response, *keys: str) -> dict[str, Any]:
    """``data`` as a dict holding ``keys``; ``ApiError(code='invalid_response')`` otherwise."""
    if isinstance(data, dict) and all(k in data for k in keys):
        return data
    raise ApiError(response.status_code, "invalid_response",
                   f"expected {what} with keys {list(keys)}, got {_snippet(response)!r}",
                   method=response.request.method, url=str(response.request.url))


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _snippet(response: httpx.Response, limit: int = 200) -> str:
    try:
        text = response.text
    except (httpx.ResponseNotRead, UnicodeDecodeError):
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- request bodies


def form_fields(options: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None,
                callback_url: str | None = None) -> dict[str, str]:
    """The multipart text fields: ``options`` and ``metadata`` as JSON objects, ``callback_url`` as is."""
    fields = {}
    for name, value in (("options", options), ("metadata", metadata)):
        if value is not None:
            fields[name] = json.dumps(as_object(name, value))
    if callback_url is not None:
        fields["callback_url"] = check_callback_url(callback_url)
    return fields


def path_body(slide_path: str, options: Mapping[str, Any] | None,
               metadata: Mapping[str, Any] | None, callback_url: str | None = None) -> dict[str, Any]:
    if not isinstance(slide_path, str) or not slide_path:
        raise ValueError(f"slide_path must be a non-empty string, got {slide_path!r}")
    body: dict[str, Any] = {"slide_path": slide_path}
    if options is not None:
        body["options"] = as_object("options", options)
    if metadata is not None:
        body["metadata"] = as_object("metadata", metadata)
    if callback_url is not None:
        body["callback_url"] = check_callback_url(callback_url)
    return body


def check_callback_url(url: Any) -> str:
    """A non-blank string (the server checks the rest: scheme, host, allowed targets, its length)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"callback_url must be a non-empty http(s) URL string, got {url!r}")
    return url


def as_object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (a JSON object), got {value!r}")
    return dict(value)


def idempotency_headers(key: str | None) -> dict[str, str]:
    if key is None:
        return {}
    if not isinstance(key, str) or not 1 <= len(key) <= 255 or not key.isprintable():
        raise ValueError(f"idempotency_key must be 1 to 255 printable characters, got {key!r}")
    return {"Idempotency-Key": key}


def list_params(status: str | None, page_size: int) -> dict[str, Any]:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 100:
        raise ValueError(f"page_size must be an int from 1 to 100, got {page_size!r}")
    return {"limit": page_size, **({"status": status} if status is not None else {})}
