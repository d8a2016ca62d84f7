"""The web page end to end in headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright).

Upload a crop of a real slide through the page, watch the job run, open it, check that the viewer
loads slide and overlay tiles and draws them, move the opacity slider, download ``stats.json``; then
a job that fails in the worker shows its error panel. Screenshots go to ``artifacts/web/``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from tests.helpers.samples import sample
from tests.helpers.service_stack import FAST, KEYS, REPO, Stack, png_bytes

pytestmark = [pytest.mark.service, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "artifacts" / "web"
OPTIONS = {"tile_size": 64, "overlap": 0, "block_size": 64, "batch_size": 16,
           "outputs": ["masks", "overlays", "nuclei"]}
LONG = {"tile_size": 64, "overlap": 16, "block_size": 64, "batch_size": 4, "outputs": ["masks"]}
TIMEOUT_MS = 60_000

# Records the named job's list row (status, progress) each time Playwright polls; true once it succeeded.
WATCH_ROW = """(name) => {
  const row = [...document.querySelectorAll('#job-rows tr')].find((r) => r.querySelector('a').textContent === name);
  if (!row) return false;
  const status = row.querySelector('.status').textContent;
  (window.__seen ||= []).push([status, row.querySelector('progress').value]);
  return status === 'succeeded';
}"""
# Number of visibly drawn pixels on the viewer's 2D canvas.
DRAWN = """() => {
  const canvas = document.querySelector('#viewer .openseadragon-canvas canvas');
  if (!canvas || !canvas.width) return 0;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let drawn = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i + 3] > 0 && data[i] + data[i + 1] + data[i + 2] > 30) drawn++;
  return drawn;
}"""
CANVAS_SUM = """() => {
  const canvas = document.querySelector('#viewer .openseadragon-canvas canvas');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0;
  for (let i = 0; i < data.length; i += 4) sum += data[i] * 3 + data[i + 1] * 5 + data[i + 2] * 7;
  return sum;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs it")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def slide_crop(path: Path, size: int = 256) -> Path:
    """A ``size`` px square PNG cut from the middle of the CMU sample slide."""
    import openslide

    with openslide.OpenSlide(sample("cmu_small_region.svs")) as slide:
        w, h = slide.dimensions
        region = slide.read_region(((w - size) // 2, (h - size) // 2), 0, (size, size)).convert("RGB")
    region.save(path)
    return path


def test_upload_watch_view_and_download(stack: Stack, page: Any, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tiles: list[tuple[str, int]] = []
    page.on("response", lambda r: tiles.append((r.url, r.status)) if "_files/" in r.url else None)
    page.goto(stack.base_url + "/")
    page.fill("#api-key", KEYS["lab-a"])  # the job list got a 401: the page asks for a key once
    page.click("#key-form button[type=submit]")
    name = f"cmu-crop-{uuid.uuid4().hex[:8]}.png"
    page.set_input_files("#file", str(slide_crop(tmp_path / name)))
    page.locator("details summary").click()
    page.fill("#options", json.dumps(OPTIONS))
    page.click("#submit")
    page.wait_for_function("() => document.querySelector('#upload-progress').value === 100")
    page.wait_for_function(WATCH_ROW, arg=name, polling=50, timeout=120_000)
    seen = page.evaluate("window.__seen")
    values = [v for _, v in seen]
    assert any(s in ("queued", "running") and v < 100 for s, v in seen), seen  # the bar moved ...
    assert values == sorted(values) and values[-1] == 100, seen  # ... forward, to the end
    row = page.locator("#job-rows tr", has=page.get_by_role("link", name=name, exact=True))
    assert row.locator("button").inner_text() == "Delete"
    page.screenshot(path=str(ARTIFACTS / "list.png"))

    row.locator("a").click()
    page.wait_for_selector("#viewer-panel:not([hidden])")
    page.wait_for_function(f"({DRAWN})() > 1000")
    _wait_for_tiles(page, tiles)
    assert all(status in (200, 304) for _, status in tiles), tiles
    assert page.locator("#legend li").count() >= 5
    assert page.locator("#stats table").count() == 3
    areas, _, nuclei = page.locator("#stats table").all()  # each type beside its recipe's held-out figures
    assert areas.locator("thead th").last.inner_text() == "Held-out IoU"
    assert areas.locator("tr", has=page.locator("th", has_text="macrophage")).locator("td").last.inner_text() == "0.13"
    assert areas.locator("tr", has=page.locator("th", has_text="lymphocyte")).locator("td").last.inner_text() == "–"
    assert nuclei.locator("tr", has=page.locator("th", has_text="macrophage")).locator("td").last.inner_text() \
        == "0.17 [0–0.3], 38 cells"
    assert "3 patients (15 images)" in page.locator("#stats p.held-out").inner_text()
    _move_opacity(page)
    page.screenshot(path=str(ARTIFACTS / "job.png"))

    with page.expect_download() as download:
        page.click('#files a[download="stats.json"]')
    stats = json.loads(Path(download.value.path()).read_text())
    assert stats["analysis"]["width"] == 256 and "semantic" in stats

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.screenshot(path=str(ARTIFACTS / "job-phone.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1


def _wait_for_tiles(page: Any, tiles: list[tuple[str, int]]) -> None:
    """Until both slide and semantic overlay tiles have come back (Playwright's event loop runs meanwhile)."""
    for _ in range(TIMEOUT_MS // 100):
        kinds = {url.split("/dzi/")[1].split("_files")[0] for url, status in tiles if status == 200}
        if {"slide", "semantic"} <= kinds:
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"tiles not loaded: {tiles}")


def _move_opacity(page: Any) -> None:
    """Opacity 0 hides the overlay, 100 shows it fully; the keyboard moves the slider too."""
    page.fill("#opacity", "0")
    assert page.locator("#opacity-value").inner_text() == "0%"
    page.wait_for_function(f"({DRAWN})() > 1000")
    bare = page.evaluate(CANVAS_SUM)
    page.fill("#opacity", "100")
    assert page.locator("#opacity-value").inner_text() == "100%"
    page.wait_for_function(f"({CANVAS_SUM})() !== {bare}")
    page.focus("#opacity")
    page.keyboard.press("ArrowLeft")
    assert page.locator("#opacity").input_value() == "95"


def test_failed_job_shows_its_error_panel(stack: Stack, page: Any) -> None:
    target = stack.slide_root / "cases" / "web-will-break.png"
    target.write_bytes(png_bytes(64, 64, seed=61))
    blocker = stack.submit_upload(png_bytes(128, 128, seed=62), options=LONG).json()
    stack.wait(blocker["id"], until=["running"])
    job = stack.submit_path("cases/web-will-break.png", options=FAST).json()
    target.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # breaks before the busy worker reaches it
    assert stack.wait(job["id"], timeout_s=120)["status"] == "failed"
    page.add_init_script(f"sessionStorage.setItem('nucseg.apiKey', {json.dumps(KEYS['lab-a'])})")  # a saved key
    page.goto(f"{stack.base_url}/#/jobs/{job['id']}")
    page.wait_for_selector("#error-panel:not([hidden])")
    assert page.locator("#error-code").inner_text() == "unreadable_slide"
    assert "web-will-break.png" in page.locator("#error-message").inner_text()
    assert page.locator("#viewer-panel").is_hidden()
    page.screenshot(path=str(ARTIFACTS / "failed.png"))
    stack.wait(blocker["id"])

