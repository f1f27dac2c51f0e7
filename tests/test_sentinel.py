"""The provider on a Sentinel-managed primary, through ``redis+sentinel://`` URLs, unchanged.

A primary, one replica and three sentinels, real ``redis-server`` processes on loopback started
by :class:`EmbeddedSentinel` and stopped by PID at the end of the module. The failover step
(``-m fleet``) SIGKILLs the primary under a fleet of 4 spawned processes x 4 threads and prints
its figures (run with ``-s``); it runs last, since the topology has no replica left after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.sentinel
from redis.sentinel import Sentinel, SentinelConnectionPool

from k2_shared_token import ConfigurationError, SharedTokenProvider
from k2_shared_token._redis.clients import AsyncSentinelPrimary, SentinelPrimary, redis_client
from k2_shared_token._redis.codec import digest
from k2_shared_token._redis.urls import parse_sentinel_url
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.topologies import HOST, EmbeddedSentinel
from tests.both_ways import EventLoopThread, maker
from tests.conftest import provider_kwargs, wait_until
from tests.netproxy import TcpProxy
from tests.topology_support import (
    Fleet,
    async_shares_with_sync,
    backplane_drops_copies,
    recover,
    summary,
)

PROCESSES, THREADS = 4, 4


def plain(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=2.0, protocol=2)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    started = Fleet(PROCESSES, THREADS).start()  # boots while the sentinels meet
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[EmbeddedSentinel]:
    with EmbeddedSentinel() as started:
        print(f"\n[sentinel] primary + replica + 3 sentinels ready in {started.started_in:.2f}s")
        yield started


# -- the URL form, no server -----------------------------------------------------------------


def test_sentinel_url_form() -> None:
    assert parse_sentinel_url("redis+sentinel://[::1]:26379,10.0.0.2:26380/k2%20main") == (
        [("::1", 26379), ("10.0.0.2", 26380)],
        "k2 main",
        0,
    )


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+sentinel://h:1/", "master name"),
        ("redis+sentinel://h:1/m/x", "not a number"),
        ("redis+sentinel://user:secret@h:1/m", "credentials"),
        ("redis+sentinel://h:1/m?socket_timeout=1", "query options"),
    ],
)
def test_sentinel_url_errors_are_configuration_errors(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint) as caught:
        SharedTokenProvider(client_id="id", client_secret="secret", redis=url)
    assert "secret@" not in str(caught.value)


def test_sentinel_clients_get_the_short_options() -> None:
    """Built without contacting anyone; the data and the sentinel connections alike get the
    short timeouts and the one-trip handshake."""
    url = "redis+sentinel://127.0.0.1:1,127.0.0.1:2/k2primary/3"
    sync = redis_client(url, 0.25)
    try:
        assert isinstance(sync, SentinelPrimary)
        pool = sync.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "k2primary"
        options = pool.connection_kwargs
        assert (options["db"], options["socket_timeout"], options["protocol"]) == (3, 0.25, 2)
        assert options["retry"].get_retries() == 1
        for asked in pool.sentinel_manager.sentinels:
            kwargs = asked.connection_pool.connection_kwargs
            assert (kwargs["socket_connect_timeout"], kwargs["protocol"]) == (0.25, 2)
            assert kwargs["retry"] == options["retry"]  # never redis-py's ten with backoff
    finally:
        sync.close()
    async_client = redis_client(url, 0.25, asyncio=True)
    assert isinstance(async_client, AsyncSentinelPrimary)
    assert isinstance(async_client.connection_pool, redis.asyncio.sentinel.SentinelConnectionPool)
    asyncio.run(async_client.aclose())


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_black_holed_sentinel_costs_the_first_call_one_timeout_before_the_next_is_asked(
    sentinel: EmbeddedSentinel,
    fake_k2: FakeK2Server,
    side: str,
    event_loop_thread: Callable[[], EventLoopThread],
) -> None:
    """The first sentinel of the URL is partitioned (TCP connects, nothing answers): asking it
    costs one ``redis_timeout`` and one dial, then the next sentinel names the primary."""
    timeout = 0.25
    first, *others = sentinel.sentinel_addresses
    with TcpProxy(first[1]) as proxy:
        proxy.blackhole()
        listed = ",".join(f"{h}:{p}" for h, p in [(HOST, proxy.port), *others])
        url = f"redis+sentinel://{listed}/{sentinel.master_name}/0"
        kwargs = provider_kwargs(url, fake_k2.base_url, redis_timeout=timeout, backplane=False)
        with maker(side, event_loop_thread)(**kwargs) as provider:
            started = time.monotonic()
            provider.get()
            elapsed = time.monotonic() - started
            exchange = provider.stats()["exchange_ok_seconds"]
            assert provider.stats()["redis_error"] == 0
        assert proxy.accepted == 1
    assert timeout <= elapsed < timeout + exchange + 0.8 * timeout  # no second timeout


def test_closing_the_provider_closes_its_sentinel_connections(
    sentinel: EmbeddedSentinel, fake_k2: FakeK2Server
) -> None:
    def clients() -> set[tuple[int, str]]:
        """(sentinel port, client id) of every connection but the sentinels' own links."""
        found: set[tuple[int, str]] = set()
        for port in sentinel.live_sentinel_ports:
            client = plain(port)
            try:
                listed = client.execute_command("CLIENT", "LIST")  # type: ignore[no-untyped-call]
            finally:
                client.close()
            text = listed.decode() if isinstance(listed, bytes) else str(listed)
            for line in text.splitlines():
                fields = dict(part.partition("=")[::2] for part in line.split())
                if not fields.get("name", "").startswith("sentinel-"):
                    found.add((port, fields["id"]))
        return found

    before = clients()
    provider = SharedTokenProvider(**provider_kwargs(sentinel.url, fake_k2.base_url))
    assert fake_k2.is_valid(provider.get_token())
    opened = clients() - before  # the provider's (and the listing's own, gone once read)
    assert opened
    provider.close()
    # The server notices a closed socket on its next event-loop turn.
    wait_until(lambda: not clients() & opened, 5, "the sentinel connections to close")


