"""The compose stack over HTTP, as a LIMS would use it: images, a real slide end to end, auth, the page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from tests.compose.conftest import SLIDE, SlideJob
from tests.helpers.compose_stack import ComposeStack
from tests.helpers.service_stack import KEYS, wait_until
from tests.service.test_web_browser import ARGS, CHROMIUM, DRAWN

# Files that describe the run as well as its result: compared without the run's part below.
RUN_DEPENDENT = {"stats.json", "nuclei.geojson"}
FIND_TORCH = "import importlib.util as u; print(u.find_spec('torch') is not None)"


def test_api_container_is_healthy_non_root_and_has_no_torch(compose: ComposeStack) -> None:
    wait_until(lambda: compose.health("api") == "healthy", 120, "api health check healthy", interval_s=2)
    assert compose.exec("api", "id", "-u") == "10001"
    assert compose.exec("api", "python", "-c", FIND_TORCH) == "False"
    assert compose.exec("worker", "python", "-c", FIND_TORCH) == "True"  # the same probe does see torch


def test_results_match_a_local_prediction(cmu_job: SlideJob, local_prediction: Path) -> None:
    """Every file ``nucseg predict`` writes comes back from the job: masks, TIFFs, overlays and the
    thumbnail byte for byte; nuclei and stats equal but for what differs by run."""
    local = {p.name for p in local_prediction.iterdir()}
    remote = {p.name for p in cmu_job.results.iterdir()}
    assert local <= remote and {"semantic.png", "ternary.png", "semantic.tiff", "ternary.tiff"} <= local, remote
    for name in sorted(local - RUN_DEPENDENT):
        same = (local_prediction / name).read_bytes() == (cmu_job.results / name).read_bytes()
        assert same, f"{name} differs between the container's job and the local prediction"
    for name, content in (("nuclei.geojson", _nuclei), ("stats.json", _stats)):
        ours, theirs = content(local_prediction / name), content(cmu_job.results / name)
        assert ours == theirs, f"{name} differs between the container's job and the local prediction"


def _nuclei(path: Path) -> list[dict[str, Any]]:
    """The features without their ids (a random prefix per run, so two runs never share ids)."""
    features = json.loads(path.read_text())["features"]
    assert len({f["id"] for f in features}) == len(features) > 0
    return [{k: v for k, v in f.items() if k != "id"} for f in features]


def _stats(path: Path) -> dict[str, Any]:
    """stats.json without timings, start time, library versions, the slide's stored file name and how
    many processes post-processed the nuclei (a pool locally, none in a Celery prefork pool process)."""
    stats = json.loads(path.read_text())
    for key in ("timings_s", "started_at", "versions"):
        stats.pop(key)
    for key in ("timings", "workers"):
        stats["nuclei"].pop(key)
    stats["slide"].pop("name")
    return dict(stats)


def test_auth_no_key_401_other_tenant_404(compose: ComposeStack, cmu_job: SlideJob) -> None:
    with compose.client_for(None) as anonymous, compose.client_for("lab-b") as other:
        assert anonymous.get(f"/v1/jobs/{cmu_job.id}").status_code == 401
        assert anonymous.get("/v1/jobs").status_code == 401
        refused = other.get(f"/v1/jobs/{cmu_job.id}")
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "job_not_found"
        assert other.get(f"/v1/jobs/{cmu_job.id}/results/semantic.png").status_code == 404
    with compose.client_for("lab-a") as owner:
        assert owner.get(f"/v1/jobs/{cmu_job.id}").json()["status"] == "succeeded"


@pytest.mark.timeout(300)
def test_web_page_shows_the_job_in_chromium(compose: ComposeStack, cmu_job: SlideJob) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(60_000)
            page.goto(compose.base_url + "/")
            page.fill("#api-key", KEYS["lab-a"])  # the job list got a 401: the page asks for a key once
            page.click("#key-form button[type=submit]")
            row = page.locator("#job-rows tr", has=page.get_by_role("link", name=SLIDE, exact=True)).first
            assert row.locator(".status").inner_text() == "succeeded"
            row.locator("a").click()
            page.wait_for_selector("#viewer-panel:not([hidden])")
            page.wait_for_function(f"({DRAWN})() > 1000")
        finally:
            browser.close()
