"""Cold stampede: P processes x T threads ask for a token at the same instant on an empty cache.

One pool of worker processes (spawned once, the largest P) runs every round, so the seconds of
interpreter start-up on a 2-core machine are paid once instead of once per round, and workers
that sit out a round (index >= P) block on a barrier and use no CPU. Per round every
participating process builds its contender *before* the start barrier, with a key prefix no
round used before (an empty cache without FLUSHALL, which would also hit the other contenders).
The coordinator is a party of the same barrier, so it knows the instant the round starts.

Measured per round, on the one clock all processes share on Linux (``time.monotonic``):

- exchanges: the fake server's ``exchanges`` delta;
- time until all hold a token: last thread's return minus the first thread's release;
- per-call latency: each thread's return minus its own release (p50/p99/max);
- wake lag: last thread's return minus the completion of the round's first exchange (the
  fake server's ``issued_at``): how long a token existed before the last caller had it;
- release spread: first to last thread actually starting (harness and scheduler, not contender).

The floor, measured in the same run and through the same harness: ``warm GET``, the same fleet
on a cache the coordinator filled just before the start, each thread doing one plain redis-py
GET on a default client (connection set-up included). A cold stampede cannot beat the exchange
plus that; the library's lag after the exchange is reported against it, per P.

Start: a multiprocessing Barrier gates every thread (all contenders built, all threads ready);
its wake-up is serial (each party re-takes one shared lock) and the first threads out start
working while the rest are still being woken. Instead the coordinator passes a start instant
through a second phase of the same barrier and every thread sleeps until that instant (see
:func:`benchmarks.common.start_round`). What spread remains is the scheduler: 2 cores cannot
run 256 threads at once, which is part of what a real stampede on such a machine looks like.

Contenders and rounds are interleaved (rep 1 of each contender, then rep 2, ...) so drift on the
machine spreads over all of them instead of biasing one.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis

from benchmarks.common import (
    CTX,
    RunConfig,
    SectionResult,
    Verdict,
    collect,
    fmt_ms,
    md_table,
    percentile,
    spawned,
    start_round,
    unique_prefix,
    wait_for_start,
)
from benchmarks.contenders import BASELINE, CONTENDERS, Contender, Target, build, warm_key
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis

THREADS = 4
LATENCY = 0.100  # seconds the fake K2 takes per token request
PROCESSES_FULL = (1, 4, 16, 32, 64)
PROCESSES_QUICK = (1, 4, 8)
REPS_FULL = 3
REPS_QUICK = 1
ROUND_TIMEOUT = 45.0  # > BLOCKING_TIMEOUT of the lock contenders: a stuck round still ends
IDLE_TIMEOUT = 900.0  # a worker waiting for its first round; the coordinator aborts it sooner
READY_TIMEOUT = 60.0  # coordinator: workers build their clients in well under this
WAKE_TARGET = 0.015  # s: the target for the last thread after the exchange, at 32 x 4
WAKE_TARGET_P = 32
FLOOR_SLACK = 0.010  # s: the allowance over exchange latency + the warm-GET stampede
FLOOR_P = (16, 32)  # where that target applies
NAIVE_P = 4  # up to which P the library must stay within one Redis round trip of naive
LIBRARIES = ("library", "library (user client)")
WARM_VALUE = "warm-token"  # what the warm-GET baseline reads
RTT_SAMPLES = 200  # PINGs on one open connection: the run's Redis round trip


@dataclass(frozen=True)
class RoundSpec:
    index: int
    processes: int
    contender: str
    rep: int
    prefix: str


@dataclass
class ProcessReport:
    """One process's round, a few hundred bytes: (release, return) per thread and digests."""

    round_index: int
    process: int
    calls: list[tuple[float, float]]
    errors: list[str]
    digests: list[str]


@dataclass
class RoundResult:
    spec: RoundSpec
    exchanges: int
    released_first: float
    release_spread: float
    until_all: float
    wake_lag: float
    latencies: list[float]
    errors: list[str]
    distinct_tokens: int
    foreign_tokens: int
    missing_reports: int


