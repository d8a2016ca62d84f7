"""One exception -> HTTP mapping: every error leaves the API as ``{"error": {"code", "message"}}``.

The status codes, and the error codes each one carries, are listed once: in the table "Status codes
and error codes" of ``docs/SERVICE.md``. Keep it current when a code is added here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.storage.errors import StorageUnavailable
from model.errors import (
    CheckpointError,
    NucsegError,
    OptionsError,
    SlideTooLargeError,
    UnreadableSlideError,
    UnsupportedSlideError,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status, stable code and message (and optional headers)."""

    def __init__(self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


# model errors raised while validating a slide in the API
_MODEL_ERRORS: dict[type[NucsegError], int] = {
    UnsupportedSlideError: 415,
    UnreadableSlideError: 422,
    SlideTooLargeError: 422,
    OptionsError: 422,
    CheckpointError: 503,
}
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "body_too_large",
               415: "unsupported_content_type", 416: "range_not_satisfiable", 422: "validation_error",
               429: "too_many_requests", 503: "unavailable"}
# path parameters whose validation failure gets its own code
_PARAM_CODES: dict[tuple[str, ...], str] = {("path", "job_id"): "invalid_job_id"}


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def to_api_error(exc: Exception) -> ApiError:
    """The one mapping from any exception to status, code and message."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, ValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers)
    if isinstance(exc, NucsegError):
        status = next((s for cls, s in _MODEL_ERRORS.items() if isinstance(exc, cls)), 500)
        return ApiError(status, exc.code, str(exc))
    if isinstance(exc, redis.RedisError):
        return ApiError(503, "store_unavailable", f"the job store (Redis) is unavailable: {exc}",
                        headers={"Retry-After": "5"})
    if isinstance(exc, StorageUnavailable):
        return ApiError(503, exc.code, f"the object store is unavailable: {exc}", headers={"Retry-After": "5"})
    if isinstance(exc, OperationalError):
        return ApiError(503, "broker_unavailable", f"the task broker is unavailable: {exc}",
                        headers={"Retry-After": "5"})
    return ApiError(500, "internal_error", "internal server error; see the server log")


def validation_error(errors: Sequence[Any]) -> ApiError:
    parts, code = [], "validation_error"
    for err in errors:
        loc = tuple(str(p) for p in err.get("loc", ()))
        code = _PARAM_CODES.get(loc[:2], code)
        where = ".".join(p for p in loc if p not in ("body",)) or "request"
        value = err.get("input")
        got = f" (got {_short(value)})" if "input" in err and not isinstance(value, dict) else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return ApiError(422, code, "; ".join(parts) or "invalid request")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    err = to_api_error(exc)
    if isinstance(exc, StarletteHTTPException) and err.code in ("not_found", "method_not_allowed"):
        err.message = f"{err.message}: {request.method} {request.url.path}"
    if err.status >= 500:
        log.error("%s %s -> %s %s: %s", request.method, request.url.path, err.status, err.code, exc,
                  exc_info=err.code == "internal_error")
    return JSONResponse(error_body(err.code, err.message, **err.extra), status_code=err.status,
                        headers=err.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type through ``to_api_error``."""
    for cls in (ApiError, RequestValidationError, ValidationError, StarletteHTTPException, NucsegError,
                redis.RedisError, StorageUnavailable, OperationalError, Exception):
        app.add_exception_handler(cls, _handle)
