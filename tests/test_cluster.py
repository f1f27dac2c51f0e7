"""The provider on a Redis Cluster, through ``redis+cluster://`` URLs, unchanged.

The cluster is 3 primaries with a replica each, real ``redis-server`` processes on loopback
started by :class:`EmbeddedCluster` and stopped by PID at the end of the module. The fleet steps
(``-m fleet``) run 8 spawned processes x 4 threads; every figure is printed (run with ``-s``).
The step that kills a primary runs last: the cluster stays usable after it, one replica short.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
from redis.cluster import ClusterNode, RedisCluster

from k2_shared_token import ConfigurationError, SharedCacheError, SharedTokenProvider
from k2_shared_token._redis.clients import LazyCluster, redis_client
from k2_shared_token._redis.codec import digest
from k2_shared_token._redis.urls import parse_cluster_url
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.topologies import HOST, EmbeddedCluster, slot_for_key
from tests.conftest import provider_kwargs, wait_until
from tests.topology_support import (
    Fleet,
    FleetLog,
    Recovery,
    async_shares_with_sync,
    backplane_drops_copies,
    recover,
    summary,
)

PROCESSES, THREADS = 8, 4


def plain(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=2.0, protocol=2)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    started = Fleet(PROCESSES, THREADS).start()  # boots while the cluster forms
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=3, replicas_per_primary=1) as started:
        print(f"\n[cluster] 3x1 cluster stable in {started.started_in:.2f}s")
        yield started


# -- the URL form, no server -----------------------------------------------------------------


def test_cluster_url_form() -> None:
    assert parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001/") == [
        ("10.0.0.1", 7000),
        ("10.0.0.2", 7001),
    ]
    assert parse_cluster_url("redis+cluster://[::1]:7000") == [("::1", 7000)]
    assert parse_cluster_url("REDIS+CLUSTER://h:1/0") == [("h", 1)]


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+cluster://h/", "not host:port"),
        ("redis+cluster://h:1,/", "not host:port"),
        ("redis+cluster://h:70000/", "out of range"),
        ("redis+cluster://h:1/3", "db 0"),
        ("redis+cluster://user:secret@h:1/", "credentials"),
        ("redis+cluster://h:1/?ssl=true", "query options"),
    ],
)
def test_cluster_url_errors_are_configuration_errors(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint) as caught:
        SharedTokenProvider(client_id="id", client_secret="secret", redis=url)
    assert "secret@" not in str(caught.value)


def test_cluster_clients_get_the_short_options() -> None:
    sync = redis_client("redis+cluster://127.0.0.1:1/", 0.25)
    assert isinstance(sync, LazyCluster)
    assert sync.built is None  # nothing contacted yet
    sync.close()
    async_client = redis_client("redis+cluster://127.0.0.1:1/", 0.25, asyncio=True)
    assert isinstance(async_client, redis.asyncio.cluster.RedisCluster)
    assert async_client.retry.get_retries() == 1
    kwargs = async_client.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.25)
    assert kwargs["protocol"] == 2
    asyncio.run(async_client.aclose())


def test_unreachable_cluster_falls_back_then_raises_when_asked(fake_k2: FakeK2Server) -> None:
    """Built while no node answers: the provider comes up, serves a process-local token, and
    with ``on_redis_error="raise"`` reports a SharedCacheError, never a raw redis exception."""
    url = f"redis+cluster://{HOST}:{closed_port()}/"
    provider = SharedTokenProvider(**provider_kwargs(url, fake_k2.base_url))
    try:
        assert fake_k2.is_valid(provider.get_token())
        stats = provider.stats()
        assert (stats["redis_error"], stats["fallback"], fake_k2.exchanges) == (1, 1, 1)
    finally:
        provider.close()
    strict = SharedTokenProvider(**provider_kwargs(url, fake_k2.base_url, on_redis_error="raise"))
    try:
        with pytest.raises(SharedCacheError, match="RedisClusterException"):
            strict.get_token()
    finally:
        strict.close()


# -- on the cluster ----------------------------------------------------------------------------


@pytest.mark.fleet
def test_cold_stampede_makes_one_exchange(
    fleet: Fleet, cluster: EmbeddedCluster, fake_k2: FakeK2Server
) -> None:
    fake_k2.latency = 0.1
    began = time.monotonic()
    log = fleet.stampede(provider_kwargs(cluster.cluster_url, fake_k2.base_url))
    took = time.monotonic() - began
    outcomes = [o for result in log.results.values() for o in result["outcomes"]]
    waits = sum(result["stats"]["wait"] for result in log.results.values())
    print(
        f"[cluster] cold stampede {PROCESSES}x{THREADS}: {len(outcomes)} callers, "
        f"{fake_k2.exchanges} exchange, {waits:.0f} processes woken by the announcement, "
        f"{took:.2f}s (provider builds included)"
    )
    assert [o for o in outcomes if o[0] != "ok"] == []
    assert len(outcomes) == PROCESSES * THREADS
    assert len({printed for _, printed in outcomes}) == 1
    assert fake_k2.exchanges == fake_k2.token_requests == 1


def test_a_namespace_is_one_slot_and_its_scripts_run_on_its_node(
    cluster: EmbeddedCluster, fake_k2: FakeK2Server
) -> None:
    # Without the backplane: its subscriptions would satisfy the "waiter subscribed" signal below.
    kwargs = provider_kwargs(cluster.cluster_url, fake_k2.base_url, backplane=False)
    holder, waiter = SharedTokenProvider(**kwargs), SharedTokenProvider(**kwargs)
    keys = holder.keys
    names = [*keys.all, keys.channel]
    asked = plain(cluster.live_ports[0])
    try:
        slots = {
            int(asked.execute_command("CLUSTER", "KEYSLOT", name))  # type: ignore[no-untyped-call]
            for name in names
        }
    finally:
        asked.close()
    assert slots == {slot_for_key(keys.token)}
    (slot,) = slots
    owner = cluster.node_for_slot(slot)[1]
    clients = {port: plain(port) for port in cluster.live_ports}
    try:
        for client in clients.values():
            client.config_resetstat()

        # Every script: try-lock + publish (holder), try-lock + wait on the channel (waiter),
        # read (no local cache), invalidate, release-free paths alike.
        fake_k2.pause_tokens()
        got: list[str] = []
        first = threading.Thread(target=lambda: got.append(holder.get_token()))
        first.start()
        assert fake_k2.wait_for_token_requests(1, timeout=10)
        second = threading.Thread(target=lambda: got.append(waiter.get_token()))
        second.start()
        wait_until(
            lambda: (
                dict(clients[owner].pubsub_numsub(keys.channel)).get(keys.channel.encode(), 0) >= 1
            ),
            10,
            "the waiter to subscribe on the slot's node",
        )
        fake_k2.resume_tokens()
        first.join(10)
        second.join(10)
        assert len(got) == 2 and got[0] == got[1]
        assert waiter.stats()["wait"] == 1
        reader = SharedTokenProvider(**kwargs, local_cache=False)
        assert reader.get_token() == got[0]
        assert reader.invalidate(got[0])
        reader.close()
        assert fake_k2.exchanges == 1

        scripts = {}
        for port, client in clients.items():
            stats = client.info("commandstats")
            scripts[port] = sum(
                int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
                for name in ("eval", "evalsha")
            )
        print(f"[cluster] slot {slot} on {owner}; script calls per node: {scripts}")
        assert scripts[owner] >= 6
        assert all(calls == 0 for port, calls in scripts.items() if port != owner)
        # The keys themselves are on that node: the fence survives the invalidation.
        assert clients[owner].exists(keys.fence) == 1
        assert cluster.count_keys_in_slot(slot) >= 1
    finally:
        fake_k2.resume_tokens()
        holder.close()
        waiter.close()
        for client in clients.values():
            client.close()


def test_client_objects_work_as_well_as_urls(
    cluster: EmbeddedCluster, fake_k2: FakeK2Server
) -> None:
    """A RedisCluster the application built (its own options, its own lifetime) shares the
    namespace with a provider built from the URL; closing the provider leaves it open."""
    nodes = [ClusterNode(host, port) for host, port in cluster.startup_nodes]  # type: ignore[no-untyped-call]
    own = RedisCluster(startup_nodes=nodes, decode_responses=True)
    from_url = SharedTokenProvider(**provider_kwargs(cluster.cluster_url, fake_k2.base_url))
    given = SharedTokenProvider(
        **provider_kwargs(cluster.cluster_url, fake_k2.base_url, redis=own, local_cache=False)
    )
    try:
        token = given.get_token()  # decode_responses=True: str replies read the same
        assert from_url.get_token() == token
        assert given.invalidate(token)
        assert from_url.invalidate(token) is False
        fresh = from_url.get_token()
        assert given.get_token() == fresh
        assert fake_k2.exchanges == 2
        given.close()
        assert own.ping() is True  # still the application's
    finally:
        from_url.close()
        own.close()


def test_asyncio_and_blocking_providers_share_on_the_cluster(
    cluster: EmbeddedCluster, fake_k2: FakeK2Server
) -> None:
    kwargs = provider_kwargs(cluster.cluster_url, fake_k2.base_url)

    def subscribers(channel: str) -> int:
        client = plain(cluster.node_for_key(channel)[1])
        try:
            return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
        finally:
            client.close()

    asyncio.run(async_shares_with_sync(kwargs, fake_k2, subscribers))


@pytest.mark.fleet
def test_rollover_makes_one_exchange_per_refresh_period(
    fleet: Fleet, cluster: EmbeddedCluster, fake_k2: FakeK2Server
) -> None:
    fake_k2.expires_in = 4
    kwargs = provider_kwargs(
        cluster.cluster_url, fake_k2.base_url, refresh_ahead=2, min_validity=0.5
    )
    periods = 4
    with fleet.load([kwargs] * PROCESSES, period=0.005) as log:
        # The cold exchange, then one per 2 s refresh period: ordered by K2's own counter.
        assert fake_k2.wait_for_token_requests(1 + periods, timeout=30)
    issued = fake_k2.issued
    gaps = [later.issued_at - earlier.issued_at for earlier, later in itertools.pairwise(issued)]
    totals = summary(log)
    seen = {printed for _i, printed, _at in log.token_changes}
    print(
        f"[cluster] rollover {PROCESSES}x{THREADS}, 4 s tokens refreshed 2 s early: "
        f"{len(issued)} exchanges, gaps {', '.join(f'{g:.3f}' for g in gaps)} s; "
        f"{totals['calls']:.0f} calls, {totals['errors']:.0f} errors, "
        f"least lifetime handed out {totals['min_seconds_left']:.2f}s"
    )
    assert log.caller_errors() == []
    assert fake_k2.exchanges == fake_k2.token_requests == len(issued)
    assert len(issued) in (1 + periods, 2 + periods)  # one more may start as the run stops
    assert all(1.5 <= gap <= 2.5 for gap in gaps), gaps
    assert totals["min_seconds_left"] > 0
    assert len(seen) >= periods  # the whole fleet followed every rollover


@pytest.mark.fleet
def test_reshard_and_primary_kill_under_load(
    fleet: Fleet, cluster: EmbeddedCluster, fake_k2: FakeK2Server
) -> None:
    """Move the namespace's slot (twice), then kill its primary, while 8 processes call.

    Six processes keep a local copy and re-read Redis every 0.25 s (so they meet each fault);
    two have no local copy and ask Redis on every call, so their callers depend on the
    fallback while Redis fails. The circuit breaker retries Redis every second.

    While a slot migrates, every script of the namespace is refused (TRYAGAIN: the scripts
    name keys that do not exist, like the lock, and Redis cannot run a multi-key command on a
    slot whose keys are split between two nodes); redis-py retries for about 0.1 s. The
    standard reshard of a slot this small finishes within that; the second one is held open
    until the fleet has met the refusals, as a reshard of a slot with many keys would be.
    """
    base = provider_kwargs(
        cluster.cluster_url, fake_k2.base_url, local_max_age=0.25, redis_cooldown=1.0
    )
    direct = 2
    kwargs: list[dict[str, Any]] = [base] * (PROCESSES - direct) + [
        {**base, "local_cache": False}
    ] * direct
    namer = SharedTokenProvider(**base)
    token_key = namer.keys.token
    namer.close()
    slot = slot_for_key(token_key)
    figures: list[str] = []
    steps: list[Recovery] = []
    with fleet.load(kwargs, period=0.01) as log:
        assert log.wait_for(lambda got: got.agreed() is not None, 30)
        assert fake_k2.exchanges == 1

        # 1. Reshard: the standard IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE sequence.
        source = cluster.node_for_slot(slot)[1]
        target = next(port for port in cluster.primary_ports() if port != source)
        began = time.monotonic()
        moved = cluster.migrate_slot(slot, target)
        migrated = time.monotonic() - began
        steps.append(recover(base, fake_k2, log, began))
        assert cluster.node_for_slot(slot) == (HOST, target)
        assert _stored_digest(target, token_key) == digest(fake_k2.issued[-1].token)
        figures.append(
            f"reshard slot {slot} {source}->{target} ({moved} keys, {migrated:.2f}s): "
            f"{_faults(log, began)}; {steps[-1].line()}"
        )

        # 2. The same back, the migration held open until both direct processes fell back.
        began = time.monotonic()
        cluster.begin_slot_migration(slot, source)
        assert log.wait_for(lambda got: got.count("fallback", began) >= direct, 20)
        moved = cluster.move_slot_keys(slot, target, source)
        cluster.finish_slot_migration(slot, target, source)
        migrated = time.monotonic() - began
        steps.append(recover(base, fake_k2, log, began))
        assert _stored_digest(source, token_key) == digest(fake_k2.issued[-1].token)
        figures.append(
            f"held-open reshard {target}->{source} ({moved} keys, {migrated:.2f}s): "
            f"{_faults(log, began)}; {steps[-1].line()}"
        )

        # 3. SIGKILL the primary serving the slot; its replica takes over.
        began = time.monotonic()
        (replica,) = cluster.kill_primary(source)
        new = cluster.wait_for_failover(source, timeout=20)
        failed_over = time.monotonic() - began
        steps.append(recover(base, fake_k2, log, began))
        assert new == (HOST, replica)
        assert _stored_digest(replica, token_key) == digest(fake_k2.issued[-1].token)
        figures.append(
            f"kill primary {source} (failover to {replica} in {failed_over:.2f}s): "
            f"{_faults(log, began)}; {steps[-1].line()}"
        )
    totals = summary(log)
    for line in figures:
        print(f"[cluster] {line}")
    print(
        f"[cluster] fault run: {totals['calls']:.0f} calls, {totals['errors']:.0f} caller errors, "
        f"{fake_k2.exchanges} exchanges ({totals['fallback']:.0f} of them process-local "
        f"fallbacks), {totals['redis_error']:.0f} Redis errors seen by providers"
    )
    assert log.caller_errors() == []
    assert [step.rollover_exchanges for step in steps] == [1, 1, 1]
    # Shared exchanges: the cold one and the forced rollovers, plus one per step at most if a
    # fault lost the stored token. Fallbacks happen only in the processes without a local copy
    # (the others keep serving theirs), at most once per caller thread and step: threads that
    # were already past the local check when the circuit opened each run their own.
    lost = sum(step.lost_token for step in steps)
    fallback_by = {index for kind, index, _at in log.hooked if kind == "fallback"}
    assert fallback_by <= set(range(PROCESSES - direct, PROCESSES))
    assert totals["fallback"] <= direct * THREADS * len(steps)
    assert fake_k2.exchanges - totals["fallback"] <= 1 + len(steps) + lost


def _stored_digest(port: int, key: str) -> str:
    """The digest field of the value stored under ``key`` on the node at ``port``."""
    client = plain(port)
    try:
        raw = client.get(key)
    finally:
        client.close()
    assert isinstance(raw, bytes), f"no token on {port}"
    return raw.split(b":", 2)[1].decode()


def _faults(log: FleetLog, since: float) -> str:
    """What the fleet met from ``since`` on (the step and its recovery)."""
    errors = [e for e in log.caller_errors() if e[2] >= since]
    outages = log.outages(since)
    outage = f", provider outages {outages[0]:.1f}-{outages[-1]:.1f}s" if outages else ""
    return (
        f"{len(errors)} caller errors, {log.count('redis_error', since)} Redis errors, "
        f"{log.count('fallback', since)} fallback exchanges{outage}, "
        f"{log.count('exchange_ok', since)} exchanges (the forced rollover included)"
    )


def test_the_backplane_works_on_the_cluster(
    cluster: EmbeddedCluster, fake_k2: FakeK2Server
) -> None:
    backplane_drops_copies(cluster.cluster_url, fake_k2)