@dataclass
class _Cell:
    """All reps of one (P, contender)."""

    rounds: list[RoundResult] = field(default_factory=list)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def worker(
    index: int,
    plan: list[RoundSpec],
    barriers: dict[int, Any],
    startup: Any,
    go: Any,
    results: Any,
    redis_url: str,
    base_url: str,
) -> None:
    """Entry point of one spawned worker: every round of the plan it takes part in."""
    try:
        startup.wait(IDLE_TIMEOUT)
    except threading.BrokenBarrierError:
        return
    for spec in plan:
        if index >= spec.processes:
            continue
        client = build(spec.contender, Target(redis_url, base_url, spec.prefix))
        report = _one_round(index, spec, client, barriers[spec.processes], go)
        if report is None:
            return  # the coordinator gave up: leave quietly
        results.put(report)


def _one_round(
    index: int, spec: RoundSpec, client: Contender, barrier: Any, go: Any
) -> ProcessReport | None:
    """THREADS threads wait at the barrier, start at the common instant and ask once each."""
    calls: list[tuple[float, float]] = []
    errors: list[str] = []
    digests: set[str] = set()
    guard = threading.Lock()
    broken = threading.Event()

    def ask() -> None:
        released = wait_for_start(barrier, go, IDLE_TIMEOUT)
        if released is None:
            broken.set()
            return
        try:
            token = client.get_token()
        except Exception as exc:
            with guard:
                errors.append(f"{type(exc).__name__}: {exc}")
            return
        done = time.monotonic()
        with guard:
            calls.append((released, done))
            digests.add(_digest(token))

    pool = [threading.Thread(target=ask, daemon=True) for _ in range(THREADS)]
    for thread in pool:
        thread.start()
    deadline = time.monotonic() + IDLE_TIMEOUT + ROUND_TIMEOUT
    for thread in pool:
        thread.join(max(0.0, deadline - time.monotonic()))
    if broken.is_set():
        return None
    stuck = sum(thread.is_alive() for thread in pool)
    if stuck:
        errors.append(f"{stuck} thread(s) still waiting at the round timeout")
    try:
        client.close()
    except Exception:
        errors.append("close failed: " + traceback.format_exc(limit=1))
    return ProcessReport(spec.index, index, calls, errors, sorted(digests))


def _plan(processes: tuple[int, ...], reps: int, contenders: tuple[str, ...]) -> list[RoundSpec]:
    plan: list[RoundSpec] = []
    for p in processes:
        for rep in range(reps):
            for name in contenders:
                label = f"st{len(plan)}"
                plan.append(RoundSpec(len(plan), p, name, rep, unique_prefix(label)))
    return plan


def _run_round(
    spec: RoundSpec,
    barrier: Any,
    go: Any,
    results: Any,
    k2: FakeK2Server,
    alive: Any,
    redis_url: str,
) -> RoundResult:
    issued_before = len(k2.issued)
    exchanges_before = k2.exchanges
    prepare = None
    if spec.contender == BASELINE:

        def prepare() -> None:
            # After every worker built its client (none connected yet): the cache is warm
            # when the start instant comes, and the coordinator's connection is not theirs.
            with redis.Redis.from_url(redis_url) as warm:
                warm.set(warm_key(Target(redis_url, "", spec.prefix)), WARM_VALUE, ex=300)

    start_round(barrier, go, spec.processes * THREADS, READY_TIMEOUT, prepare)
    reports: list[ProcessReport] = collect(results, spec.processes, ROUND_TIMEOUT, alive)
    exchanges = k2.exchanges - exchanges_before
    issued = k2.issued[issued_before:]
    calls = [c for r in reports for c in r.calls]
    errors = [e for r in reports for e in r.errors]
    digests = {d for r in reports for d in r.digests}
    issued_digests = {_digest(rec.token) for rec in issued}
    if spec.contender == BASELINE:
        issued_digests = {_digest(WARM_VALUE)}
    released = [c[0] for c in calls]
    done = [c[1] for c in calls]
    first_exchange = min((rec.issued_at for rec in issued), default=float("nan"))
    missing = spec.processes * THREADS - len(calls)
    return RoundResult(
        spec=spec,
        exchanges=exchanges,
        released_first=min(released, default=float("nan")),
        release_spread=(max(released) - min(released)) if released else float("nan"),
        until_all=(max(done) - min(released)) if calls and not missing else float("nan"),
        wake_lag=(max(done) - first_exchange) if calls and not missing else float("nan"),
        latencies=sorted(d - r for r, d in calls),
        errors=errors,
        distinct_tokens=len(digests),
        foreign_tokens=len(digests - issued_digests),
        missing_reports=spec.processes - len(reports),
    )


