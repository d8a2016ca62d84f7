"""nucseg_client against ``httpx.MockTransport``: CLI.

Sleeps and clocks are injected, so no test here waits for real.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nucseg_client import Client, Retries

from tests.helpers.client_mock import HOOK, JOB_ID, URL, Recorder, err, job_body, multipart_fields


@pytest.fixture
def cli_server(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Recorder]:
    """Point the CLI's Client at a MockTransport handler (and never sleep)."""
    from nucseg_client import cli

    def install(handler: Any) -> Recorder:
        rec = handler if isinstance(handler, Recorder) else Recorder(handler)

        def make(url: str, **kwargs: Any) -> Client:
            return Client(url, transport=httpx.MockTransport(rec), sleep=lambda s: None,
                          retries=Retries(total=2), **kwargs)

        monkeypatch.setattr(cli, "Client", make)
        return rec

    return install


def run_cli(*argv: str) -> int:
    from nucseg_client.cli import main

    return main(list(argv))


def test_cli_status_table_and_json(cli_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cli_server(httpx.Response(200, json=job_body("running", done=3, total=8)))
    assert run_cli("status", JOB_ID) == 0
    out = capsys.readouterr().out
    assert f"id        {JOB_ID}" in out and "running 3/8" in out
    assert run_cli("status", JOB_ID, "--json") == 0
    assert json.loads(capsys.readouterr().out)["progress"] == {"stage": "running", "done": 3, "total": 8}


def test_cli_exit_codes(cli_server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cli_server(err(404, "job_not_found", f"no job with id {JOB_ID!r}"))
    assert run_cli("status", JOB_ID) == 2
    assert f"job_not_found: no job with id '{JOB_ID}'" in capsys.readouterr().err

    cli_server(err(503, "store_unavailable", "the job store (Redis) is unavailable"))
    assert run_cli("list", "--json") == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["code"] == "store_unavailable" and "Redis" in captured.err

    cli_server(httpx.ConnectError("[Errno 111] Connection refused"))
    assert run_cli("cancel", JOB_ID) == 3
    assert "cannot connect to http://127.0.0.1:8000" in capsys.readouterr().err

    slide = tmp_path / "s.png"
    slide.write_bytes(b"png")
    failed = job_body("failed", error={"code": "slide_too_large", "message": "100000x100000 px is over the cap"})
    cli_server(Recorder(httpx.Response(202, json=job_body()), httpx.Response(200, json=failed)))
    assert run_cli("submit", str(slide), "--wait", "-q") == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == JOB_ID and "slide_too_large: 100000x100000" in captured.err

    assert run_cli("submit", str(slide), "--options", "{tile") == 2
    assert "--options is not valid JSON" in capsys.readouterr().err
    assert run_cli("submit", str(tmp_path / "nope.svs")) == 2
    assert "nope.svs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run_cli("status")
    assert info.value.code == 2


def test_cli_submit_builds_options_from_flags(cli_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rec = cli_server(httpx.Response(202, json=job_body()))
    assert run_cli("submit", "cases/a.svs", "--path", "--options", '{"tile_size": 128, "overlap": 8}',
                   "--tile", "64", "--no-tissue", "--tta", "--stain", "macenko", "--outputs", "masks, nuclei",
                   "--metadata", '{"case": "A"}',
                   "--idempotency-key", "A-1", "--json") == 0
    body = json.loads(rec.requests[0].content)
    assert body == {"slide_path": "cases/a.svs", "metadata": {"case": "A"},
                    "options": {"tile_size": 64, "overlap": 8, "tissue": False, "tta": True,
                                "stain": "macenko", "outputs": ["masks", "nuclei"]}}
    assert rec.requests[0].headers["Idempotency-Key"] == "A-1"
    assert json.loads(capsys.readouterr().out)["id"] == JOB_ID


def test_cli_submit_callback_url(cli_server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    waiting = {**job_body(), "webhook": {"url": HOOK, "status": "waiting", "attempt_count": 0, "attempts": [],
                                         "next_attempt_at": None}}
    rec = cli_server(httpx.Response(202, json=waiting))
    assert run_cli("submit", "cases/a.svs", "--path", "--callback-url", HOOK) == 0
    assert json.loads(rec.requests[0].content) == {"slide_path": "cases/a.svs", "callback_url": HOOK}
    assert f"webhook   waiting -> {HOOK}" in capsys.readouterr().out
    slide = tmp_path / "s.png"
    slide.write_bytes(b"png")
    rec = cli_server(httpx.Response(202, json=waiting))
    assert run_cli("submit", str(slide), "--callback-url", HOOK, "-q") == 0
    assert multipart_fields(rec.requests[0])["callback_url"] == (None, HOOK.encode())
    assert capsys.readouterr().out.strip() == JOB_ID


def test_add_client_commands_hooks_into_another_parser() -> None:
    import argparse

    from nucseg_client.cli import add_client_commands

    parser = argparse.ArgumentParser(prog="nucseg")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("predict")
    add_client_commands(sub)
    args = parser.parse_args(["download", JOB_ID, "--out", "x", "--url", URL])
    assert args.command == "download" and callable(args.func) and args.url == URL
