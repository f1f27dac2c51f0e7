"""Namespaces: what 1,000 K2 applications cost one Redis, warmed through one ProviderRegistry.

A multi-tenant service holds one provider per (base URL, client id) in a
:class:`~k2_shared_token.ProviderRegistry`: one Redis client for all of them. This
section builds N of them (N client ids on one fake K2 server, one embedded Redis), warms each
once, one after another, and asks:

- **memory per namespace**: Redis's ``used_memory`` (``INFO memory``) before and after, divided
  by N, also without the connections' buffers (noise; see :func:`used_memory`), which leaves the
  keys, their expiry entries and the keyspace's hash-table growth; and ``MEMORY USAGE`` of every
  key of every namespace (the keys alone), averaged;
- **keys per namespace**: which of a namespace's keys exist once its token is warm;
- **warm-up time**: building N providers, then N first ``get_token()`` calls (each one exchange
  and its Redis round trips), and a second registry (another process) reading all N back;
- **no cross-talk**: N distinct tokens, each one "active" when introspected at the fake server
  with its own client's credentials (which it answers only for the client it issued to), and
  the second registry reading exactly the same token per client id with no exchange.

Baselines from the same run: memory against a bare ``SET`` of a same-sized value under a
same-length key, with the same expiry, N times in an empty database of the same Redis (so the
same hash-table growth); warm-up time against N raw ``POST /oauth/token`` through the same HTTP
session, the exchange alone. A one-off primer namespace goes first so that neither the Lua script
cache nor the registry's first connection is counted against the N.

Run with ``python -m benchmarks namespaces`` or alone with ``python -m benchmarks.namespaces``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import requests

from benchmarks.common import (
    RunConfig,
    SectionResult,
    Verdict,
    command_stats,
    fmt_ms,
    md_table,
    run_standalone,
    stats_delta,
)
from k2_shared_token import ProviderRegistry
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis

N_FULL, N_QUICK = 1000, 100
PRIMER = "bench-ns-primer"
KEYS_TARGET = 2  # token and fence; the lock is released when the token is published
MEMORY_RATIO_TARGET = 2.0  # both keys of a namespace vs one bare SET of the token's size


def client_ids(n: int) -> dict[str, str]:
    """N client ids and secrets shaped like K2's (43 characters), plus the primer."""
    clients = {f"bench-ns-client-{i:06d}-{'x' * 20}": f"bench-ns-secret-{i:06d}" for i in range(n)}
    clients[PRIMER] = "bench-ns-primer-secret"
    return clients


@dataclass
class Memory:
    used_delta: int  # INFO memory used_memory, after - before
    clients_delta: int  # of which connections (CLIENT LIST tot-mem, summed)
    usage_sum: int  # MEMORY USAGE of every key, summed
    keys: int  # keys that exist

    def per(self, n: int) -> tuple[float, float, float, float]:
        """Per namespace: used_memory, used_memory without client buffers, MEMORY USAGE, keys."""
        stored = self.used_delta - self.clients_delta
        return self.used_delta / n, stored / n, self.usage_sum / n, self.keys / n


@dataclass
class Figures:
    n: int
    build_s: float
    warm_s: float
    reread_s: float
    raw_exchange_s: float
    ours: Memory
    baseline: Memory
    key_kinds: dict[str, int]
    value_bytes: float  # mean length of the stored token value
    commands: dict[str, int]  # Redis commands the warm-up ran (INFO commandstats delta)
    exchanges: int
    distinct_tokens: int
    own_active: int
    reread_same: int
    reread_exchanges: int
    connections: int  # command connections the registry holds open after the warm-up
    subscriptions: int  # and subscribed ones (the fleet backplane's)