def test_a_master_for_client_works_as_well_as_the_url(
    sentinel: EmbeddedSentinel, fake_k2: FakeK2Server
) -> None:
    """``Sentinel(...).master_for(name)`` built by the application shares the namespace with a
    provider built from the URL; closing the provider leaves the client open."""
    manager = Sentinel(sentinel.sentinel_addresses, socket_timeout=1.0)  # type: ignore[no-untyped-call]
    own = manager.master_for(sentinel.master_name, socket_timeout=1.0)  # type: ignore[no-untyped-call]
    from_url = SharedTokenProvider(**provider_kwargs(sentinel.url, fake_k2.base_url))
    given = SharedTokenProvider(
        **provider_kwargs(sentinel.url, fake_k2.base_url, redis=own, local_cache=False)
    )
    try:
        token = given.get_token()
        assert from_url.get_token() == token
        assert given.invalidate(token)
        assert from_url.invalidate(token) is False  # gone from Redis already; dropped locally
        fresh = from_url.get_token()
        assert given.get_token() == fresh
        assert fake_k2.exchanges == 2
        given.close()
        assert own.ping() is True  # still the application's
    finally:
        from_url.close()
        own.close()
        manager.close()


def test_asyncio_and_blocking_providers_share_through_sentinel(
    sentinel: EmbeddedSentinel, fake_k2: FakeK2Server
) -> None:
    kwargs = provider_kwargs(sentinel.url, fake_k2.base_url)

    def subscribers(channel: str) -> int:
        client = plain(sentinel.primary_port)
        try:
            return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
        finally:
            client.close()

    asyncio.run(async_shares_with_sync(kwargs, fake_k2, subscribers))


@pytest.mark.fleet
def test_primary_killed_under_load(
    fleet: Fleet, sentinel: EmbeddedSentinel, fake_k2: FakeK2Server
) -> None:
    """SIGKILL the primary while 4 processes call; the sentinels promote the replica.

    Three processes keep a local copy and re-read Redis every 0.25 s, so each meets the
    failover; one has no local copy and asks Redis on every call, so its callers live on the
    fallback while no primary answers. The circuit breaker retries Redis every second.
    """
    base = provider_kwargs(sentinel.url, fake_k2.base_url, local_max_age=0.25, redis_cooldown=1.0)
    kwargs: list[dict[str, Any]] = [base] * (PROCESSES - 1) + [{**base, "local_cache": False}]
    namer = SharedTokenProvider(**base)
    token_key = namer.keys.token
    namer.close()
    with fleet.load(kwargs, period=0.01) as log:
        assert log.wait_for(lambda got: got.agreed() is not None, 30)
        assert fake_k2.exchanges == 1
        old = sentinel.primary_port
        began = time.monotonic()
        assert sentinel.kill_primary() == old
        new = sentinel.wait_for_failover(timeout=30)
        failed_over = time.monotonic() - began
        recovery = recover(base, fake_k2, log, began)
        # The token written after the failover is on the promoted replica.
        promoted = plain(new[1])
        try:
            raw = promoted.get(token_key)
        finally:
            promoted.close()
        assert isinstance(raw, bytes)
        assert raw.split(b":", 2)[1].decode() == digest(fake_k2.issued[-1].token)
    totals = summary(log)
    outages = log.outages(began)
    shared = fake_k2.exchanges - int(totals["fallback"])
    print(
        f"[sentinel] kill primary {old}, failover to {new[1]} in {failed_over:.2f}s: "
        f"{totals['calls']:.0f} calls, {totals['errors']:.0f} caller errors, "
        f"{totals['redis_error']:.0f} Redis errors, provider outages "
        f"{', '.join(f'{o:.1f}' for o in outages)}s; {recovery.line()}"
    )
    print(
        f"[sentinel] exchanges: {fake_k2.exchanges} = 1 cold + 1 forced rollover + "
        f"{shared - 2} extra shared + {totals['fallback']:.0f} process-local fallbacks "
        f"(the process without a local copy)"
    )
    assert new[1] != old
    assert log.caller_errors() == []
    assert recovery.rollover_exchanges == 1
    assert shared - 2 <= 1  # at most one extra: the stored token lost with the primary
    fallback_by = {index for kind, index, _at in log.hooked if kind == "fallback"}
    assert fallback_by <= {PROCESSES - 1}
    assert totals["fallback"] <= THREADS


def test_the_backplane_works_through_sentinel(
    sentinel: EmbeddedSentinel, fake_k2: FakeK2Server
) -> None:
    backplane_drops_copies(sentinel.url, fake_k2)
