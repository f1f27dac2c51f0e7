"""Counters, hooks and the Prometheus export, against real Redis and the fake K2 server."""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis
from prometheus_client import CollectorRegistry, generate_latest

from k2_shared_token import SharedTokenProvider
from k2_shared_token._core.metrics import Event
from k2_shared_token.contrib.prometheus import register
from k2_shared_token.testing.fake_k2 import FakeK2Server
from tests.conftest import CLIENT_SECRET

Make = Callable[..., SharedTokenProvider]


def test_counters_follow_what_happened(make_provider: Make, fake_k2: FakeK2Server) -> None:
    events: list[Event] = []
    first = make_provider(hooks=[events.append])
    second = make_provider(hooks=[events.append])
    token = first.get_token()
    for _ in range(5):
        assert first.get_token() == token
    assert second.get_token() == token
    stats = first.stats()
    assert stats["miss"] == 1
    assert stats["exchange_ok"] == 1
    assert stats["local_hit"] == 5
    assert stats["exchange_ok_seconds"] > 0
    assert second.stats()["shared_hit"] == 1
    assert second.stats()["exchange_ok"] == 0
    names = [e.name for e in events]
    assert names == ["miss", "exchange_ok", "shared_hit"]
    assert {e.namespace for e in events} == {first.namespace}
    assert CLIENT_SECRET not in repr(events)


def test_a_failing_hook_never_breaks_token_delivery(make_provider: Make) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("dashboard down")

    assert make_provider(hooks=[broken]).get_token()


def test_waits_and_lock_takeovers_are_counted(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = make_provider(lock_lease=1, wait_timeout=5)
    # A holder that died: its lock stays until the lease ends, then this worker takes over.
    redis_client.set(provider.keys.lock, b"dead-host:1:0:x", px=300)
    assert fake_k2.is_valid(provider.get_token())
    stats = provider.stats()
    assert stats["wait"] >= 1
    assert stats["lock_takeover"] == 1
    assert stats["wait_seconds"] > 0


def test_prometheus_export(make_provider: Make) -> None:
    provider = make_provider()
    provider.get_token()
    provider.get_token()
    registry = CollectorRegistry()
    register(provider, registry=registry)
    text = generate_latest(registry).decode()
    ns = provider.namespace
    assert f'k2_token_events_total{{event="local_hit",namespace="{ns}"}} 1.0' in text
    assert f'k2_token_events_total{{event="exchange_ok",namespace="{ns}"}} 1.0' in text
    assert "k2_token_event_seconds_total" in text
    assert CLIENT_SECRET not in text


def test_counters_survive_concurrent_updates(make_provider: Make) -> None:
    provider = make_provider(local_cache=False)
    provider.get_token()
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(50):
            provider.get_token()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert provider.stats()["shared_hit"] == 400
