"""The embedded Cluster and Sentinel launchers, exercised with redis-py's own clients.

Every server here is a child process started by the launcher under test and stopped by PID
through a context manager or fixture, so a failing assertion still tears everything down.
Timings (cluster start, failovers) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from k2_shared_token.testing.topologies import (
    HOST,
    SLOT_COUNT,
    EmbeddedCluster,
    EmbeddedSentinel,
    TopologyTimeoutError,
    cluster_port,
    parse_sentinel_url,
    slot_for_key,
)
from tests.conftest import wait_until

TAG = "{abc}"


def one_key_per_slot() -> dict[int, str]:
    """A key for each of the 16384 slots (found by hashing candidates locally)."""
    keys: dict[int, str] = {}
    candidate = 0
    while len(keys) < SLOT_COUNT:
        key = f"k:{candidate}"
        keys.setdefault(slot_for_key(key), key)
        candidate += 1
    return keys


def cluster_client(cluster: EmbeddedCluster) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes],
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
    )


def plain(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=2.0)


def next_message(pubsub: redis.client.PubSub, timeout: float = 5.0) -> dict[str, object]:
    """The next 'message' on ``pubsub``, waiting on the socket (not sleeping) up to timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            return message
    raise AssertionError(f"no pub/sub message within {timeout}s")


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=3) as started:
        print(f"\n[topologies] 3-primary cluster stable in {started.started_in:.2f}s")
        yield started


@pytest.fixture
def client(cluster: EmbeddedCluster) -> Iterator[RedisCluster]:
    rc = cluster_client(cluster)
    yield rc
    rc.close()


# -- helpers with no server ------------------------------------------------------------------


def test_cluster_port_leaves_room_for_the_bus() -> None:
    port = cluster_port()
    assert port + 10000 <= 65535
    assert port <= 55535


