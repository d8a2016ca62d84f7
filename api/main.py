"""The FastAPI app factory: ``uvicorn --factory api.main:create_app`` (or ``nucseg serve``).

This package never imports torch: it validates slides with ``model.readers`` (OpenSlide, Pillow)
and sends work to the workers by task name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import Resources
from api.errors import error_body, install_error_handlers
from api.routes import health, jobs, metrics, models, results, tiles, web
from api.schemas import JobCreate
from core.settings import Settings, get_settings


def _version() -> str:
    try:
        return version("nucseg")
    except PackageNotFoundError:
        return "0.0.0"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.resources.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; ``settings`` overrides ``get_settings()`` (otherwise read from NUCSEG_* env).

    Refuses (``ConfigError``) auth disabled off loopback, and auth enabled without any key.
    """
    effective = settings or get_settings()
    effective.check_api_bind(effective.host)
    app = FastAPI(title="nucseg", version=_version(), lifespan=_lifespan,
                  description="Nucleus segmentation of H&E whole-slide images: submit a slide, poll the job, "
                              "download masks, overlays and statistics.")
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    app.state.resources = Resources()
    install_error_handlers(app)
    for module in (health, jobs, results, tiles, models, metrics, web):
        app.include_router(module.router)
    web.mount_static(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    if effective.cors_origins:
        app.add_middleware(JsonCORSMiddleware, allow_origins=effective.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "HEAD", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Range"],
                           expose_headers=["Location", "Retry-After", "Content-Range", "ETag"], max_age=600)
    app.add_middleware(NoSniff)
    return app


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in our JSON error format."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        what = bytes(response.body).decode(errors="replace").removeprefix("Disallowed CORS ")
        origin = request_headers.get("origin")
        keep = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        return JSONResponse(error_body("cors_refused", f"CORS preflight from origin {origin!r} refused: "
                                       f"{what} not allowed"), status_code=400, headers=keep)


class NoSniff:
    """``X-Content-Type-Options: nosniff`` on every response: browsers must not guess content types."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_header)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus ``JobCreate``, which ``POST /v1/jobs`` reads by hand (it streams)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        extra = JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(extra.pop("$defs", {}))
        components["JobCreate"] = extra
        app.openapi_schema = schema
    return app.openapi_schema
