"""Redis outages (circuit breaker, local fallback) and lock safety, against a real redis-server.

Redis goes away for real: the server is SIGKILLed, or a loopback proxy black-holes its port (TCP
still connects, nothing answers, only a timeout ends the wait). Whether Redis was touched is read
from counters (the provider's ``redis_error``, the proxy's accepted connections), never from
timings alone: the one timing asserted is the bound the README promises (what a partition costs
the call that meets it), and counters come with it. Cooldowns and cache ages are not waited
out: :class:`ShiftedClock` moves the library's monotonic clock. Lock ownership is read from
Redis itself, through keyspace notifications: a lock whose life ends in ``del`` was given back
by its owner, one that ends in ``expired`` was not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from k2_shared_token import (
    AccessToken,
    SharedCacheError,
    SharedTokenProvider,
    TokenEndpointUnavailableError,
)
from k2_shared_token._core.tokens import IssuedToken
from k2_shared_token._redis.clients import _NO_CLIENT_INFO
from k2_shared_token._redis.codec import decode
from k2_shared_token.testing.fake_k2 import FakeK2Server, Fault
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.both_ways import EventLoopThread
from tests.conftest import CLIENT_SECRET
from tests.faultkit import KeyEvents, ShiftedClock, assert_no_leak, stored_bytes, warnings_with
from tests.netproxy import TcpProxy

Make = Callable[..., SharedTokenProvider]

COOLDOWN = 30.0  # long enough that no test run outlasts it: only ShiftedClock ends it
LOCAL_MAX_AGE = 40.0
PAST_BOTH = max(COOLDOWN, LOCAL_MAX_AGE) + 5
OUTAGE = "Redis unavailable"
RECOVERY = "Redis answers again"


def issued_tokens(fake_k2: FakeK2Server) -> list[str]:
    return [record.token for record in fake_k2.issued]


def count(records: list[logging.LogRecord], fragment: str) -> int:
    return len(warnings_with(records, fragment))


@pytest.fixture
def proxy(redis_server: EmbeddedRedis) -> Iterator[TcpProxy]:
    with TcpProxy(redis_server.port) as p:
        yield p


# -- 1. circuit breaker and local fallback --------------------------------------------------


@pytest.mark.parametrize("local_cache", [True, False])
def test_killed_redis_falls_back_to_local_tokens_and_is_skipped_for_the_cooldown(
    make_provider: Make,
    redis_server: EmbeddedRedis,
    fake_k2: FakeK2Server,
    all_logs: pytest.LogCaptureFixture,
    local_cache: bool,
) -> None:
    """A crash of Redis costs one failed call; then the process lives on its own tokens, keeps
    each one (no exchange per call, even without ``local_cache``), leaves Redis alone for the
    whole cooldown, and logs the outage once."""
    provider = make_provider(
        local_cache=local_cache, redis_cooldown=COOLDOWN, local_max_age=LOCAL_MAX_AGE
    )
    redis_server.kill()

    current = provider.get()
    assert fake_k2.is_valid(current.value)
    assert provider.stats()["redis_error"] == 1
    assert provider.stats()["fallback"] == 1
    seen = [current.value]
    for _ in range(5):
        for _ in range(20):
            assert provider.get() == current  # kept: one exchange per token, not per call
        # Redis down: invalidate() drops the local copy only, and does not raise.
        assert provider.invalidate(current) is False
        current = provider.get()
        assert current.value not in seen
        seen.append(current.value)
    assert fake_k2.exchanges == 6
    assert provider.stats()["fallback"] == 6
    assert provider.stats()["redis_error"] == 1, "Redis was tried again inside the cooldown"
    assert count(all_logs.records, OUTAGE) == 1
    assert count(all_logs.records, RECOVERY) == 0
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=issued_tokens(fake_k2),
        logs=all_logs.records,
        objects=[provider, current],
    )


@pytest.mark.parametrize("local_cache", [True, False])
def test_after_redis_returns_and_the_cooldown_ends_the_token_is_shared_again(
    make_provider: Make,
    redis_server: EmbeddedRedis,
    redis_client: redis.Redis,
    fake_k2: FakeK2Server,
    all_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    local_cache: bool,
) -> None:
    """Recovery is automatic: the next look at Redis after the cooldown finds it, the process
    publishes a token again, and a second worker uses that one instead of exchanging."""
    clock = ShiftedClock(monkeypatch)
    provider = make_provider(
        local_cache=local_cache, redis_cooldown=COOLDOWN, local_max_age=LOCAL_MAX_AGE
    )
    redis_server.kill()
    local = provider.get()
    assert provider.stats()["fallback"] == 1

    redis_server.start()  # same port, empty: a crashed Redis without persistence
    clock.advance(PAST_BOTH)
    assert provider.get() == local  # still served at once; the re-check runs in the background
    assert provider.wait_for_refresh(5)

    shared = provider.get()
    assert shared.value != local.value
    assert decode(stored_bytes(redis_client, provider.keys.token)).value == shared.value
    other = make_provider()
    assert other.get().value == shared.value
    assert fake_k2.exchanges == 2
    assert provider.stats()["redis_error"] == 1
    assert count(all_logs.records, OUTAGE) == 1
    assert count(all_logs.records, RECOVERY) == 1
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=issued_tokens(fake_k2),
        logs=all_logs.records,
        objects=[provider, shared, local],
        client=redis_client,
    )

    redis_server.kill()  # a second outage is a second warning, not a silent one
    assert provider.invalidate(shared) is False
    assert provider.get() != shared
    assert count(all_logs.records, OUTAGE) == 2
    assert count(all_logs.records, RECOVERY) == 1


def test_a_black_holed_redis_is_timed_out_once_then_not_connected_to_until_it_heals(
    make_provider: Make,
    proxy: TcpProxy,
    redis_client: redis.Redis,
    fake_k2: FakeK2Server,
    all_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partition is the expensive outage (each try costs the socket timeout): the breaker must
    keep the process off the partitioned port for the whole cooldown, whatever it is asked."""
    clock = ShiftedClock(monkeypatch)
    provider = make_provider(
        redis=f"redis://127.0.0.1:{proxy.port}/0",
        redis_timeout=0.5,  # the healed probe goes through the proxy's loop: leave it room
        redis_cooldown=COOLDOWN,
        local_max_age=LOCAL_MAX_AGE,
    )
    proxy.blackhole()
    current = provider.get()
    assert provider.stats()["redis_error"] == 1
    connections = proxy.accepted
    assert connections >= 1  # it did try, and TCP did connect: only the timeout ended it
    for _ in range(5):
        assert provider.invalidate(current) is False
        current = provider.get()
    assert proxy.accepted == connections, "Redis was dialled again inside the cooldown"
    assert provider.stats()["redis_error"] == 1
    assert fake_k2.exchanges == 6

    proxy.forward()
    clock.advance(PAST_BOTH)
    provider.get()
    assert provider.wait_for_refresh(5)
    shared = provider.get()
    assert decode(stored_bytes(redis_client, provider.keys.token)).value == shared.value
    assert make_provider().get().value == shared.value
    assert count(all_logs.records, OUTAGE) == 1
    assert count(all_logs.records, RECOVERY) == 1
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=issued_tokens(fake_k2),
        logs=all_logs.records,
        objects=[provider, shared],
        client=redis_client,
    )


