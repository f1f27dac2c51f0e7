"""Tenants: 10,000 client ids in one process, through one ProviderRegistry, on one Redis.

A multi-tenant service holds one provider per (base URL, client id). This section builds N of
them (N client ids on one fake K2 server, one embedded Redis, one HTTP session, one registry),
warms each once, one after another, and asks what the process pays for holding them and what
happens when all of them come due for their early refresh at the same moment:

- **library threads**: OS threads of this process, counted as entries of ``/proc/self/task``
  (which also sees threads started with ``_thread.start_new_thread``, invisible to
  ``threading`` until they name themselves), before the registry is built and at every later
  sample point; the threads the library created are the largest count seen minus that baseline.
  The fake K2 server runs in a process of its own (its handler threads are not ours to count;
  its own thread count is reported apart), and the harness starts its only thread, the
  watchdog, before the baseline, as the embedded Redis starts its log drain: neither is charged
  to the library.
- **in-process memory per idle tenant**: ``tracemalloc`` traced bytes over the last
  ``TRACED_MAX`` tenants warmed (all of them when N is smaller), the others already warm:
  tracing slows every allocation several times over, and what it measures this way is what one
  more tenant costs at that scale. A primer tenant goes first, so the registry's one Redis
  client, HTTP connection and backplane thread are not divided among the tenants. Read after a
  ``gc.collect()`` with the tokens held, and again once the library's idle check
  (``local_idle``, set for the run when this library has the setting) has dropped the copies no
  call used; the harness's own lists are subtracted, and the tokens are the very strings the
  providers hold.
- **Redis memory per tenant**: ``INFO memory`` ``used_memory`` delta over the warm-up divided
  by N, also without the connections' buffers (as in the namespaces section, whose
  :func:`~benchmarks.namespaces.used_memory` this reuses).
- **warm-call cost**: ``get_token()`` round-robin over a list of all N providers against the
  same loop over a list holding the first provider N times (same list length, same loop, same
  process, same moment): the difference is what N tenants cost the hot path (the CPU caches
  holding N copies instead of one). Rounds alternate between the two lists, in ABBA order, and
  each figure is the median of the rounds, so drift of the machine hits both sides.
  ``tracemalloc`` is stopped first: it would charge every allocation on the hot path. The
  backplane has every namespace's copy confirmed against Redis once it subscribes, so the first
  calls after the warm-up kick background re-reads; those are let finish before the rounds, and
  the Redis commands run during the rounds are reported (none means nothing ran behind them).
- **due together**: every token is issued with the same lifetime and the providers'
  ``refresh_ahead`` is half of it (the most the library's windows allow for that lifetime), so
  token *i*, issued at *t_i*, enters its refresh window at *t_i* + lifetime/2 and stays
  usable until a second before it expires. The section waits until the last one has entered
  (the due instant: every tenant is due, none has been asked since), then calls
  ``get_token()`` once on each, which hands out the current token (read back from Redis, the
  same due token, where the idle check dropped the copy meanwhile) and kicks the background
  refresh, and measures
  the time until every provider holds a new token (its ``seconds_left()``, read-only, back above
  the window), the exchanges the fake K2 server counted (N expected), and the peak number of
  token requests it served at once, against the registry's ``max_exchanges`` bound. For this
  phase the fake server answers each token request after a delay (``DUE_LATENCY``, standing in
  for K2's own), so that requests which run together overlap visibly instead of finishing in
  microseconds.

Whatever the library logs at warning level or above is counted by kind and reported, so a
phase that made it complain (a Redis pool exhausted by too many refresh threads, say) says so.
The schedule is checked, not assumed: the fake server's exchange count must not move between
the end of the warm-up and the due instant (no refresh started early, no token re-fetched by
the memory or warm-call phases), and every phase runs under a watchdog deadline, so a run that
wedges ends by itself with the figures measured so far.

Run with ``python -m benchmarks tenants`` or alone with ``python -m benchmarks.tenants``
(``--quick``, ``--tenants N``).
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import gc
import logging
import math
import os
import re
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

from benchmarks.common import (
    CTX,
    RunConfig,
    SectionResult,
    Verdict,
    command_stats,
    fmt_us,
    md_table,
    run_standalone,
    spawned,
    stats_delta,
)
from benchmarks.namespaces import used_memory
from k2_shared_token import ProviderRegistry, SharedTokenProvider
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis

N_FULL, N_QUICK = 10_000, 500
PRIMER = "bench-tenant-primer"
# The registry's process-wide bound on token requests in flight, passed in one place (run()).
MAX_EXCHANGES = 8
THREADS_TARGET = 8
WARM_RATIO_TARGET = 1.2
MIN_VALIDITY = 1.0  # s: the due tokens stay usable until a second before they expire
DUE_LATENCY = 0.02  # s per token request at the fake server during the due phase
CALLS_PER_ROUND = 100_000  # get_token() calls per warm-call round (whole passes over N)
ROUNDS_FULL, ROUNDS_QUICK = 9, 5
TRACED_MAX = 1000  # tenants warmed under tracemalloc: the last ones, with the others warm
POLL = 0.02  # s between looks at the providers while waiting
CONTROL_TIMEOUT = 30.0  # s for one answer from the fake K2 process


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Every duration of one run, derived from N, so that one schedule holds for any N.

    ``warm_budget`` bounds the warm-up (an exchange per tenant, the last ``traced`` of them
    under tracemalloc, which slows each one several times over); the copies' ``local_idle`` is
    as long, so that no copy is dropped before the "held" reading; ``fresh`` (half the token
    lifetime) covers the warm-up, the idle drop, the re-warm and the warm-call rounds, so that
    no token is due before the due instant. Whether the schedule held is checked afterwards.
    """

    n: int
    traced: int
    rounds: int
    warm_budget: float
    local_idle: float
    fresh: float
    due_deadline: float

    @classmethod
    def for_tenants(cls, n: int, quick: bool) -> Plan:
        traced = min(n, TRACED_MAX)
        warm_budget = math.ceil(3.0 + (n - traced) * 0.008 + traced * 0.02)
        rewarm_and_rounds = 15.0 + n * 0.002
        fresh = math.ceil(
            warm_budget + warm_budget + 5.0 + rewarm_and_rounds
        )
        # The exchanges one after another at the fake server's latency, plus slack: the bound
        # (however few workers it leaves) must still finish them all.
        due_deadline = 60.0 + n * (DUE_LATENCY + 0.01)
        rounds = ROUNDS_QUICK if quick else ROUNDS_FULL
        return cls(n, traced, rounds, warm_budget, warm_budget, fresh, due_deadline)

    @property
    def lifetime(self) -> int:
        return int(2 * self.fresh)


