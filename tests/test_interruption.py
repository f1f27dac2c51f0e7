"""The eight defects the one-source redesign fixed, each pinned by a test that failed before.

1. cancelling (or interrupting) the caller that leads an exchange fails nobody else and strands
   no lock; 2. no early refresh without the local cache (asyncio); 3. a refresh that crashes
   kills the refresher; 4. an error closing the subscription masks the wait's result; 5. a
   client of the wrong side fails late and raw; 6. unlocked races; 7. ``close()`` does not
   close; 8. an asyncio Cluster client without ``pubsub()`` fails raw.

Ordering is by the fake K2 server's gate (``pause_tokens``) and by its request counter, never
by sleeps.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError as FutureCancelled
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
import requests

from k2_shared_token import (
    AsyncSharedTokenProvider,
    ConfigurationError,
    SharedTokenProvider,
)
from k2_shared_token._core import local_copy
from k2_shared_token._core.local_copy import LocalCopy
from k2_shared_token._core.tokens import Snapshot, StoredToken
from k2_shared_token._core.windows import Windows
from k2_shared_token._redis.codec import RELEASED
from k2_shared_token._redis.commands import Namespace
from k2_shared_token._redis.layout import Keys
from k2_shared_token.testing.fake_k2 import FakeK2Server, Fault
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.both_ways import (
    EventLoopThread,
    around,
    close_users_http_client,
    maker,
    underlying,
    users_http_client,
)
from tests.conftest import provider_kwargs, wait_until

Make = Callable[..., SharedTokenProvider]


def kwargs(redis_server: EmbeddedRedis, fake_k2: FakeK2Server, **extra: Any) -> dict[str, Any]:
    return provider_kwargs(redis_server.url, fake_k2.base_url, **extra)


@pytest.fixture
def paused(fake_k2: FakeK2Server) -> Iterator[FakeK2Server]:
    fake_k2.pause_tokens()
    try:
        yield fake_k2
    finally:
        fake_k2.resume_tokens()


# -- 1. cancelling the leader ------------------------------------------------------------------


def test_cancelling_the_leading_task_leaves_followers_with_tokens_and_the_lock_free(
    redis_server: EmbeddedRedis, paused: FakeK2Server
) -> None:
    """A FastAPI request that started the exchange is cancelled (client gone, or
    ``asyncio.timeout``): its five followers still get the token, the exchange is published
    for the fleet, and another process's first call is served without waiting for a lease."""
    fake_k2 = paused
    lease = 5.0

    async def main() -> tuple[list[Any], float]:
        async with AsyncSharedTokenProvider(
            **kwargs(redis_server, fake_k2, lock_lease=lease)
        ) as provider:
            leader = asyncio.create_task(provider.get_token())
            await asyncio.sleep(0)  # the leader starts the flight first
            followers = [asyncio.create_task(provider.get_token()) for _ in range(5)]
            await asyncio.to_thread(fake_k2.wait_for_token_requests, 1, 5)
            leader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leader
            fake_k2.resume_tokens()
            results = await asyncio.gather(*followers, return_exceptions=True)
            started = time.monotonic()
            with SharedTokenProvider(**kwargs(redis_server, fake_k2, lock_lease=lease)) as other:
                results.append(other.get_token())
            return results, time.monotonic() - started

    results, other_took = asyncio.run(main())
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 1
    assert fake_k2.exchanges == 1
    took_ms = other_took * 1e3
    print(f"\n[cancel] 5 of 5 followers got the token; another process took {took_ms:.1f} ms")
    assert other_took < lease / 2