def one_timeout_slack(redis_timeout: float) -> float:
    """What a loaded machine may add to a call beyond its Redis timeout and its exchange: well
    below one more timeout, so a second one cannot hide in it."""
    return min(0.5, 0.8 * redis_timeout)


def behind_the_proxy(
    make_provider: Make, proxy: TcpProxy, redis_timeout: float, **options: Any
) -> SharedTokenProvider:
    """A provider whose Redis is reached through ``proxy``, so a test can black-hole it. The
    backplane is off: its reconnections have their own backoff, off the callers' path, and
    would muddy the proxy's count of dials."""
    return make_provider(
        redis=f"redis://127.0.0.1:{proxy.port}/0",
        redis_timeout=redis_timeout,
        redis_cooldown=COOLDOWN,
        local_max_age=LOCAL_MAX_AGE,
        backplane=False,
        **options,
    )


@pytest.mark.parametrize("local_cache", [True, False])
@pytest.mark.parametrize("redis_timeout", [1.0, 0.25])
def test_a_black_holed_redis_costs_the_first_call_one_timeout_and_later_calls_none(
    make_provider: Make,
    proxy: TcpProxy,
    fake_k2: FakeK2Server,
    redis_timeout: float,
    local_cache: bool,
) -> None:
    """A command that meets a partition is not retried (redis-py retries timeouts by default,
    and a fresh connection's health-check PING retries on its own): one timeout, one dial, then
    the exchange; within the cooldown no call dials Redis again."""
    provider = behind_the_proxy(make_provider, proxy, redis_timeout, local_cache=local_cache)
    proxy.blackhole()
    started = time.monotonic()
    first = provider.get()
    elapsed = time.monotonic() - started
    exchange = provider.stats()["exchange_ok_seconds"]
    assert proxy.accepted == 1, "a timed-out command was retried on a fresh connection"
    assert provider.stats()["redis_error"] == 1
    assert fake_k2.token_requests == 1
    assert redis_timeout <= elapsed < redis_timeout + exchange + one_timeout_slack(redis_timeout)

    assert provider.invalidate(first) is False
    started = time.monotonic()
    second = provider.get()
    elapsed = time.monotonic() - started
    exchange = provider.stats()["exchange_ok_seconds"] - exchange
    assert second != first
    assert proxy.accepted == 1, "Redis was dialled again inside the cooldown"
    assert provider.stats()["redis_error"] == 1
    assert elapsed < exchange + one_timeout_slack(redis_timeout)