# --------------------------------------------------------------------------- the fake K2 process


def _serve_fake_k2(conn: Connection, clients: dict[str, str], expires_in: int) -> None:
    """The fake K2 server in a process of its own: its handler threads are not the library's,
    and its CPU time is not taken from the process under test. Controlled over ``conn``."""
    with FakeK2Server(clients=clients, expires_in=expires_in) as k2:
        conn.send(k2.base_url)
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone
                return
            op, name, value = message
            if op == "stop":
                conn.send(None)
                return
            answer: Any = None
            try:
                if op == "get":
                    answer = getattr(k2, name)
                elif op == "set":
                    setattr(k2, name, value)
                elif op == "reset":
                    k2.reset_counters()
                else:
                    answer = threading.active_count()
            except Exception as exc:  # the parent raises it: a typo must not wedge the run
                answer = exc
            conn.send(answer)


class RemoteK2:
    """The parent's handle on the fake K2 process: a few reads and settings over a pipe."""

    def __init__(self, conn: Connection, pid: int | None) -> None:
        self._conn = conn
        self.pid = pid
        self.base_url = str(self._answer())

    def _answer(self) -> Any:
        if not self._conn.poll(CONTROL_TIMEOUT):
            raise TimeoutError("the fake K2 process did not answer")
        return self._conn.recv()

    def _ask(self, op: str, name: str = "", value: Any = None) -> Any:
        self._conn.send((op, name, value))
        answer = self._answer()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get(self, name: str) -> int:
        return int(self._ask("get", name))

    def set(self, name: str, value: float) -> None:
        self._ask("set", name, value)

    def reset_counters(self) -> None:
        self._ask("reset")

    def threads(self) -> int:
        return int(self._ask("threads"))

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            self._ask("stop")