def test_a_leader_timed_out_by_asyncio_timeout_still_publishes(
    redis_server: EmbeddedRedis, paused: FakeK2Server
) -> None:
    fake_k2 = paused

    async def main() -> str:
        async with AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2)) as provider:
            gave_up = asyncio.Event()

            async def impatient() -> None:
                try:
                    await asyncio.wait_for(provider.get_token(), 0.2)
                except asyncio.TimeoutError:
                    gave_up.set()

            task = asyncio.create_task(impatient())
            await gave_up.wait()
            await task
            fake_k2.resume_tokens()
            return await provider.get_token()

    token = asyncio.run(main())
    assert fake_k2.exchanges == 1
    stored = redis.Redis.from_url(redis_server.url)
    try:
        assert any(key.endswith(b":token") for key in stored.keys("k2:*"))
    finally:
        stored.close()
    assert token


class _InterruptOnce(requests.Session):
    """A session whose first exchange is interrupted, as Ctrl-C or a gevent Timeout would be
    while the leader thread is inside the request; later ones go out for real."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = threading.Event()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if not self.interrupted.is_set():
            self.interrupted.set()
            raise KeyboardInterrupt
        return super().send(request, **kwargs)


def test_an_interrupted_leader_thread_fails_no_follower_and_frees_the_lock(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    session = _InterruptOnce()
    provider = SharedTokenProvider(**kwargs(redis_server, fake_k2, lock_lease=10), session=session)
    outcomes: dict[str, Any] = {}
    start = threading.Barrier(6)

    def call(name: str) -> None:
        start.wait()
        try:
            outcomes[name] = provider.get_token()
        except BaseException as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    provider.close()
    interrupted = [v for v in outcomes.values() if isinstance(v, KeyboardInterrupt)]
    tokens = {v for v in outcomes.values() if isinstance(v, str)}
    assert len(interrupted) == 1, outcomes  # only the thread it was delivered to
    assert len(tokens) == 1 and len(outcomes) == 6
    # The interrupted leader gave its lock back: the next leader did not sit out the lease.
    assert fake_k2.exchanges == 1


class _InterruptWhenTold(requests.Session):
    """A session whose exchange waits inside the request until ``go`` is set, then is
    interrupted there (Ctrl-C, a gevent Timeout), while another process waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.go = threading.Event(), threading.Event()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.inside.set()
        self.go.wait(10)
        raise KeyboardInterrupt


def test_a_lock_given_back_by_an_interrupted_holder_wakes_the_other_processes_at_once(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, make_provider: Make,
    redis_client: redis.Redis,
) -> None:  # fmt: skip
    """The interrupted holder gives its lock back without a token; that is announced, so a
    process already waiting on the channel tries for the lock at once instead of sitting out
    the rest of the lease (it has heard neither a token nor a failure)."""
    lease = 10.0
    session = _InterruptWhenTold()
    holder = SharedTokenProvider(
        **kwargs(redis_server, fake_k2, lock_lease=lease), session=session
    )
    waiter = make_provider(lock_lease=lease)
    seen: dict[str, Any] = {}

    def call(name: str, provider: Any) -> None:
        try:
            seen[name] = provider.get_token()
        except BaseException as exc:
            seen[name] = exc

    holding = threading.Thread(target=call, args=("holder", holder))
    holding.start()
    assert session.inside.wait(5)
    waiting = threading.Thread(target=call, args=("waiter", waiter))
    waiting.start()
    channel = holder.keys.channel
    wait_until(
        lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1, 5, "the waiter's subscription"
    )
    released_at = time.monotonic()
    session.go.set()
    holding.join(10)
    waiting.join(lease)
    took = time.monotonic() - released_at
    holder.close()
    assert isinstance(seen["holder"], KeyboardInterrupt), seen
    assert isinstance(seen.get("waiter"), str), seen
    assert fake_k2.exchanges == 1  # the waiter's own, once the lock was free
    print(f"\n[release] the waiter held its token {took * 1e3:.1f} ms after the interruption")
    assert took < lease / 2


# -- 2. early refresh without the local cache --------------------------------------------------