def used_memory(client: Any) -> tuple[int, int]:
    """(``used_memory``, the part of it that is connection buffers and state).

    A connection's query buffer comes and goes (Redis allocates 16-32 KiB when it reads, frees
    it after a couple of idle seconds), which on its own is 30 B per namespace at N = 1,000:
    noise to subtract. ``CLIENT LIST`` computes each connection's ``tot-mem`` when asked;
    ``MEMORY STATS`` ``clients.normal`` would be the figure of the last cron pass, too stale.
    """
    used = int(client.info("memory")["used_memory"])
    return used, sum(int(c["tot-mem"]) for c in client.client_list())


def memory_usage(client: Any, keys: list[str]) -> tuple[int, int]:
    """(sum of MEMORY USAGE, keys that exist), pipelined; SAMPLES 0 measures whole values."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
    sizes = [s for s in pipe.execute() if s is not None]
    return sum(int(s) for s in sizes), len(sizes)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(config: RunConfig) -> SectionResult:
    n = N_QUICK if config.quick else N_FULL
    clients = client_ids(n)
    tenants = [cid for cid in clients if cid != PRIMER]
    with (
        EmbeddedRedis() as server,
        FakeK2Server(clients=clients) as k2,
        requests.Session() as http,
    ):
        admin = redis.Redis.from_url(server.url)
        baseline_db = redis.Redis.from_url(server.url.rsplit("/", 1)[0] + "/1")
        # One HTTP session for every provider: without it each provider keeps its own
        # keep-alive connection to K2, N of them (and N handler threads in the fake server).
        registry = ProviderRegistry(redis=server.url, base_url=k2.base_url, session=http)
        try:
            registry.get_token(PRIMER, clients[PRIMER])
            baseline_db.set("primer-a", "x")
            baseline_db.set("primer-b", "x")
            figures = _measure(registry, tenants, clients, admin, baseline_db, k2, http, server)
        finally:
            registry.close()
            admin.close()
            baseline_db.close()
    return _report(figures)


def _measure(
    registry: ProviderRegistry,
    tenants: list[str],
    clients: dict[str, str],
    admin: Any,
    baseline_db: Any,
    k2: FakeK2Server,
    http: requests.Session,
    server: EmbeddedRedis,
) -> Figures:
    n = len(tenants)
    exchanges_before = k2.exchanges
    memory_before = used_memory(admin)
    commands_before = command_stats(admin)
    providers, build_s = timed(lambda: [registry.provider(c, clients[c]) for c in tenants])
    tokens, warm_s = timed(lambda: [p.get_token() for p in providers])
    commands = stats_delta(commands_before, command_stats(admin), own_info_calls=1)
    memory_after = used_memory(admin)
    exchanges = k2.exchanges - exchanges_before
    ours_only = {admin.client_id(), baseline_db.client_id()}
    registry_clients = [c for c in admin.client_list() if int(c["id"]) not in ours_only]
    subscribed = [c for c in registry_clients if int(c.get("sub", 0)) or int(c.get("psub", 0))]
    connections = len(registry_clients) - len(subscribed)

    all_keys = [key for p in providers for key in p.keys.all]
    usage_sum, existing = memory_usage(admin, all_keys)
    kinds = {"token": 0, "lock": 0, "fence": 0, "backoff": 0, "failures": 0}
    pipe = admin.pipeline(transaction=False)
    for p in providers:
        for kind in kinds:
            pipe.exists(getattr(p.keys, kind))
    asked = [kind for _ in providers for kind in kinds]
    for kind, exists in zip(asked, pipe.execute(), strict=True):
        kinds[kind] += int(exists)
    ours = Memory(
        memory_after[0] - memory_before[0], memory_after[1] - memory_before[1], usage_sum, existing
    )

    # Baseline: the token's value size and expiry under a same-length key, in an empty db.
    pipe = admin.pipeline(transaction=False)
    for p in providers:
        pipe.get(p.keys.token)
        pipe.pttl(p.keys.token)
    replies = pipe.execute()
    values, ttls = replies[0::2], replies[1::2]
    base_keys = ["b2" + p.keys.token[2:] for p in providers]  # same length as "k2:{N}:token"
    base_before = used_memory(admin)
    for key, value, ttl in zip(base_keys, values, ttls, strict=True):
        baseline_db.set(key, b"v" * len(value), px=max(int(ttl), 1))  # one at a time, as ours
    base_after = used_memory(admin)
    base_sum, base_existing = memory_usage(baseline_db, base_keys)
    baseline = Memory(
        base_after[0] - base_before[0], base_after[1] - base_before[1], base_sum, base_existing
    )

    # Cross-talk: each token is introspected with its own client's credentials.
    own_active = 0
    for client_id, token in zip(tenants, tokens, strict=True):
        reply = http.post(
            k2.base_url + "/oauth/introspect",
            data={"client_id": client_id, "client_secret": clients[client_id], "token": token},
            timeout=10,
        )
        own_active += bool(reply.ok and reply.json().get("active"))

    # Another process: a second registry (its own client) reads every namespace back.
    exchanges_before = k2.exchanges
    with ProviderRegistry(redis=server.url, base_url=k2.base_url, session=http) as other:
        reread, reread_s = timed(lambda: [other.get_token(c, clients[c]) for c in tenants])
    reread_exchanges = k2.exchanges - exchanges_before

    # The exchange alone: N raw token requests through the same session.
    def raw() -> None:
        for client_id in tenants:
            http.post(
                k2.base_url + "/oauth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": client_id,
                    "client_secret": clients[client_id],
                },
                timeout=10,
            ).raise_for_status()

    _, raw_s = timed(raw)
    return Figures(
        n=n,
        build_s=build_s,
        warm_s=warm_s,
        reread_s=reread_s,
        raw_exchange_s=raw_s,
        ours=ours,
        baseline=baseline,
        key_kinds=kinds,
        value_bytes=sum(len(v) for v in values) / n,
        commands=commands,
        exchanges=exchanges,
        distinct_tokens=len(set(tokens)),
        own_active=own_active,
        reread_same=sum(a == b for a, b in zip(tokens, reread, strict=True)),
        reread_exchanges=reread_exchanges,
        connections=connections,
        subscriptions=len(subscribed),
    )


def _report(f: Figures) -> SectionResult:
    n = f.n
    used, stored, usage, keys = f.ours.per(n)
    base_used, base_stored, base_usage, base_keys = f.baseline.per(n)
    stored_ratio, usage_ratio = stored / base_stored, usage / base_usage
    memory_table = md_table(
        (
            "per namespace",
            "used_memory delta / N (B)",
            "without client buffers (B)",
            "MEMORY USAGE, mean (B)",
            "keys",
        ),
        [
            (
                "this library (token + fence)",
                f"{used:.0f}",
                f"{stored:.0f}",
                f"{usage:.0f}",
                f"{keys:.2f}",
            ),
            (
                "bare SET, same-sized value and key (baseline)",
                f"{base_used:.0f}",
                f"{base_stored:.0f}",
                f"{base_usage:.0f}",
                f"{base_keys:.2f}",
            ),
            ("ratio", "", f"{stored_ratio:.2f}x", f"{usage_ratio:.2f}x", ""),
        ],
    )
    kinds = ", ".join(f"{kind} {count}" for kind, count in f.key_kinds.items())
    warm_per, raw_per = f.warm_s / n, f.raw_exchange_s / n
    time_table = md_table(
        ("step", f"total for {n} (s)", "per namespace (ms)", "ratio"),
        [
            (
                "build N providers (`registry.provider()`)",
                f"{f.build_s:.3f}",
                fmt_ms(f.build_s / n, 3),
                "",
            ),
            (
                "warm N namespaces (first `get_token()` each, one after another)",
                f"{f.warm_s:.3f}",
                fmt_ms(warm_per, 3),
                f"{warm_per / raw_per:.2f}x",
            ),
            (
                "raw `POST /oauth/token`, same session (baseline)",
                f"{f.raw_exchange_s:.3f}",
                fmt_ms(raw_per, 3),
                "1.00x",
            ),
            (
                "second registry reads all N back (another process, cold)",
                f"{f.reread_s:.3f}",
                fmt_ms(f.reread_s / n, 3),
                "",
            ),
        ],
    )
    commands = ", ".join(f"{k} {v}" for k, v in sorted(f.commands.items(), key=lambda kv: -kv[1]))
    per_warm = sum(f.commands.values()) / n
    body = (
        f"{n} client ids on one fake K2 server (tokens of 3600 s), one `ProviderRegistry` on one "
        "embedded redis-server, one HTTP session; namespaces warmed one after another from a "
        "single thread, after a primer namespace (script cache, first connection).\n\n"
        f"{memory_table}\n\n"
        f"- The stored token value is {f.value_bytes:.0f} bytes on average "
        "(`<fence>:<sha256>:<json>`); the baseline stores as many bytes under a key of the same "
        "length with the same expiry, in an empty database of the same Redis.\n"
        "- *used_memory delta* is everything Redis allocated during the warm-up (or the "
        "baseline's SETs); *without client buffers* subtracts the growth of connection buffers "
        "(`CLIENT LIST` `tot-mem`, summed), which depends on what a connection last sent, not on "
        "what is stored, and leaves the keys, their expiry entries and the keyspace's hash-table "
        "growth; *MEMORY USAGE* is the keys alone.\n"
        f"- Keys present after warm-up, over all {n} namespaces: {kinds}.\n\n"
        f"{time_table}\n\n"
        f"- Redis commands during the warm-up: {per_warm:.1f} per namespace ({commands}); "
        f"connections the registry held open afterwards: {f.connections} for commands, "
        f"{f.subscriptions} subscribed (the backplane's, to every namespace's channel).\n"
        f"- Exchanges: {f.exchanges} for {n} namespaces; distinct tokens: {f.distinct_tokens}; "
        f"tokens the fake server calls active for their own client id: {f.own_active}/{n}; "
        f"second registry: {f.reread_same}/{n} identical tokens, {f.reread_exchanges} "
        "exchanges.\n"
    )
    crosstalk_ok = (
        f.exchanges == n
        and f.distinct_tokens == n
        and f.own_active == n
        and f.reread_same == n
        and f.reread_exchanges == 0
    )
    verdicts = [
        Verdict(
            "no cross-talk: one exchange per namespace, each token issued to its own client id, "
            "and read back per client id by another registry with no exchange",
            crosstalk_ok,
            f"{f.exchanges} exchanges, {f.distinct_tokens} distinct, {f.own_active}/{n} own, "
            f"{f.reread_same}/{n} read back, {f.reread_exchanges} re-exchanges",
        ),
        Verdict(
            f"{KEYS_TARGET} Redis keys per warm namespace (token and fence)",
            f.ours.keys == KEYS_TARGET * n,
            f"{keys:.2f} keys per namespace",
        ),
        Verdict(
            f"Redis memory per namespace at most {MEMORY_RATIO_TARGET:g}x a bare SET of the "
            "same-sized token (used_memory delta without client buffers)",
            stored_ratio <= MEMORY_RATIO_TARGET,
            f"{stored:.0f} B vs {base_stored:.0f} B, {stored_ratio:.2f}x",
        ),
        Verdict(
            "one Redis connection for the whole registry's commands, and one subscription "
            "(sequential warm-up)",
            f.connections == 1 and f.subscriptions == 1,
            f"{f.connections} command connection(s), {f.subscriptions} subscribed",
        ),
    ]
    return SectionResult("namespaces", f"Namespaces ({n} in one Redis)", body, verdicts)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: this section only, written to benchmarks/results/namespaces.md."""
    return run_standalone(
        "namespaces",
        lambda config, _args: run(config),
        argv,
        quick_help=f"{N_QUICK} namespaces (default {N_FULL})",
    )


if __name__ == "__main__":
    sys.exit(main())