def _round_trip(redis_url: str) -> float:
    """Median PING on one open loopback connection: what "one Redis round trip" is here."""
    with redis.Redis.from_url(redis_url) as client:
        client.ping()
        samples = []
        for _ in range(RTT_SAMPLES):
            began = time.perf_counter()
            client.ping()
            samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def run(
    config: RunConfig,
    processes: tuple[int, ...] | None = None,
    contenders: tuple[str, ...] = tuple(CONTENDERS),
    reps: int | None = None,
) -> SectionResult:
    """The section; ``processes``, ``contenders`` and ``reps`` narrow it for a quick look."""
    processes = processes or (PROCESSES_QUICK if config.quick else PROCESSES_FULL)
    reps = reps or (REPS_QUICK if config.quick else REPS_FULL)
    plan = _plan(processes, reps, contenders)
    pool_size = max(processes)
    rounds: list[RoundResult] = []
    with EmbeddedRedis() as redis_server, FakeK2Server(latency=LATENCY) as k2:
        rtt = _round_trip(redis_server.url)
        barriers = {p: CTX.Barrier(p * THREADS + 1) for p in processes}
        startup = CTX.Barrier(pool_size + 1)
        results = CTX.Queue()
        go = CTX.Value("d", 0.0)
        args = [
            (i, plan, barriers, startup, go, results, redis_server.url, k2.base_url)
            for i in range(pool_size)
        ]
        with spawned(worker, args) as procs:

            def alive() -> bool:
                return any(p.is_alive() for p in procs)

            try:
                # Every worker has imported everything before round 1: no start-up CPU
                # competes with the small rounds.
                startup.wait(300)
                for spec in plan:
                    result = _run_round(
                        spec, barriers[spec.processes], go, results, k2, alive, redis_server.url
                    )
                    rounds.append(result)
                    if result.missing_reports:
                        raise RuntimeError(f"round {spec} lost {result.missing_reports} workers")
            finally:
                for barrier in (startup, *barriers.values()):
                    barrier.abort()
    return _report(rounds, processes, reps, config, contenders, rtt)


def _report(
    rounds: list[RoundResult],
    processes: tuple[int, ...],
    reps: int,
    config: RunConfig,
    contenders: tuple[str, ...],
    rtt: float,
) -> SectionResult:
    cells: dict[tuple[int, str], _Cell] = defaultdict(_Cell)
    for r in rounds:
        cells[(r.spec.processes, r.spec.contender)].rounds.append(r)
    rows = []
    for p in processes:
        floor = _median(r.until_all for r in cells[(p, BASELINE)].rounds)
        for name in contenders:
            cell = cells[(p, name)].rounds
            if not cell:
                continue
            lat = sorted(x for r in cell for x in r.latencies)
            lag = _median(r.wake_lag for r in cell)
            rows.append(
                (
                    p,
                    p * THREADS,
                    name,
                    "/".join(str(r.exchanges) for r in cell),
                    fmt_ms(_median(r.until_all for r in cell)),
                    fmt_ms(lag),
                    fmt_ms(lag - floor),
                    fmt_ms(percentile(lat, 0.50)),
                    fmt_ms(percentile(lat, 0.99)),
                    fmt_ms(percentile(lat, 1.0)),
                    fmt_ms(_median(r.release_spread for r in cell)),
                    max(r.distinct_tokens for r in cell),
                    sum(len(r.errors) + r.foreign_tokens for r in cell),
                )
            )
    table = md_table(
        (
            "P",
            "callers",
            "contender",
            "exchanges (per rep)",
            "all hold a token (ms)",
            "after exchange (ms)",
            "after exchange - warm GET (ms)",
            "p50 (ms)",
            "p99 (ms)",
            "max (ms)",
            "release spread (ms)",
            "distinct tokens",
            "errors",
        ),
        rows,
        align="rrlrrrrrrrrrr",
    )
    verdicts = _verdicts(cells, processes, contenders, rtt)
    files = _plot(cells, processes, config, contenders)
    body = (
        f"P processes x {THREADS} threads released together by a multiprocessing Barrier "
        "(spawn; two phases: all ready, then a common start instant) on an empty cache; "
        f"fake K2 latency {LATENCY * 1000:.0f} ms; {reps} rep(s) per "
        "cell, contenders interleaved. Times are medians over reps; latency percentiles pool "
        "every caller of every rep.\n\n"
        "- *all hold a token*: first thread released until the last thread holds a token;\n"
        "- *after exchange*: last thread holds a token minus the completion of the round's "
        "first exchange (fake server `issued_at`); the wait a token already existed for;\n"
        "- *after exchange - warm GET*: that lag minus the warm-GET floor's *all hold a token* "
        "at the same P (the floor: the same fleet, cache already warm, one plain redis-py GET "
        "per thread on a default client, connection set-up included); at or below zero, the "
        "token reached the fleet as fast as a warm read would have;\n"
        "- *library (user client)*: the library given `redis.Redis.from_url(url)` with "
        "redis-py's defaults, as a user would pass it, instead of a URL;\n"
        "- *release spread*: first to last thread actually starting; all sleep until one "
        "common instant handed out through the barrier, so this is the scheduler's spread "
        "(harness, not contender);\n"
        "- *errors*: exceptions plus tokens that the fake server did not issue in that round.\n\n"
        f"One Redis round trip in this run (median PING on an open loopback connection): "
        f"{rtt * 1e6:.0f} µs.\n\n"
        f"{table}\n\n![stampede](stampede.png)\n"
    )
    return SectionResult("stampede", "Cold stampede", body, verdicts, files)