def test_a_stale_shared_token_kicks_the_refresh_without_a_local_cache(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    fake_k2.expires_in = 600
    provider = make_provider(local_cache=False, refresh_ahead=120, min_validity=10)
    old = provider.get_token()
    redis_client.pexpire(provider.keys.token, 100_000)  # into the refresh window
    assert provider.get_token() == old  # still usable: served, and the refresh kicked
    assert fake_k2.wait_for_token_requests(2, timeout=5)
    assert provider.wait_for_refresh(5)
    assert fake_k2.exchanges == 2
    assert provider.get_token() != old


# -- 3. a refresh that crashes -----------------------------------------------------------------


class _CrashOnceSync(requests.Session):
    crashes = 0

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if self.crashes == 0:
            self.crashes += 1
            raise RuntimeError("a bug in a library, not a K2 error")
        return super().send(request, **kwargs)


class _CrashOnceAsync(httpx.AsyncClient):
    crashes = 0

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        if self.crashes == 0:
            self.crashes += 1
            raise RuntimeError("a bug in a library, not a K2 error")
        return await super().send(request, **kwargs)


@pytest.mark.parametrize("side", ["sync", "async"])
def test_the_refresher_survives_an_unexpected_error_and_the_next_kick_works(
    side: str,
    redis_server: EmbeddedRedis,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    event_loop_thread: Callable[[], EventLoopThread],
) -> None:
    fake_k2.expires_in = 600
    session = _CrashOnceSync() if side == "sync" else _CrashOnceAsync()
    provider = maker(side, event_loop_thread)(
        **kwargs(redis_server, fake_k2, refresh_ahead=4, min_validity=1), session=session
    )
    session.crashes = 1  # the cold exchange goes through
    old = provider.get_token()
    session.crashes = 0  # the next exchange, the refresh's, crashes
    redis_client.pexpire(provider.keys.token, 3_500)  # stale; the pause after a crash is 0.75 s
    provider._local.held = None  # re-read: now stale, so the refresh is kicked
    assert provider.get_token() == old
    assert provider.wait_for_refresh(5)
    assert provider.stats()["refresh_failed"] == 1  # crashed, counted, survived
    assert fake_k2.exchanges == 1
    deadline = time.monotonic() + 5
    while fake_k2.exchanges < 2 and time.monotonic() < deadline:
        assert provider.get_token() == old  # a call after the pause kicks the refresh again
        provider.wait_for_refresh(5)
    provider.close()
    assert fake_k2.exchanges == 2


# -- 4. an error closing the subscription ------------------------------------------------------


class _CloseFailsSync(redis.Redis):
    def pubsub(self, **kwargs: Any) -> Any:
        pubsub = super().pubsub(**kwargs)
        close = pubsub.close

        def failing_close() -> None:
            close()
            raise redis.ConnectionError("closing the subscription failed")

        pubsub.close = failing_close
        return pubsub


class _CloseFailsAsync(redis.asyncio.Redis):
    def pubsub(self, **kwargs: Any) -> Any:
        pubsub = super().pubsub(**kwargs)
        aclose = pubsub.aclose

        async def failing_aclose() -> None:
            await aclose()
            raise redis.ConnectionError("closing the subscription failed")

        pubsub.aclose = failing_aclose
        return pubsub


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_failing_unsubscribe_does_not_replace_the_token_the_wait_got(
    side: str, redis_server: EmbeddedRedis, paused: FakeK2Server
) -> None:
    fake_k2 = paused
    holder = SharedTokenProvider(**kwargs(redis_server, fake_k2))
    got: list[str] = []
    leading = threading.Thread(target=lambda: got.append(holder.get_token()))
    leading.start()
    assert fake_k2.wait_for_token_requests(1, timeout=5)  # the holder is inside K2

    if side == "sync":
        client = _CloseFailsSync.from_url(redis_server.url)
        with SharedTokenProvider(**kwargs(redis_server, fake_k2, redis=client)) as waiter:
            threading.Timer(0.2, fake_k2.resume_tokens).start()
            token = waiter.get_token()
        client.close()
    else:

        async def main() -> str:
            client = _CloseFailsAsync.from_url(redis_server.url)
            async with AsyncSharedTokenProvider(
                **kwargs(redis_server, fake_k2, redis=client)
            ) as waiter:
                asyncio.get_running_loop().call_later(0.2, fake_k2.resume_tokens)
                token = await waiter.get_token()
            await client.aclose()
            return token

        token = asyncio.run(main())
    leading.join(10)
    holder.close()
    assert got == [token]
    assert fake_k2.exchanges == 1  # the waiter took the announced token, no fallback exchange


# -- 5. a client of the wrong side -------------------------------------------------------------


def test_a_client_of_the_wrong_side_is_a_configuration_error_at_construction(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    blocking = redis.Redis.from_url(redis_server.url)
    asynchronous = redis.asyncio.Redis.from_url(redis_server.url)
    with pytest.raises(ConfigurationError, match=r"redis\.asyncio"):
        AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2, redis=blocking))
    with pytest.raises(ConfigurationError, match="blocking"):
        SharedTokenProvider(**kwargs(redis_server, fake_k2, redis=asynchronous))
    with pytest.raises(ConfigurationError, match=r"httpx\.AsyncClient"):
        AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2), session=requests.Session())
    with pytest.raises(ConfigurationError, match=r"requests\.Session"):
        SharedTokenProvider(**kwargs(redis_server, fake_k2), session=httpx.Client())
    blocking.close()
    asyncio.run(asynchronous.aclose())