# --------------------------------------------------------------------------- threads and watchdog


def os_threads() -> int:
    """This process's OS threads: every entry of /proc/self/task, however it was started."""
    return len(os.listdir("/proc/self/task"))


def thread_names(skip: set[int]) -> dict[str, int]:
    """Threads known to ``threading`` (a thread started with ``_thread`` appears once it names
    itself) that are not in ``skip``, by name with the namespace hash folded."""
    out: dict[str, int] = {}
    for thread in threading.enumerate():
        if thread.ident in skip:
            continue
        name = re.sub(r"[0-9a-f]{16}$", "<namespace>", thread.name)
        out[name] = out.get(name, 0) + 1
    return out


class LogCounter(logging.Handler):
    """Counts the library's warnings and errors by kind (namespace hashes folded), so a phase
    that made the library complain says so in the report instead of scrolling past on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.kinds: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = re.sub(r"[0-9a-f]{16}", "<namespace>", record.getMessage())
        text = re.sub(r"\d+(\.\d+)?", "<n>", text)[:240]
        self.kinds[text] = self.kinds.get(text, 0) + 1


class PhaseOverrunError(Exception):
    """A phase outlived its deadline; the watchdog interrupted it."""


class Watchdog:
    """One thread, started before the thread baseline, that bounds every phase in time.

    A phase that outlives its deadline gets a KeyboardInterrupt in the main thread
    (``_thread.interrupt_main``), which :meth:`phase` turns into :class:`PhaseOverrunError`: the
    library's calls are built to be interrupted, so the servers are still stopped on the way out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._fired: str | None = None
        self._stop = threading.Event()
        self._current = ""
        self._thread = threading.Thread(target=self._watch, name="bench-watchdog", daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                overdue = self._deadline is not None and time.monotonic() > self._deadline
                if overdue:
                    self._fired, self._deadline = self._current, None
            if overdue:
                _thread.interrupt_main()

    @contextlib.contextmanager
    def phase(self, name: str, seconds: float) -> Iterator[None]:
        with self._lock:
            self._current, self._deadline, self._fired = name, time.monotonic() + seconds, None
        try:
            yield
        except KeyboardInterrupt:
            if self._fired is None:
                raise
            raise PhaseOverrunError(f"{name} overran its deadline of {seconds:.0f} s") from None
        finally:
            with self._lock:
                self._deadline = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


# --------------------------------------------------------------------------- figures


@dataclass
class Figures:
    n: int
    plan: Plan
    threads_before: int = 0
    threads_samples: dict[str, int] = field(default_factory=dict)
    new_thread_names: dict[str, int] = field(default_factory=dict)
    k2_threads_peak: int = 0
    warm_s: float | None = None
    warm_untraced_s: float | None = None
    warm_traced_s: float | None = None
    settle_s: float | None = None
    round_commands: int | None = None  # Redis commands during the warm-call rounds
    warm_exchanges: int = 0
    memory_held: float | None = None  # traced bytes per tenant, copies held
    held_at_reading: int = 0
    memory_idle: float | None = None
    held_after_idle: int = 0
    idle_wait_s: float = 0.0
    top_files: list[tuple[str, float]] = field(default_factory=list)
    redis_used: float | None = None  # bytes per tenant
    redis_stored: float | None = None  # without client buffers
    rewarm_s: float | None = None
    early_exchanges: int | None = None  # between the end of the warm-up and the due instant
    many_s: float | None = None  # s per call, N tenants
    one_s: float | None = None
    ratio: float | None = None
    alone_s: float | None = None  # s per call of the primer while it was the only tenant
    floor_ratio: float | None = None  # a dict of N (token, expiry) pairs, N keys vs one
    stale_at_due: int = 0  # held copies inside their refresh window at the due instant
    fresh_at_due: int = 0  # held copies still above it (none, if the schedule held)
    kick_s: float | None = None
    due_s: float | None = None  # due instant to every tenant holding a new token
    refreshed: int = 0
    changed: int = 0
    due_exchanges: int = 0
    peak: int | None = None
    overrun: str | None = None
    warnings: dict[str, int] = field(default_factory=dict)  # the library's, by kind

    @property
    def library_threads(self) -> int | None:
        if not self.threads_samples:
            return None
        return max(self.threads_samples.values()) - self.threads_before


def client_ids(n: int) -> dict[str, str]:
    """N client ids and secrets shaped like K2's (43 characters), plus the primer."""
    clients = {f"bench-tenant-{i:06d}-{'x' * 23}": f"bench-tenant-secret-{i:06d}" for i in range(n)}
    clients[PRIMER] = "bench-tenant-primer-secret"
    return clients


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def wait_until(
    done: Callable[[], bool], deadline: float, sample: Callable[[], None] | None = None
) -> bool:
    while True:
        if sample is not None:
            sample()
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def held_count(providers: list[SharedTokenProvider]) -> int:
    """Providers holding a local copy (``seconds_left()`` reads it without touching it)."""
    return sum(p.seconds_left() is not None for p in providers)


def time_round(providers: list[SharedTokenProvider], passes: int) -> float:
    """Seconds per ``get_token()`` over ``passes`` passes of the list."""
    start = time.perf_counter()
    for _ in range(passes):
        for p in providers:
            p.get_token()
    return (time.perf_counter() - start) / (passes * len(providers))


def time_floor(table: dict[str, tuple[str, float]], keys: list[str], passes: int) -> float:
    """The same loop over the least any per-tenant cache does: a dict lookup of the tenant's
    (token, expiry) and one clock comparison. Its ratio, N keys against one key N times, is
    what the CPU's caches charge for N tenants whatever the library does."""
    now = time.monotonic
    start = time.perf_counter()
    for _ in range(passes):
        for key in keys:
            _token, expires = table[key]
            if now() >= expires:
                raise AssertionError("the floor's entries never expire")
    return (time.perf_counter() - start) / (passes * len(keys))


# --------------------------------------------------------------------------- the run


def run(config: RunConfig, n: int | None = None) -> SectionResult:
    n = n or (N_QUICK if config.quick else N_FULL)
    plan = Plan.for_tenants(n, config.quick)
    clients = client_ids(n)
    tenants = [cid for cid in clients if cid != PRIMER]
    f = Figures(n=n, plan=plan)
    watchdog = Watchdog()
    parent_conn, child_conn = CTX.Pipe()
    logs = LogCounter()
    library_log = logging.getLogger("k2_shared_token")
    library_log.addHandler(logs)
    try:
        with (
            EmbeddedRedis() as server,
            spawned(_serve_fake_k2, [(child_conn, clients, plan.lifetime)]) as procs,
        ):
            k2 = RemoteK2(parent_conn, procs[0].pid)
            admin = redis.Redis.from_url(server.url)
            try:
                f.threads_before = os_threads()
                baseline_idents = {t.ident for t in threading.enumerate() if t.ident}
                # No session: the providers share the library's one per base URL.
                registry = ProviderRegistry(
                    redis=server.url,
                    base_url=k2.base_url,
                    refresh_ahead=plan.fresh,
                    min_validity=MIN_VALIDITY,
                    local_max_age=plan.lifetime,
                    local_idle=plan.local_idle,
                    max_exchanges=MAX_EXCHANGES,
                )
                try:
                    _measure(f, registry, tenants, clients, k2, admin, watchdog)
                except PhaseOverrunError as exc:
                    f.overrun = str(exc)
                finally:
                    f.new_thread_names = thread_names(baseline_idents)
                    registry.close()
            finally:
                admin.close()
                k2.stop()
    finally:
        library_log.removeHandler(logs)
        f.warnings = logs.kinds
        watchdog.close()
        parent_conn.close()
        child_conn.close()
    return _report(f)


def _measure(
    f: Figures,
    registry: ProviderRegistry,
    tenants: list[str],
    clients: dict[str, str],
    k2: RemoteK2,
    admin: Any,
    watchdog: Watchdog,
) -> None:
    plan, n = f.plan, f.n

    def sample(label: str) -> None:
        f.threads_samples[label] = max(f.threads_samples.get(label, 0), os_threads())

    # The primer: the registry's Redis connection, its HTTP connection, the backplane.
    passes = max(1, CALLS_PER_ROUND // n)
    with watchdog.phase("primer", 60):
        registry.get_token(PRIMER, clients[PRIMER])
        primer = registry.provider(PRIMER)
        primer.wait_for_refresh(10.0)
        # Its warm call while it is the only tenant: what a process of one tenant pays.
        alone = [primer] * n
        time_round(alone, 1)
        f.alone_s = statistics.median(time_round(alone, passes) for _ in range(plan.rounds))
    sample("after the primer")
    redis_before = used_memory(admin)
    exchanges_before = k2.get("exchanges")

    with watchdog.phase("warm-up", plan.warm_budget * 3):
        start = time.perf_counter()
        untraced = n - plan.traced
        providers = [registry.provider(c, clients[c]) for c in tenants[:untraced]]
        tokens = [p.get_token() for p in providers]
        f.warm_untraced_s = time.perf_counter() - start
        # The last ones under tracemalloc: what one more tenant costs with the others warm.
        tracemalloc.start()
        base = traced()
        start_traced = time.perf_counter()
        sample_providers = [registry.provider(c, clients[c]) for c in tenants[untraced:]]
        sample_tokens = [p.get_token() for p in sample_providers]
        f.warm_traced_s = time.perf_counter() - start_traced
        f.warm_s = time.perf_counter() - start
        warm_end = time.monotonic()
        harness = sys.getsizeof(sample_providers) + sys.getsizeof(sample_tokens)
        f.held_at_reading = held_count(sample_providers)
        f.memory_held = (traced() - base - harness) / plan.traced
        snapshot = tracemalloc.take_snapshot()
    f.top_files = [
        (_short(stat.traceback[0].filename), stat.size / plan.traced)
        for stat in snapshot.statistics("filename")[:6]
    ]
    providers += sample_providers
    tokens += sample_tokens
    del snapshot
    f.warm_exchanges = k2.get("exchanges") - exchanges_before
    redis_after = used_memory(admin)
    f.redis_used = (redis_after[0] - redis_before[0]) / n
    f.redis_stored = ((redis_after[0] - redis_after[1]) - (redis_before[0] - redis_before[1])) / n
    sample("after warming every tenant")

    # Idle: no call for local_idle; the library's idle check drops the copies nobody used.
    with watchdog.phase("idle drop", 2 * plan.local_idle + 30):
        idle_start = time.monotonic()
        wait_until(
            lambda: held_count(providers) == 0,
            warm_end + plan.local_idle + 5,
            lambda: sample("while idle (waiting for the idle drop)"),
        )
        f.idle_wait_s = time.monotonic() - idle_start
    f.held_after_idle = held_count(providers)
    f.memory_idle = (traced() - base - harness) / plan.traced
    tracemalloc.stop()

    # Re-warm (dropped copies are read back from Redis, not exchanged), then the rounds.
    with watchdog.phase("warm calls", 60 + n * 0.01):
        start = time.perf_counter()
        tokens = [p.get_token() for p in providers]
        f.rewarm_s = time.perf_counter() - start
        # The backplane has each namespace's copy confirmed against Redis once it subscribes
        # (an announcement may have passed before): the first call after that kicks a re-read
        # off the callers' path. Let those finish, so the rounds time warm calls only.
        start = time.perf_counter()
        for _ in range(2):  # a second pass: a namespace subscribed late is confirmed late
            for p in providers:
                p.wait_for_refresh(10.0)
            time_round(providers, 1)
        f.settle_s = time.perf_counter() - start
        many, one = providers, [providers[0]] * n
        time_round(one, 1)
        far = float("inf")
        table = {c: (t, far) for c, t in zip(tenants, tokens, strict=True)}
        keys, one_key = list(table), [tenants[0]] * n
        rounds: dict[str, Callable[[], float]] = {
            "many": lambda: time_round(many, passes),
            "one": lambda: time_round(one, passes),
            "floor many": lambda: time_floor(table, keys, passes),
            "floor one": lambda: time_floor(table, one_key, passes),
        }
        commands_before = command_stats(admin)
        samples: dict[str, list[float]] = {name: [] for name in rounds}
        for i in range(plan.rounds):
            for name in rounds if i % 2 == 0 else reversed(rounds):
                samples[name].append(rounds[name]())
        f.round_commands = sum(stats_delta(commands_before, command_stats(admin), 1).values())
        f.many_s = statistics.median(samples["many"])
        f.one_s = statistics.median(samples["one"])
        f.ratio = f.many_s / f.one_s
        f.floor_ratio = statistics.median(samples["floor many"]) / statistics.median(
            samples["floor one"]
        )
    sample("after the warm calls")

    # Due together: every token's refresh window is open by the due instant.
    due_at = warm_end + plan.fresh + 1.0
    with watchdog.phase("wait for the due instant", max(0.0, due_at - time.monotonic()) + 30):
        wait_until(
            lambda: time.monotonic() >= due_at,
            due_at + 5,
            lambda: sample("waiting for the due instant"),
        )
    f.early_exchanges = k2.get("exchanges") - exchanges_before - f.warm_exchanges
    threshold = plan.fresh  # seconds left: at most this for a due token, about 2x for a new one
    left = [p.seconds_left() for p in providers]
    f.stale_at_due = sum(s is not None and s <= threshold for s in left)
    f.fresh_at_due = sum(s is not None and s > threshold for s in left)
    k2.set("latency", DUE_LATENCY)
    k2.reset_counters()
    with watchdog.phase("due together", plan.due_deadline + 30):
        start = time.perf_counter()
        for p in providers:
            p.get_token()  # the current token, at once; kicks the background refresh
        f.kick_s = time.perf_counter() - start

        def refreshed() -> int:
            return sum((s := p.seconds_left()) is not None and s > threshold for p in providers)

        done = wait_until(
            lambda: refreshed() == n,
            time.monotonic() + plan.due_deadline,
            lambda: sample("during the due-together refresh"),
        )
        elapsed = time.perf_counter() - start
        f.due_s = elapsed if done else None
        f.refreshed = refreshed()
        f.due_exchanges = k2.get("exchanges")
        f.peak = k2.get("peak_in_flight")
        f.k2_threads_peak = k2.threads()
    sample("after the due-together refresh")
    f.changed = sum(p.get_token() != old for p, old in zip(providers, tokens, strict=True))
    time.sleep(0.5)  # threads that end with their job are gone by now; the rest stay
    sample("after the due-together refresh")


def _short(filename: str) -> str:
    """A traced file's path from its package on (no path of this machine in the results)."""
    parts = Path(filename).parts
    for anchor in ("k2_shared_token", "site-packages", "benchmarks"):
        if anchor in parts:
            rest = parts[parts.index(anchor) + (anchor == "site-packages") :]
            return "/".join(rest)
    if "lib" in parts:
        return "stdlib/" + "/".join(parts[parts.index("lib") + 2 :])
    return parts[-1]


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _report(f: Figures) -> SectionResult:
    n, plan = f.n, f.plan
    threads_rows = [("before the registry (harness: main, watchdog, Redis log drain)",
                     f.threads_before, "")]  # fmt: skip
    threads_rows += [
        (label, count, f"{count - f.threads_before:+d}")
        for label, count in f.threads_samples.items()
    ]
    threads_table = md_table(("OS threads of this process", "count", "vs before"), threads_rows)
    names = ", ".join(f"{name} x{count}" for name, count in sorted(f.new_thread_names.items()))
    idle_note = (
        f"after {f.idle_wait_s:.0f} s with no call (`local_idle` {plan.local_idle:g} s): "
        f"{f.held_after_idle}/{n} copies still held"
    )
    memory_table = md_table(
        ("per tenant", "bytes"),
        [
            (
                f"in-process, tokens held (tracemalloc over the last {plan.traced} tenants warmed, "
                f"{f.held_at_reading}/{plan.traced} of their copies held)",
                _fmt(f.memory_held, ".0f"),
            ),
            (f"in-process, idle ({idle_note})", _fmt(f.memory_idle, ".0f")),
            ("Redis `used_memory` delta / N", _fmt(f.redis_used, ".0f")),
            ("Redis, without client buffers", _fmt(f.redis_stored, ".0f")),
        ],
    )
    top = ", ".join(f"{name} {size:.0f} B" for name, size in f.top_files)
    warm_table = md_table(
        ("`get_token()`, warm", "µs per call (median)", "ratio"),
        [
            (
                f"round-robin over {n} tenants' providers",
                fmt_us(f.many_s, 3),
                _fmt(f.ratio, ".2f") + "x" if f.ratio is not None else "-",
            ),
            (
                f"one tenant's provider, the same loop over a list of it {n} times (baseline)",
                fmt_us(f.one_s, 3),
                "1.00x",
            ),
            (
                "the primer's provider the same way, before the other tenants existed",
                fmt_us(f.alone_s, 3),
                _fmt(f.alone_s / f.one_s if f.alone_s and f.one_s else None, ".2f") + "x",
            ),
            (
                f"floor: a dict of {n} (token, expiry) pairs, {n} keys round-robin against one "
                "key (same loop, same rounds)",
                "",
                _fmt(f.floor_ratio, ".2f") + "x",
            ),
        ],
    )
    due_table = md_table(
        ("due together", "value"),
        [
            ("copies in their refresh window at the due instant", f"{f.stale_at_due}/{n}"),
            (
                "copies dropped as idle by then (the kick re-reads the due token from Redis)",
                f"{n - f.stale_at_due - f.fresh_at_due}/{n}",
            ),
            ("copies still fresh at the due instant", f"{f.fresh_at_due}/{n}"),
            ("one `get_token()` on each (kicks every refresh), s", _fmt(f.kick_s, ".3f")),
            ("due instant to every tenant holding a new token, s", _fmt(f.due_s, ".2f")),
            ("tenants holding a new token at the end", f"{f.refreshed}/{n}"),
            ("tokens changed (`get_token()` afterwards vs before)", f"{f.changed}/{n}"),
            ("exchanges at the fake K2 server", f.due_exchanges),
            (
                f"peak token requests served at once (bound `max_exchanges` = {MAX_EXCHANGES})",
                _fmt(f.peak, "d"),
            ),
        ],
    )
    body = (
        f"{n} client ids on one fake K2 server (its own process; tokens of {plan.lifetime} s), "
        "one `ProviderRegistry` on one embedded redis-server with one HTTP session; "
        f"`refresh_ahead` {plan.fresh:g} s (half the lifetime), `min_validity` {MIN_VALIDITY:g} s, "
        f"`local_max_age` {plan.lifetime} s, `max_exchanges` {MAX_EXCHANGES}. Tenants warmed one "
        "after another from one thread after a primer tenant; warm-up "
        f"{_fmt(f.warm_s, '.1f')} s ({f.warm_exchanges} exchanges; the last {plan.traced} "
        f"tenants under tracemalloc took {_fmt(f.warm_traced_s, '.1f')} s), re-warm "
        f"{_fmt(f.rewarm_s, '.2f')} s and {_fmt(f.settle_s, '.2f')} s for the re-reads it kicked "
        "to finish; exchanges between the warm-up and the due instant: "
        f"{_fmt(f.early_exchanges, 'd')}.\n\n"
        f"{threads_table}\n\n"
        f"- Threads started after the baseline, by name: {names or 'none'} (a thread started "
        "with `_thread` is named only once it runs). The fake K2 process ran "
        f"{f.k2_threads_peak} threads at the end of the due phase, not counted above.\n\n"
        f"{memory_table}\n\n"
        f"- Largest in-process allocators with the tokens held, per tenant: {top or '-'}.\n\n"
        f"{warm_table}\n\n"
        f"- Median of {plan.rounds} rounds of {max(1, CALLS_PER_ROUND // n) * n} calls each, "
        "the two lists alternating (ABBA), tracemalloc off; Redis commands meanwhile (background "
        f"re-reads the calls kicked; `INFO commandstats`): {_fmt(f.round_commands, 'd')}.\n\n"
        f"{due_table}\n\n"
        f"- The fake server answered each token request after {DUE_LATENCY * 1e3:.0f} ms in this "
        "phase; a tenant counts as refreshed once its `seconds_left()` is above the refresh "
        "window again.\n"
    )
    if f.warnings:
        kinds = sorted(f.warnings.items(), key=lambda kv: -kv[1])
        shown = "; ".join(f'{count} x "{text}"' for text, count in kinds[:4])
        more = f" (and {len(kinds) - 4} other kinds)" if len(kinds) > 4 else ""
        body += f"\nThe library logged {sum(f.warnings.values())} warnings: {shown}{more}.\n"
    else:
        body += "\nThe library logged no warning.\n"
    if f.overrun:
        body += f"\n**The run stopped early: {f.overrun}.** Figures after it are missing.\n"
    lib = f.library_threads
    verdicts = [
        Verdict(
            f"library threads at most {THREADS_TARGET} with {n} tenants (largest count seen "
            "minus the count before the registry)",
            lib is not None and lib <= THREADS_TARGET,
            f"{lib if lib is not None else '-'} threads",
        ),
        Verdict(
            f"warm `get_token()` over {n} tenants at most {WARM_RATIO_TARGET:g}x one tenant's",
            f.ratio is not None and f.ratio <= WARM_RATIO_TARGET,
            f"{fmt_us(f.many_s, 3)} vs {fmt_us(f.one_s, 3)} µs, {_fmt(f.ratio, '.2f')}x; "
            f"a bare dict of {n} tokens: {_fmt(f.floor_ratio, '.2f')}x",
        ),
        Verdict(
            f"a tenant's warm `get_token()` with {n} tenants held at most {WARM_RATIO_TARGET:g}x "
            "its cost as the only tenant",
            f.alone_s is not None
            and f.one_s is not None
            and f.one_s <= WARM_RATIO_TARGET * f.alone_s,
            f"{fmt_us(f.one_s, 3)} vs {fmt_us(f.alone_s, 3)} µs",
        ),
        Verdict(
            "idle tenants' local copies dropped after `local_idle`",
            f.memory_idle is not None and f.held_after_idle == 0,
            (
                f"{f.held_after_idle}/{n} still held, {_fmt(f.memory_idle, '.0f')} B vs "
                f"{_fmt(f.memory_held, '.0f')} B per tenant held"
            ),
        ),
        Verdict(
            "due together: every tenant refreshed, one exchange each",
            f.refreshed == n and f.changed == n and f.due_exchanges == n and f.fresh_at_due == 0,
            f"{f.refreshed}/{n} refreshed in {_fmt(f.due_s, '.2f')} s, {f.changed}/{n} changed, "
            f"{f.due_exchanges} exchanges, {f.fresh_at_due} still fresh at the due instant",
        ),
        Verdict(
            f"due together: peak concurrent token requests at most max_exchanges ({MAX_EXCHANGES})",
            f.peak is not None and f.peak <= MAX_EXCHANGES,
            f"peak {_fmt(f.peak, 'd')}",
        ),
        Verdict(
            "no exchange between the warm-up and the due instant (the schedule held)",
            f.early_exchanges == 0,
            f"{_fmt(f.early_exchanges, 'd')} exchanges",
        ),
    ]
    return SectionResult("tenants", f"Tenants ({n} in one process)", body, verdicts)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: this section only, written to benchmarks/results/tenants.md."""

    def tenants_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--tenants",
            type=int,
            default=None,
            help=f"how many (default {N_FULL}, quick {N_QUICK})",
        )

    return run_standalone(
        "tenants",
        lambda config, args: run(config, args.tenants),
        argv,
        quick_help=f"{N_QUICK} tenants",
        add_arguments=tenants_option,
    )


if __name__ == "__main__":
    sys.exit(main())
