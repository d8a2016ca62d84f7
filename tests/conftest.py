"""Shared fixtures. The live service stack starts only when a test asks for ``stack``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service_stack import Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis + one Celery worker + uvicorn, for the whole session; torn down at the end."""
    running = Stack.start(tmp_path_factory.mktemp("service"))
    try:
        yield running
    finally:
        running.stop()