def test_an_auth_on_the_wrong_kind_of_httpx_client_is_a_configuration_error(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    async def build() -> AsyncSharedTokenProvider:
        return AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2))

    async_provider = asyncio.run(build())
    with httpx.Client(auth=async_provider.httpx_auth()) as http, pytest.raises(
        ConfigurationError, match=r"httpx\.AsyncClient only"
    ):
        http.get(fake_k2.base_url + "/api/ping")
    with SharedTokenProvider(**kwargs(redis_server, fake_k2)) as provider:

        async def main() -> None:
            async with httpx.AsyncClient(auth=provider.httpx_auth()) as http:
                await http.get(fake_k2.base_url + "/api/ping")

        with pytest.raises(ConfigurationError, match=r"httpx\.Client only"):
            asyncio.run(main())
    assert fake_k2.token_requests == 0


# -- 6. unlocked races -------------------------------------------------------------------------


def _snapshot(value: str, fence: int = 1) -> Snapshot:
    stored = StoredToken(value, "Bearer", 3600, fence)
    return Snapshot(stored, 3_600_000, time.monotonic(), time.time())


def test_an_invalidation_landing_inside_adopt_is_not_undone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The adopter reads the clock while it builds the copy; a 401 lands right then. The
    forced interleaving is where the old ``_adopt`` had its gap between check and assignment."""
    copy = LocalCopy(Windows(300, 30, 60), keep_shared=True, recheck_unshared=5, idle=900)
    copy.adopt(_snapshot("dead"), copy.generation)
    generation = copy.generation
    inside, forgotten = threading.Event(), threading.Event()
    real = time.monotonic

    class Clock:
        @staticmethod
        def monotonic() -> float:
            if threading.current_thread().name == "adopter" and not inside.is_set():
                inside.set()
                assert forgotten.wait(5)
            return real()

        time = staticmethod(time.time)

    monkeypatch.setattr(local_copy, "time", Clock)
    adopter = threading.Thread(
        target=lambda: copy.adopt(_snapshot("dead", fence=0), generation), name="adopter"
    )
    adopter.start()
    assert inside.wait(5)
    copy.forget("dead")
    forgotten.set()
    adopter.join(5)
    assert copy.held is None


def test_lock_attempts_left_unanswered_by_two_threads_are_all_released_later() -> None:
    ops = Namespace(Keys.for_namespace("k2", "0" * 16), "0" * 16, 5)
    attempt = ops.try_lock(0)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(300):
            barrier = threading.Barrier(2)

            def fail_four(tag: str, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                for i in range(4):
                    call = ops.try_lock(0)
                    call.args[0] = f"{tag}{i}"
                    ops.unanswered(call)

            threads = [threading.Thread(target=fail_four, args=(t,)) for t in "ab"]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            owners = {c.args[0] for c in ops.cleanups()}
            assert owners == {f"{t}{i}" for t in "ab" for i in range(4)}
    finally:
        sys.setswitchinterval(interval)
    assert attempt.what == "lock"


# -- 7. close closes ---------------------------------------------------------------------------


def test_a_closed_provider_refuses_calls_and_a_running_refresh_does_not_revive_it(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    fake_k2.expires_in = 600
    provider = make_provider(refresh_ahead=120, min_validity=10)
    old = provider.get_token()
    redis_client.pexpire(provider.keys.token, 100_000)
    provider._local.held = None
    fake_k2.pause_tokens()
    try:
        assert provider.get_token() == old  # stale: the refresh is now stuck inside K2
        assert fake_k2.wait_for_token_requests(2, timeout=5)
        threading.Timer(0.3, fake_k2.resume_tokens).start()
        provider.close()
    finally:
        fake_k2.resume_tokens()
    with pytest.raises(ConfigurationError, match="closed"):
        provider.get_token()
    with pytest.raises(ConfigurationError, match="closed"):
        provider.get_token()
    assert fake_k2.token_requests == 2


# -- 8. an asyncio Cluster client that cannot subscribe ----------------------------------------


def test_a_client_that_cannot_subscribe_is_a_configuration_error(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    class NoPubSub(redis.asyncio.Redis):
        pubsub = None  # what older redis-py's asyncio RedisCluster is

    client = NoPubSub.from_url(redis_server.url)
    with pytest.raises(ConfigurationError, match="subscribe"):
        AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2, redis=client))
    asyncio.run(client.aclose())


def interruption(side: str) -> type[BaseException]:
    """What interrupts a call: Ctrl-C on the blocking side; on the asyncio side a cancellation
    (a KeyboardInterrupt would end the tests' event loop)."""
    return KeyboardInterrupt if side == "sync" else asyncio.CancelledError


# ... as the caller sees it (through a BlockingView, a cancelled task is a cancelled future).
INTERRUPTED = (KeyboardInterrupt, asyncio.CancelledError, FutureCancelled)


def test_closing_mid_flow_gives_the_lock_back_without_failing_the_fleet(
    make_provider: Make, side: str, redis_client: redis.Redis, fake_k2: FakeK2Server
) -> None:
    """A provider closed while its flow holds the lock (a worker shutting down) refuses the
    exchange. It gives the lock back announced as released, not as a failure: waiting callers
    in other processes would raise that failure, and nothing is wrong with K2."""
    provider = make_provider()
    target = underlying(provider)
    close = target.close if side == "sync" else target.aclose
    target._store.try_lock = around(target._store.try_lock, after=lambda *_: close())
    pubsub = redis_client.pubsub()
    pubsub.subscribe(provider.keys.channel)
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        with pytest.raises(ConfigurationError, match="closed"):
            provider.get_token()
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == RELEASED.encode(), message
    finally:
        pubsub.close()
    assert not redis_client.exists(provider.keys.lock)
    assert fake_k2.token_requests == 0


def test_an_interruption_landing_inside_the_lock_attempt_strands_no_lock(
    make_provider: Make, side: str, redis_client: redis.Redis, fake_k2: FakeK2Server
) -> None:
    """Ctrl-C (or a cancellation, on the asyncio side) arrives after the lock script ran but
    before its reply was read: this process never learnt it holds the lock. The attempt is
    given back at once (owner-only), so the fleet does not sit out the lease."""
    provider = make_provider(lock_lease=10)
    store = underlying(provider)._store
    locked: list[bool] = []

    def interrupt_once_locked(reply: Any, call: Any) -> None:
        if call.what == "lock":
            locked.append(bool(redis_client.exists(provider.keys.lock)))
            if locked[-1]:
                raise interruption(side)

    store._eval = around(store._eval, after=interrupt_once_locked)
    with pytest.raises(INTERRUPTED):
        provider.get_token()
    assert locked == [True]
    assert not redis_client.exists(provider.keys.lock)
    assert fake_k2.token_requests == 0


def test_an_interruption_while_orphans_are_released_strands_neither_them_nor_the_new_lock(
    make_provider: Make, side: str, redis_client: redis.Redis, fake_k2: FakeK2Server
) -> None:
    """A lock attempt's reply came back (the lock is ours), then the store gives back an
    earlier orphaned attempt, and the interruption lands in that release: the new lock never
    reached the flow. Both are given back when the flow settles."""
    provider = make_provider(lock_lease=10)
    store = underlying(provider)._store
    orphan = store.ops.try_lock(0)
    orphan.args[0] = "an-earlier-attempt"
    store.ops.unanswered(orphan)
    interrupted: list[str] = []

    def interrupt_the_first_release(call: Any) -> None:
        if call.what == "release" and not interrupted:
            interrupted.append(str(redis_client.get(provider.keys.lock)))
            raise interruption(side)

    store._eval = around(store._eval, before=interrupt_the_first_release)
    with pytest.raises(INTERRUPTED):
        provider.get_token()
    assert interrupted and interrupted[0] != "None"  # the new lock was held at that moment
    assert not redis_client.exists(provider.keys.lock)
    assert not store.ops.cleanups()
    assert fake_k2.token_requests == 0


def test_a_real_failure_after_close_is_still_told_to_the_fleet_with_its_hold_off(
    make_provider: Make, side: str, redis_client: redis.Redis, paused: FakeK2Server
) -> None:
    """Closed while its exchange is in flight, then K2 fails it: that is a real failure, so
    the fleet hears it with its hold-off (only the refusal of a closed provider's own steps is
    settled as an interruption)."""
    fake_k2 = paused
    fake_k2.inject(Fault.status(503))
    session = users_http_client(side)
    provider = make_provider(session=session, max_attempts=1)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(provider.keys.channel)
    seen: list[BaseException] = []

    def call() -> None:
        try:
            provider.get_token()
        except BaseException as exc:
            seen.append(exc)

    caller = threading.Thread(target=call)
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        caller.start()
        assert fake_k2.wait_for_token_requests(1, 5)
        provider.close()
        fake_k2.resume_tokens()
        caller.join(10)
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"].startswith(b"Eunavailable:"), message
        assert [type(e).__name__ for e in seen] == ["TokenEndpointUnavailableError"]
    finally:
        pubsub.close()
        close_users_http_client(provider, session)


def test_an_interruption_outside_a_lock_attempt_does_not_go_back_to_redis_for_orphans(
    make_provider: Make, side: str, redis_client: redis.Redis, fake_k2: FakeK2Server
) -> None:
    """Interrupted while it waits for another holder, a flow holds nothing: settling it sends
    nothing (Redis may be what it was stuck on). Earlier orphaned attempts stay recorded, for
    the next call that Redis answers."""
    provider = make_provider(lock_lease=10)
    store = underlying(provider)._store
    redis_client.set(provider.keys.lock, b"another-holder", px=10_000)

    def orphan_then_interrupt(*args: Any) -> None:
        # An attempt of another thread went unanswered meanwhile (its lock attempt timed out).
        orphan = store.ops.try_lock(0)
        orphan.args[0] = "an-earlier-attempt"
        store.ops.unanswered(orphan)
        raise interruption(side)

    store.wait = around(store.wait, before=orphan_then_interrupt)
    with pytest.raises(INTERRUPTED):
        provider.get_token()
    assert [c.args[0] for c in store.ops.cleanups()] == ["an-earlier-attempt"]
    assert redis_client.get(provider.keys.lock) == b"another-holder"
    assert fake_k2.token_requests == 0