def test_sentinel_url_round_trip() -> None:
    url = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/k2primary/2"
    assert parse_sentinel_url(url) == ([(HOST, 26379), (HOST, 26380)], "k2primary", 2)
    assert parse_sentinel_url("redis+sentinel://h:1/m")[1:] == ("m", 0)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://h:1/m", "not a redis\\+sentinel"),
        ("redis+sentinel://h/m", "not host:port"),
        ("redis+sentinel://h:1/", "master name"),
        ("redis+sentinel://h:1/m/0/x", "master name"),
        ("redis+sentinel://user:pw@h:1/m", "credentials"),
    ],
)
def test_sentinel_url_errors(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_sentinel_url(url)


# -- cluster ---------------------------------------------------------------------------------


def test_a_cluster_that_never_settles_leaves_nothing_behind() -> None:
    """A start that times out stops every process it spawned and removes their dirs."""
    spawned: list[tuple[int, Path]] = []

    class Recording(EmbeddedCluster):
        def _form(self) -> None:
            for node in self.nodes.values():
                assert node.pid is not None
                spawned.append((node.pid, Path(node._dir.name)))
            super()._form()

    # A 6.2 primary reports cluster_state:ok only 2 s after start, so 0.3 s cannot be met.
    with pytest.raises(TopologyTimeoutError, match="cluster agreement"):
        Recording(primaries=3, start_timeout=0.3).start()
    assert len(spawned) == 3
    for pid, directory in spawned:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not directory.exists()


def test_cluster_shape_and_addresses(cluster: EmbeddedCluster) -> None:
    slot_map = cluster.wait_until_stable(5)
    assert [(start, end) for start, end, _p, _r in slot_map] == [
        (0, 5460),
        (5461, 10921),
        (10922, 16383),
    ]
    assert {primary for *_x, primary, _r in slot_map} == set(cluster.startup_nodes)
    assert cluster.node_for_slot(0) == slot_map[0][2]
    assert cluster.node_for_slot(SLOT_COUNT - 1) == slot_map[-1][2]
    from_url = RedisCluster.from_url(cluster.url)
    try:
        assert {(n.host, n.port) for n in from_url.get_primaries()} == set(cluster.startup_nodes)
    finally:
        from_url.close()


def test_set_and_get_on_every_slot(cluster: EmbeddedCluster, client: RedisCluster) -> None:
    keys = one_key_per_slot()
    pipe = client.pipeline(transaction=False)
    for slot, key in keys.items():
        pipe.set(key, str(slot), ex=60)
    assert all(pipe.execute())
    pipe = client.pipeline(transaction=False)
    for key in keys.values():
        pipe.get(key)
    assert pipe.execute() == [str(slot) for slot in keys]
    # Each key sits on the primary that owns its slot, as the launcher reports it.
    for slot in (0, 5460, 5461, 10921, 10922, SLOT_COUNT - 1):
        port = cluster.node_for_slot(slot)[1]
        direct = plain(port)
        try:
            assert direct.get(keys[slot]) == str(slot)
        finally:
            direct.close()


def test_eval_routes_by_its_keys_hash_tag(cluster: EmbeddedCluster, client: RedisCluster) -> None:
    script = """
    redis.call('SET', KEYS[1], ARGV[1])
    redis.call('SET', KEYS[2], ARGV[1] .. '!')
    return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
    """
    a, b = f"k2:{TAG}:token", f"k2:{TAG}:lock"
    assert client.eval(script, 2, a, b, "v1") == ["v1", "v1!"]
    # It ran on the node that owns {abc}: the keys are there.
    owner = plain(cluster.node_for_key(TAG)[1])
    try:
        assert owner.mget(a, b) == ["v1", "v1!"]
    finally:
        owner.close()
    # A registered Script (EVALSHA, NOSCRIPT fallback to SCRIPT LOAD) routes the same way.
    registered = client.register_script(script)
    assert registered(keys=[a, b], args=["v2"]) == ["v2", "v2!"]
    # Keys in different slots are refused by redis-py before anything is sent.
    with pytest.raises(redis.exceptions.RedisClusterException):
        client.eval(script, 2, "{x}a", "{y}b", "v")


def test_pubsub_across_nodes(cluster: EmbeddedCluster, client: RedisCluster) -> None:
    channel = f"k2:{TAG}:ready"
    key_owner = cluster.node_for_key(TAG)[1]
    other = next(port for port in cluster.ports if port != key_owner)
    # Default ClusterPubSub: the node is picked from the channel's slot on first subscribe.
    by_slot = client.pubsub()
    # Pinned to a node that does NOT own the script's keys.
    pinned = client.pubsub(node=client.get_node(host=HOST, port=other))
    try:
        by_slot.subscribe(channel)
        pinned.subscribe(channel)
        assert by_slot.get_pubsub_node().port == cluster.node_for_key(channel)[1]
        assert pinned.get_pubsub_node().port == other
        for sub in (by_slot, pinned):  # wait for both subscribe confirmations
            confirmation = sub.get_message(timeout=5.0)
            assert confirmation is not None
            assert confirmation["type"] == "subscribe"

        # Classic PUBLISH from the cluster client (sent to whichever node it picks).
        assert client.publish(channel, "from-client") >= 1
        for sub in (by_slot, pinned):
            assert next_message(sub)["data"] == "from-client"

        # PUBLISH inside a Lua script on the key owner reaches a subscriber on another node:
        # Redis 6.2 forwards classic PUBLISH over the cluster bus, scripts included.
        client.eval(
            "redis.call('SET', KEYS[1], ARGV[2]); return redis.call('PUBLISH', ARGV[1], ARGV[2])",
            1,
            f"k2:{TAG}:token",
            channel,
            "from-lua",
        )
        for sub in (by_slot, pinned):
            assert next_message(sub)["data"] == "from-lua"
    finally:
        by_slot.close()
        pinned.close()


def test_reshard_a_slot_under_a_live_client(cluster: EmbeddedCluster, client: RedisCluster) -> None:
    key, late = "{mig}:token", "{mig}:late"
    slot = slot_for_key(key)
    client.set(key, "before")
    assert client.get(key) == "before"  # the client's slot cache now points at the owner
    source = cluster.node_for_slot(slot)[1]
    target = next(port for port in cluster.primary_ports() if port != source)

    in_slot = cluster.count_keys_in_slot(slot)  # other tests may have left keys there

    assert cluster.begin_slot_migration(slot, target) == source
    assert client.get(key) == "before"  # still on the source
    assert cluster.move_slot_keys(slot, source, target) == in_slot
    assert client.get(key) == "before"  # source answers -ASK, redis-py follows it
    client.set(late, "written mid-migration")  # a missing key goes to the target via ASK
    cluster.finish_slot_migration(slot, source, target)

    assert cluster.node_for_slot(slot) == (HOST, target)
    assert client.mget(key, late) == ["before", "written mid-migration"]  # after -MOVED
    direct = plain(target)
    try:
        assert direct.mget(key, late) == ["before", "written mid-migration"]
    finally:
        direct.close()
    # The one-call form moves it back.
    assert cluster.migrate_slot(slot, source) == in_slot + 1
    assert client.get(key) == "before"


@pytest.mark.fleet
def test_cluster_failover_after_primary_kill() -> None:
    with EmbeddedCluster(primaries=3, replicas_per_primary=1) as cluster:
        print(f"\n[topologies] 3x1 cluster stable in {cluster.started_in:.2f}s")
        rc = cluster_client(cluster)
        try:
            key = f"k2:{TAG}:token"
            rc.set(key, "survives")
            cluster.wait_for_replication()
            old = cluster.node_for_key(key)[1]

            began = time.monotonic()
            (replica,) = cluster.kill_primary(old)
            new = cluster.wait_for_failover(old, timeout=20)
            elapsed = time.monotonic() - began
            print(f"[topologies] cluster failover {old} -> {new[1]} in {elapsed:.2f}s")

            assert new == (HOST, replica)
            assert cluster.node_for_key(key) == new
            assert rc.get(key) == "survives"  # the same client, after its node died
            assert rc.set(key, "after") is True

            # The dead node comes back as a replica of its replacement.
            cluster.restart(old)
            assert cluster.role(old) == "slave"
            assert cluster.replica_ports(replica) == [old]
        finally:
            rc.close()


@pytest.mark.fleet
def test_sentinel_failover_after_primary_kill() -> None:
    with EmbeddedSentinel() as topology:
        print(f"\n[topologies] sentinel topology ready in {topology.started_in:.2f}s")
        addresses, name, db = parse_sentinel_url(topology.url)
        assert addresses == topology.sentinel_addresses
        assert name == topology.master_name == "k2primary"
        sentinel = Sentinel(addresses, socket_timeout=1.0, decode_responses=True)
        master = sentinel.master_for(name, db=db, socket_timeout=1.0)
        replica = sentinel.slave_for(name, db=db, socket_timeout=1.0)
        try:
            old = topology.primary_port
            assert sentinel.discover_master(name) == (HOST, old)
            assert sentinel.discover_slaves(name) == [(HOST, p) for p in topology.replica_ports]
            master.set("k2:{1}:token", "survives")
            wait_until(
                lambda: replica.get("k2:{1}:token") == "survives", 5, "the replica to get the key"
            )

            began = time.monotonic()
            assert topology.kill_primary() == old
            new = topology.wait_for_failover(timeout=30)
            elapsed = time.monotonic() - began
            print(f"[topologies] sentinel failover {old} -> {new[1]} in {elapsed:.2f}s")

            assert new[0] == HOST
            assert new[1] != old
            assert sentinel.discover_master(name) == new
            assert master.get("k2:{1}:token") == "survives"  # same client, new primary
            assert master.set("k2:{1}:token", "after") is True
            assert topology.primary_port == new[1]
        finally:
            master.close()
            replica.close()
            for sentinel_client in sentinel.sentinels:
                sentinel_client.close()