@pytest.mark.parametrize("redis_timeout", [1.0, 0.25])
def test_a_partition_during_the_exchange_costs_the_publish_one_timeout_and_nothing_after(
    make_provider: Make,
    proxy: TcpProxy,
    fake_k2: FakeK2Server,
    redis_timeout: float,
) -> None:
    """The lock was taken while Redis answered; the partition starts while K2 is asked. The
    publish times out once, the token is kept in this process, and the flow does not go back
    to Redis (no retried publish, no release) before it returns."""
    provider = behind_the_proxy(make_provider, proxy, redis_timeout)
    fake_k2.pause_tokens()
    results: list[AccessToken] = []
    caller = threading.Thread(target=lambda: results.append(provider.get()))
    caller.start()
    try:
        assert fake_k2.wait_for_token_requests(1)  # the lock is held: the exchange is in flight
        proxy.blackhole()
        dialled = proxy.accepted
        started = time.monotonic()
    finally:
        fake_k2.resume_tokens()
    caller.join(10)
    elapsed = time.monotonic() - started
    assert results and fake_k2.is_valid(results[0].value)
    assert proxy.accepted == dialled, "the publish was retried on a fresh connection"
    assert provider.stats()["redis_error"] == 1
    assert fake_k2.token_requests == 1
    assert redis_timeout <= elapsed < redis_timeout + one_timeout_slack(redis_timeout)
    assert provider.get() == results[0]
    assert provider.invalidate(results[0]) is False
    assert provider.get() != results[0]
    assert proxy.accepted == dialled, "Redis was dialled again inside the cooldown"
    assert provider.stats()["redis_error"] == 1


@pytest.mark.parametrize("local_cache", [True, False])
def test_a_client_passed_in_keeps_its_own_retry_policy_against_a_black_holed_redis(
    make_provider: Make,
    proxy: TcpProxy,
    side: str,
    event_loop_thread: Callable[[], EventLoopThread],
    local_cache: bool,
) -> None:
    """A client the application built is not ours to change, and the README says its retries
    apply: this one retries timeouts twice, so a partition costs it three timeouts and three
    dials, on the pipelined read (our code) as on a script (redis-py's). Without a handshake,
    so that the first command, not the connection's HELLO, is what meets the partition."""
    url = f"redis://127.0.0.1:{proxy.port}/0"
    options: dict[str, Any] = {"socket_timeout": 0.1, "protocol": 2, **_NO_CLIENT_INFO}
    if side == "sync":
        client: Any = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 2), **options)
    else:
        client = redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 2), **options)
    try:
        provider = make_provider(
            redis=client, local_cache=local_cache, redis_cooldown=COOLDOWN, backplane=False
        )
        proxy.blackhole()
        provider.get()
        assert proxy.accepted == 3
        assert provider.stats()["redis_error"] == 1
    finally:
        if side == "sync":
            client.close()
        else:
            event_loop_thread().run(client.aclose())


def test_invalidate_at_the_start_of_an_outage_drops_the_local_copy_without_raising(
    make_provider: Make,
    redis_server: EmbeddedRedis,
    fake_k2: FakeK2Server,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """A 401 seen just as Redis dies must not turn into an exception in the caller's request."""
    provider = make_provider(redis_cooldown=COOLDOWN)
    token = provider.get()
    redis_server.kill()
    assert provider.invalidate(token) is False
    replacement = provider.get()
    assert replacement != token
    assert fake_k2.is_valid(replacement.value)
    assert provider.stats()["redis_error"] == 1
    assert count(all_logs.records, OUTAGE) == 1
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=issued_tokens(fake_k2),
        logs=all_logs.records,
        objects=[provider, token, replacement],
    )