def _median(values: Any) -> float:
    vals = [v for v in values if v == v]  # drop NaN (a round that did not finish)
    return statistics.median(vals) if vals else float("nan")


def _verdicts(
    cells: dict[tuple[int, str], _Cell],
    processes: tuple[int, ...],
    contenders: tuple[str, ...],
    rtt: float,
) -> list[Verdict]:
    out: list[Verdict] = []
    if "library" in contenders:
        out.extend(_library_verdicts(cells, processes))
    for name in LIBRARIES:
        if name in contenders and BASELINE in contenders:
            out.append(_floor_verdict(cells, processes, name))
        if name in contenders:
            out.append(_alternatives_verdict(cells, processes, name, rtt, contenders))
    return out


def _library_verdicts(
    cells: dict[tuple[int, str], _Cell], processes: tuple[int, ...]
) -> list[Verdict]:
    lib = {p: cells[(p, "library")].rounds for p in processes}
    worst_exchanges = max(r.exchanges for p in processes for r in lib[p])
    errors = sum(len(r.errors) + r.foreign_tokens for p in processes for r in lib[p])
    one = Verdict(
        "library: exactly one exchange per stampede at every P (and no errors)",
        worst_exchanges == 1 and errors == 0,
        f"worst {worst_exchanges} exchange(s), {errors} error(s)",
    )
    lags = {p: max(r.wake_lag for r in lib[p]) for p in processes}
    target_p = WAKE_TARGET_P if WAKE_TARGET_P in lags else max(lags)
    lag = Verdict(
        f"library: last thread holds its token within {WAKE_TARGET * 1000:.0f} ms of the exchange "
        f"completing at P={target_p} x 4, every rep (the 0.1 s polling locks need up to ~100 ms)",
        lags[target_p] <= WAKE_TARGET,
        f"worst {lags[target_p] * 1000:.1f} ms; every P: "
        + ", ".join(f"P={p} {lag_s * 1000:.1f} ms" for p, lag_s in lags.items()),
    )
    behind = []
    for p in processes:
        mine = _median(r.until_all for r in lib[p])
        for name in ("naive", "redis-py Lock", "python-redis-lock", "dogpile.cache"):
            theirs = _median(r.until_all for r in cells[(p, name)].rounds)
            if mine >= theirs:
                behind.append(f"P={p}: {mine * 1e3:.1f} ms vs {name} {theirs * 1e3:.1f} ms")
    fastest = Verdict(
        "library: ahead of every alternative (naive included) on time until all hold a token, "
        "at every P (medians)",
        not behind,
        "; ".join(behind) or "ahead of all four alternatives at every P",
    )
    return [one, lag, fastest]


