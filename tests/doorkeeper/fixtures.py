"""Pytest fixtures for the real Doorkeeper: ``tests/test_doorkeeper.py`` loads this module with
``pytest_plugins``, so nothing here runs (not even the Ruby probe) unless a test asks for it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.doorkeeper.server import DoorkeeperServer, available


@pytest.fixture
def doorkeeper() -> Iterator[Callable[..., DoorkeeperServer]]:
    """A factory: ``doorkeeper(expires_in=6, reuse=True, ...)`` starts a server with those
    options (``DoorkeeperServer``'s keywords) and returns it, running; every server it started
    is stopped, by PID, at teardown. Without Ruby the test skips, saying what to install, or
    fails if ``K2_REQUIRE_DOORKEEPER=1`` (``make test-doorkeeper``: a skip there would hide that
    nothing ran)."""
    why = available()
    if why is not None:
        if os.environ.get("K2_REQUIRE_DOORKEEPER") == "1":
            pytest.fail(f"Doorkeeper tests need Ruby: {why}")
        pytest.skip(f"Doorkeeper tests need Ruby: {why}")
    started: list[DoorkeeperServer] = []

    def start(**options: Any) -> DoorkeeperServer:
        server = DoorkeeperServer(**options)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
