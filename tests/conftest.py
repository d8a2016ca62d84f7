"""Shared fixtures. The live service stack starts only when a test asks for ``stack``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli.processes import stop_group
from cli.redis_server import start_redis
from tests.helpers.s3_server import S3Server
from tests.helpers.service_stack import KEYS, Stack, free_port

COMPOSE_TESTS = Path(__file__).parent / "compose"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--compose", action="store_true",
                     help="run tests/compose against the docker compose stack (needs Docker; make compose-test)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/compose runs only with ``--compose``; ``make test`` needs no Docker."""
    if collection_path.is_relative_to(COMPOSE_TESTS) and not config.getoption("--compose"):
        return True
    return None


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis + one Celery worker + uvicorn, for the whole session; torn down at the end.

    Auth is on: ``stack.client`` and the client SDK (through ``NUCSEG_API_KEY``) act as tenant
    ``lab-a``; ``stack.client_for("lab-b")`` is another tenant.
    """
    with Stack.running(tmp_path_factory.mktemp("service")) as running, pytest.MonkeyPatch.context() as env:
        env.setenv("NUCSEG_API_KEY", KEYS["lab-a"])
        yield running


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A bare redis-server of the module's own (no worker, no API)."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    client = redis.Redis(port=port, decode_responses=True)
    try:
        yield client
    finally:
        client.close()
        stop_group(proc)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server (``weed mini``) on free ports, for the whole session."""
    with S3Server.running(tmp_path_factory.mktemp("s3")) as server:
        yield server
