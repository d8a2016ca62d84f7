"""Hostile input over real HTTP: size caps, client file names, untrusted Content-Type, pixel bombs.

(More cases, each with its exact status and code, are in ``test_service_errors.py``: the upload cap,
a declared Content-Length over it, the metadata cap, ``..`` and symlink escapes of ``slide_path``.)
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.service_stack import FAST, Stack, png_bytes, wait_http

pytestmark = pytest.mark.service

CAP = 64 * 1024  # the default JSON-body and form-field caps


def _error(resp: httpx.Response) -> tuple[int, str, str]:
    body = resp.json()["error"]
    return resp.status_code, body["code"], body["message"]


def test_json_body_over_its_cap_is_413_declared_or_streamed(stack: Stack) -> None:
    body = json.dumps({"slide_path": "cases/tile.png", "metadata": {"x": "y" * CAP}}).encode()
    status, code, message = _error(stack.client.post("/v1/jobs", content=body,
                                                     headers={"content-type": "application/json"}))
    assert (status, code) == (413, "body_too_large") and str(CAP) in message

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while streaming
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    status, code, _ = _error(stack.client.post("/v1/jobs", content=chunks(),
                                               headers={"content-type": "application/json"}))
    assert (status, code) == (413, "body_too_large")


def test_form_field_over_its_cap_is_413_and_names_the_field(stack: Stack) -> None:
    resp = stack.client.post("/v1/jobs", files={"file": ("a.png", png_bytes(64, 64))},
                             data={"options": " " * (CAP + 1)})
    status, code, message = _error(resp)
    assert (status, code) == (413, "field_too_large") and "'options'" in message


@pytest.mark.parametrize("filename", ["../../../../tmp/evil.png", "..\\..\\windows\\evil.png", "/etc/passwd",
                                      "a\x00b\r\n.png", "...", "x" * 400 + ".png"])
def test_client_file_names_are_display_names_never_paths(stack: Stack, filename: str) -> None:
    resp = stack.client.post("/v1/jobs", files={"file": (filename, png_bytes(64, 64, seed=4), "image/png")},
                             data={"options": json.dumps(FAST)})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    stored = list((stack.data_dir / "uploads" / job["id"]).iterdir())
    assert [p.name for p in stored] in (["slide.png"], ["slide.bin"])  # our name, in the job's folder
    shown = job["slide"]["name"]
    assert "/" not in shown and "\\" not in shown and "\x00" not in shown and len(shown) <= 200
    assert not Path("/tmp/evil.png").exists() and not (stack.data_dir / "evil.png").exists()
    assert stack.wait(job["id"])["status"] == "succeeded"


def test_content_type_is_never_trusted_the_bytes_are_sniffed(stack: Stack) -> None:
    # a PNG that claims to be an Aperio slide: read as the PNG it is
    resp = stack.client.post("/v1/jobs", files={"file": ("scan.svs", png_bytes(64, 64, seed=2), "image/x-aperio-svs")},
                             data={"options": json.dumps(FAST)})
    assert resp.status_code == 202, resp.text
    assert resp.json()["slide"]["format"] == "pillow"  # not OpenSlide, whatever the name and type said
    assert stack.wait(resp.json()["id"])["status"] == "succeeded"
    # random bytes that claim to be a PNG: refused for what they are
    status, code, message = _error(stack.client.post(
        "/v1/jobs", files={"file": ("x.png", b"\x00not an image" * 100, "image/png")}))
    assert (status, code) == (415, "unsupported_slide") and "'x.png'" in message
    # a multipart body labelled as JSON is parsed as JSON, and refused as such
    multipart = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nxx\r\n--b--\r\n'
    status, code, _ = _error(stack.client.post("/v1/jobs", content=multipart,
                                               headers={"content-type": "application/json"}))
    assert (status, code) == (400, "invalid_json")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries one tiny IDAT: a decompression bomb's head."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_pillow_bomb_guard_refuses_an_image_by_its_declared_size(stack: Stack) -> None:
    bomb = _png_header_only(50_000, 50_000)  # 2.5 gigapixels in 100 bytes
    uploads = stack.data_dir / "uploads"
    before = set(uploads.iterdir())
    status, code, message = _error(stack.client.post("/v1/jobs", files={"file": ("bomb.png", bomb)}))
    assert (status, code) == (422, "slide_too_large") and "'bomb.png'" in message
    assert set(uploads.iterdir()) == before  # refused before anything was kept


def test_slide_dimensions_are_checked_against_max_slide_pixels(stack: Stack) -> None:
    proc, port = stack.spawn_api({"NUCSEG_MAX_SLIDE_PIXELS": "1000000"})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        with stack.client_for("lab-a", f"http://127.0.0.1:{port}") as api:
            status, code, message = _error(api.post("/v1/jobs", json={"slide_path": "cmu_small_region.svs"}))
    finally:
        proc.terminate()
        proc.wait(15)
    assert (status, code) == (422, "slide_too_large")
    assert "2220x2967" in message and "1000000" in message
