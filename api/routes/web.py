"""The web page: ``/`` serves ``api/static/index.html``; ``/static`` the scripts, styles and vendor files."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["web"])


@router.get("/", response_class=FileResponse, include_in_schema=False)
def index() -> FileResponse:
    """The single-page app (job list, upload, job viewer)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    """Serve ``api/static`` under ``/static``."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