@pytest.mark.parametrize("local_cache", [True, False])
def test_raise_mode_raises_shared_cache_error_then_fails_fast_for_the_cooldown(
    make_provider: Make,
    redis_server: EmbeddedRedis,
    fake_k2: FakeK2Server,
    all_logs: pytest.LogCaptureFixture,
    local_cache: bool,
) -> None:
    """``on_redis_error="raise"``: the package's own error, never redis-py's, and during the
    cooldown it comes at once instead of after another timeout; nothing is exchanged."""
    provider = make_provider(
        on_redis_error="raise", local_cache=local_cache, redis_cooldown=COOLDOWN
    )
    redis_server.kill()
    errors: list[BaseException] = []
    for _ in range(10):
        with pytest.raises(SharedCacheError) as info:
            provider.get()
        assert type(info.value) is SharedCacheError
        assert not isinstance(info.value, redis.RedisError)
        errors.append(info.value)
    with pytest.raises(SharedCacheError) as info:
        provider.invalidate("some-token-that-was-refused")
    errors.append(info.value)
    assert provider.stats()["redis_error"] == 1, "Redis was tried again inside the cooldown"
    assert fake_k2.token_requests == 0
    outage = warnings_with(all_logs.records, OUTAGE)
    assert len(outage) == 1
    assert "token requests fail meanwhile" in outage[0]
    assert_no_leak(secret=CLIENT_SECRET, logs=all_logs.records, errors=errors)


