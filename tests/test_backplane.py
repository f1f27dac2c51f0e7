"""The fleet backplane: a token written or dropped anywhere replaces or drops every process's
copy within milliseconds, on both providers; it reconnects by itself after Redis restarts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from k2_shared_token import SharedTokenProvider
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import command_calls, wait_until

Make = Callable[..., SharedTokenProvider]


def _until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition`` held (polled: the backplane offers nothing to wait on)."""
    start = time.monotonic()
    wait_until(condition, timeout, "the backplane to deliver", interval=0.001)
    return time.monotonic() - start


def test_an_invalidation_anywhere_drops_every_copy_at_once(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    workers = [make_provider() for _ in range(3)]
    token = workers[0].get_token()
    assert all(w.get_token() == token for w in workers)
    wait_until(lambda: all(w.stats()["backplane"] == 1 for w in workers), 5, "subscriptions")
    assert workers[0].invalidate(token)  # one worker saw the 401
    took = _until(lambda: all(w._local.held is None for w in workers[1:]), 2)
    print(f"\n[backplane] every other copy dropped {took * 1e3:.1f} ms after the invalidation")
    assert all(w.get_token() != token for w in workers)
    assert fake_k2.exchanges == 2


def test_a_new_token_replaces_every_copy_without_a_recheck(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    fake_k2.expires_in = 600
    workers = [make_provider(refresh_ahead=120, min_validity=10) for _ in range(3)]
    old = workers[0].get_token()
    assert all(w.get_token() == old for w in workers)
    wait_until(lambda: all(w.stats()["backplane"] == 1 for w in workers), 5, "subscriptions")
    redis_client.pexpire(workers[0].keys.token, 100_000)  # into the refresh window
    workers[0]._local.held = None  # only this worker notices (re-read, stale, kicks a refresh)
    assert workers[0].get_token() == old
    assert workers[0].wait_for_refresh(5)

    def moved() -> bool:
        return all(w._local.held is not None and w._local.held.token.value != old for w in workers)

    took = _until(moved, 2)
    print(f"\n[backplane] every copy moved to the new token {took * 1e3:.1f} ms after it")
    assert fake_k2.exchanges == 2


def test_the_backplane_reconnects_after_redis_restarts(
    make_provider: Make, fake_k2: FakeK2Server, redis_server: EmbeddedRedis
) -> None:
    watcher, other = make_provider(redis_cooldown=0.2), make_provider(redis_cooldown=0.2)
    token = watcher.get_token()
    other.get_token()
    wait_until(lambda: watcher.stats()["backplane"] == 1, 5, "the subscription")
    redis_server.stop()
    wait_until(lambda: watcher.stats()["backplane"] == 0, 5, "the loss to be noticed")
    redis_server.start()
    wait_until(lambda: watcher.stats()["backplane"] == 1, 10, "the reconnection")
    wait_until(lambda: other.stats()["backplane"] == 1, 10, "the other reconnection")
    other._local.held = None  # Redis restarted empty: this worker exchanges, and announces it
    new = other.get_token()
    assert new != token
    _until(lambda: watcher._local.held is not None and watcher._local.held.token.value == new, 3)


def test_a_cold_waiter_hands_its_subscription_to_the_backplane(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    """A cold process that waits for another's exchange listens on to the fleet through the
    subscription its wait opened: one connection and one SUBSCRIBE fewer per process in a
    stampede, and no gap in which an announcement could be missed."""
    fake_k2.latency = 0.5
    holder, waiter = make_provider(), make_provider()
    got: list[str] = []
    exchanging = threading.Thread(target=lambda: got.append(holder.get_token()))
    exchanging.start()
    wait_until(lambda: holder.stats()["backplane"] == 1, 5, "the holder's subscription")
    subscribes = command_calls(redis_client, "subscribe")
    token = waiter.get_token()
    exchanging.join(5)
    assert got == [token]
    wait_until(lambda: waiter.stats()["backplane"] == 1, 5, "the waiter's backplane")
    # The wait's: the backplane listens on it instead of subscribing again.
    assert command_calls(redis_client, "subscribe") - subscribes == 1
    assert fake_k2.exchanges == 1
    assert holder.invalidate(token)  # and the waiter's backplane hears the fleet on it
    _until(lambda: waiter._local.held is None, 2)