def _floor_verdict(
    cells: dict[tuple[int, str], _Cell], processes: tuple[int, ...], name: str
) -> Verdict:
    """The issue's floor: exchange latency + the warm-GET stampede + FLOOR_SLACK, per P."""
    figures = []
    met = True
    targets = [p for p in FLOOR_P if p in processes] or [max(processes)]
    for p in targets:
        mine = _median(r.until_all for r in cells[(p, name)].rounds)
        floor = _median(r.until_all for r in cells[(p, BASELINE)].rounds)
        bound = LATENCY + floor + FLOOR_SLACK
        met = met and mine <= bound
        reps = "/".join(fmt_ms(r.until_all) for r in cells[(p, name)].rounds)
        figures.append(
            f"P={p}: {mine * 1e3:.1f} ms (reps {reps}) vs {bound * 1e3:.1f} ms = "
            f"{LATENCY * 1e3:.0f} + warm GET {floor * 1e3:.1f} + {FLOOR_SLACK * 1e3:.0f}"
        )
    return Verdict(
        f"{name}: last thread holds its token within exchange latency + the warm-GET "
        f"stampede + {FLOOR_SLACK * 1e3:.0f} ms at P={', '.join(map(str, targets))} x 4 "
        "(medians)",
        met,
        "; ".join(figures),
    )


def _alternatives_verdict(
    cells: dict[tuple[int, str], _Cell],
    processes: tuple[int, ...],
    name: str,
    rtt: float,
    contenders: tuple[str, ...],
) -> Verdict:
    """Ahead of python-redis-lock at every P; within one round trip of naive at small P."""
    misses = []
    worst_naive = float("-inf")
    for p in processes:
        mine = _median(r.until_all for r in cells[(p, name)].rounds)
        if "python-redis-lock" in contenders:
            theirs = _median(r.until_all for r in cells[(p, "python-redis-lock")].rounds)
            if not mine < theirs:
                misses.append(f"P={p}: {mine * 1e3:.1f} ms vs python-redis-lock {theirs * 1e3:.1f}")
        if "naive" in contenders and p <= NAIVE_P:
            naive = _median(r.until_all for r in cells[(p, "naive")].rounds)
            worst_naive = max(worst_naive, mine - naive)
            if not mine <= naive + rtt:
                misses.append(f"P={p}: {mine * 1e3:.2f} ms vs naive {naive * 1e3:.2f}")
    return Verdict(
        f"{name}: ahead of python-redis-lock at every P, and within one Redis round trip "
        f"({rtt * 1e6:.0f} µs) of naive at P <= {NAIVE_P} (medians)",
        not misses,
        ("; ".join(misses) or "ahead of python-redis-lock everywhere")
        + f"; worst vs naive at P <= {NAIVE_P}: {worst_naive * 1e3:+.2f} ms",
    )


def _plot(
    cells: dict[tuple[int, str], _Cell],
    processes: tuple[int, ...],
    config: RunConfig,
    contenders: tuple[str, ...],
) -> list[str]:
    from benchmarks.plots import plt  # noqa: PLC0415 - matplotlib only in the coordinator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in contenders:
        xs = [p for p in processes if cells[(p, name)].rounds]
        until = [_median(r.until_all for r in cells[(p, name)].rounds) * 1e3 for p in xs]
        if name == BASELINE:
            # The floor a cold stampede is held to: exchange latency plus a warm-GET stampede.
            floor = [LATENCY * 1e3 + u for u in until]
            left.plot(
                xs, floor, color="black", linestyle="--", label=f"{LATENCY * 1e3:.0f} ms + {name}"
            )
            continue
        exch = [max(r.exchanges for r in cells[(p, name)].rounds) for p in xs]
        left.plot(xs, until, marker="o", label=name)
        right.plot(xs, exch, marker="o", label=name)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel(f"processes P (x {THREADS} threads)")
    left.set_ylabel("time until every caller holds a token (ms, median)")
    left.axhline(LATENCY * 1e3, color="grey", linestyle=":", label="fake K2 latency")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel(f"processes P (x {THREADS} threads)")
    right.set_ylabel("token exchanges per stampede (worst rep)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"Cold stampede, fake K2 latency {LATENCY * 1e3:.0f} ms")
    fig.tight_layout()
    path = config.out_dir / "stampede.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]