def test_raise_mode_does_not_dial_a_black_holed_redis_during_the_cooldown(
    make_provider: Make,
    proxy: TcpProxy,
    fake_k2: FakeK2Server,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    provider = make_provider(
        redis=f"redis://127.0.0.1:{proxy.port}/0",
        on_redis_error="raise",
        redis_timeout=0.2,
        redis_cooldown=COOLDOWN,
        # The callers' dials are counted; the backplane's reconnections have their own backoff.
        backplane=False,
    )
    proxy.blackhole()
    errors: list[BaseException] = []
    with pytest.raises(SharedCacheError) as info:
        provider.get()
    errors.append(info.value)
    connections = proxy.accepted
    for _ in range(10):
        with pytest.raises(SharedCacheError, match="circuit open") as info:
            provider.get()
        errors.append(info.value)
    assert proxy.accepted == connections
    assert provider.stats()["redis_error"] == 1
    assert fake_k2.token_requests == 0
    assert_no_leak(secret=CLIENT_SECRET, logs=all_logs.records, errors=errors)


# -- 3. lock safety -------------------------------------------------------------------------


@pytest.mark.parametrize("read_timeout", [0.5, 10.0])
def test_an_exchange_stuck_in_a_slow_endpoint_gives_the_lock_back_inside_its_lease(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
    read_timeout: float,
) -> None:
    """With a 2 s lease, retries against an endpoint slower than the read timeout must still
    end in time for the holder to release its own lock and record the fleet's hold-off: both
    scripts act only for the lock's owner, so a late holder would leave neither trace."""
    fake_k2.inject(*[Fault.slow(8)] * 10)
    provider = make_provider(lock_lease=2, read_timeout=read_timeout, max_attempts=10)
    keys = provider.keys
    events = KeyEvents(redis_client, keys.lock)
    try:
        with pytest.raises(TokenEndpointUnavailableError) as info:
            provider.get()
        assert events.until(b"del", b"expired")[-1] == b"del", "the lease ran out first"
    finally:
        events.close()
    assert redis_client.exists(keys.lock) == 0
    assert redis_client.get(keys.backoff) == b"unavailable:"
    assert redis_client.get(keys.failures) == b"1"
    if read_timeout < 1:
        assert fake_k2.token_requests >= 2  # it did retry inside the lease
    assert not warnings_with(all_logs.records, "newer lock holder")
    assert not warnings_with(all_logs.records, "took over")
    assert_no_leak(
        secret=CLIENT_SECRET, logs=all_logs.records, errors=[info.value], client=redis_client
    )


def test_a_holder_that_needed_a_retry_publishes_while_it_still_owns_the_lock(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    fake_k2.inject(Fault.slow(8))
    provider = make_provider(lock_lease=2, read_timeout=0.5, max_attempts=4)
    keys = provider.keys
    events = KeyEvents(redis_client, keys.lock)
    try:
        token = provider.get_token()
        assert events.until(b"del", b"expired")[-1] == b"del", "the lease ran out first"
    finally:
        events.close()
    assert fake_k2.token_requests == 2
    stored = decode(stored_bytes(redis_client, keys.token))
    assert stored.value == token
    assert stored.fence == int(stored_bytes(redis_client, keys.fence))
    assert not warnings_with(all_logs.records, "newer lock holder")
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=issued_tokens(fake_k2),
        logs=all_logs.records,
        client=redis_client,
    )


def test_a_holder_whose_lease_ran_out_cannot_overwrite_a_newer_token_or_free_a_newer_lock(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """A process paused past its lease (GC, a stopped VM) wakes up believing it holds the lock.
    Its publish must not replace the newer token nor wake waiters with its own; its release
    must not free the newer holder's lock nor set a hold-off for the fleet."""
    stale, fresh = make_provider(lock_lease=2), make_provider(lock_lease=2)
    keys = stale.keys
    old_lock = stale._store.try_lock(-1)
    assert old_lock.acquired
    events = KeyEvents(redis_client, keys.lock)
    try:
        redis_client.pexpire(keys.lock, 1)  # the lease runs out: Redis itself expires the lock
        events.until(b"expired")
    finally:
        events.close()

    newest = fresh.get_token()  # a new holder takes the lock, exchanges and publishes
    assert decode(stored_bytes(redis_client, keys.token)).fence == old_lock.fence + 1

    stale_token = "stale-holder-token-" + "x" * 24
    issued = IssuedToken(stale_token, "Bearer", 3600, time.monotonic(), time.time(), 0.0)
    listener = redis_client.pubsub()
    listener.subscribe(keys.channel)
    assert listener.get_message(timeout=5) is not None  # the subscribe confirmation
    try:
        stale._store.publish(old_lock, issued)
        assert decode(stored_bytes(redis_client, keys.token)).value == newest

        newer_lock = fresh._store.try_lock(-1)  # and now another holder is at work
        assert newer_lock.acquired
        stale._store.publish(old_lock, issued)
        stale._store.release(old_lock, "unavailable", 30_000, False)
        assert redis_client.get(keys.lock) == newer_lock.owner.encode()
        assert redis_client.exists(keys.backoff, keys.failures) == 0
        assert decode(stored_bytes(redis_client, keys.token)).value == newest

        # Pub/sub is ordered: a marker sent now arrives after anything the stale holder sent.
        redis_client.publish(keys.channel, b"marker")
        message = listener.get_message(timeout=5)
        while message is not None and message["type"] != "message":
            message = listener.get_message(timeout=5)
        assert message is not None
        assert message["data"] == b"marker", "the stale holder announced something"
    finally:
        listener.close()

    fresh._store.release(newer_lock, "")
    assert redis_client.exists(keys.lock) == 0  # its owner, and only its owner, frees it
    assert len(warnings_with(all_logs.records, "newer lock holder")) == 2
    assert fresh.get_token() == newest
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=[*issued_tokens(fake_k2), stale_token],
        logs=all_logs.records,
        objects=[AccessToken(newest, "Bearer", 0.0)],
        client=redis_client,
    )


@pytest.mark.sync_only("patches the blocking client's eval")
def test_a_lock_attempt_whose_reply_was_lost_is_released_once_redis_answers(
    make_provider: Make, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran the lock attempt but the reply never came back (a timeout, a partition that
    healed and delivered it late): Redis holds the lock for a worker that gave up. Without a
    release the fleet would wait out its lease."""
    provider = make_provider()
    client = provider._store.client
    real_eval = client.eval

    def ran_but_reply_lost(*args: Any) -> Any:
        real_eval(*args)
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(client, "eval", ran_but_reply_lost)
    with pytest.raises(SharedCacheError):
        provider._store.try_lock(-1)
    monkeypatch.setattr(client, "eval", real_eval)
    lock = provider.keys.lock
    assert redis_client.pttl(lock) > 1000  # an orphan with most of its lease ahead
    assert provider._store.invalidate("no-such-token") == 0  # the next answered call
    assert redis_client.get(lock) is None
