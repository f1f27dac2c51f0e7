"""Rollover under load: a fleet calls get_token() continuously while short-lived tokens expire.

A fleet of P processes x T threads (spawned) calls ``get_token()`` every ``PACE`` seconds per
thread for several token lifetimes, with the fake K2 granting short tokens (``EXPIRES_IN``) and
the providers configured to refresh ``REFRESH_AHEAD`` seconds before expiry. Every rollover
(one worker exchanging in the background while everybody keeps serving the current token) then
happens many times in one run, each under full load.

Warm start: once every worker is ready, the coordinator puts the first token into Redis and
every worker reads it once (so the short token is not half gone before the load begins, and
each process's first Redis connection is not counted as a rollover); then the load starts at
a common instant. A cold start is the stampede section's subject.

Windows: "around a rollover" is the request-to-reply span of each exchange (the fake server's
``issued_at`` minus its latency, to ``issued_at``) widened by 250 ms on each side; everything
else is "elsewhere". Workers keep every sample locally and, once the coordinator has told them
when the exchanges happened, send back only histograms per window kind, a per-bin maximum for
the plot, their slowest calls and the tokens they served (by digest) with first and last use.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import (
    CTX,
    LogHistogram,
    RunConfig,
    SectionResult,
    Verdict,
    collect,
    fmt_ms,
    md_table,
    spawned,
    start_round,
    unique_prefix,
    wait_for_start,
)
from k2_shared_token import SharedTokenProvider
from k2_shared_token.testing.fake_k2 import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis

EXPIRES_IN = 4  # s, token lifetime granted by the fake K2
REFRESH_AHEAD = 2.0  # s
MIN_VALIDITY = 0.5  # s
LATENCY = 0.100  # s per token request at the fake K2
PACE = 0.002  # s between calls, per thread
WINDOW = 0.250  # s on either side of each exchange
BIN = 0.025  # s per point of the latency-over-time plot
LATENCY_TARGET = 0.005  # s: no caller above this
FULL = {"processes": 8, "threads": 4, "lifetimes": 5}
QUICK = {"processes": 4, "threads": 2, "lifetimes": 3}
SLOWEST_KEPT = 10


@dataclass
class Job:
    """What one worker is told at spawn time."""

    index: int
    kwargs: dict[str, Any]
    threads: int
    duration: float
    barrier: Any
    warm: Any
    go: Any
    results: Any
    orders: Any


@dataclass
class Done:
    index: int
    calls: int
    errors: list[str]


@dataclass
class Report:
    """One process's load, summarised against the exchange windows (a few KB)."""

    index: int
    near: LogHistogram
    elsewhere: LogHistogram
    bin_max: list[float]
    slowest: list[tuple[float, float]]  # (start instant, latency), slowest first
    tokens: dict[str, tuple[float, float]]  # digest -> (first, last) instant it was served


@dataclass
class _Thread:
    starts: array[float] = field(default_factory=lambda: array("d"))
    latencies: array[float] = field(default_factory=lambda: array("d"))
    tokens: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def worker(job: Job) -> None:
    """Entry point of one spawned worker process."""
    provider = SharedTokenProvider(**job.kwargs)
    per_thread = [_Thread() for _ in range(job.threads)]

    def call_loop(mine: _Thread) -> None:
        start = wait_for_start(job.barrier, job.go, 300)
        if start is None:
            return
        end = start + job.duration
        last_token = ""
        current = [0.0, 0.0]  # first and last use of last_token
        monotonic, sleep = time.monotonic, time.sleep
        while True:
            t0 = monotonic()
            if t0 >= end:
                break
            try:
                token = provider.get_token()
            except Exception as exc:
                mine.errors.append(f"{type(exc).__name__}: {exc}")
                sleep(PACE)
                continue
            t1 = monotonic()
            mine.starts.append(t0)
            mine.latencies.append(t1 - t0)
            # Digest only when the token object changes (outside the timed span anyway):
            # hashing every call would be most of the loop's CPU on a 2-core machine.
            if token is last_token:
                current[1] = t0
            else:
                last_token = token
                current = mine.tokens.setdefault(_digest(token), [t0, t0])
                current[1] = max(current[1], t0)
            sleep(PACE)

    pool = [threading.Thread(target=call_loop, args=(t,), daemon=True) for t in per_thread]
    for thread in pool:
        thread.start()
    # Warm start: once the coordinator has put the first token in Redis, read it once, so
    # the load begins with a warm per-process copy and an open Redis connection.
    try:
        job.warm.wait(300)  # every worker built its provider
        job.warm.wait(300)  # the first token is in Redis
        provider.get_token()
        job.warm.wait(300)  # every worker holds it
    except threading.BrokenBarrierError:
        return
    for thread in pool:
        thread.join(job.duration + 330)
    provider.close()
    errors = [e for t in per_thread for e in t.errors]
    job.results.put(Done(job.index, sum(len(t.latencies) for t in per_thread), errors[:20]))
    order = job.orders.get(timeout=120)
    job.results.put(_summarise(job.index, per_thread, *order))


def _summarise(
    index: int,
    per_thread: list[_Thread],
    windows: list[tuple[float, float]],
    origin: float,
    bins: int,
) -> Report:
    near, elsewhere = LogHistogram(), LogHistogram()
    bin_max = [0.0] * bins
    lows = [w[0] for w in windows]
    slow: list[tuple[float, float]] = []
    tokens: dict[str, tuple[float, float]] = {}
    for mine in per_thread:
        for t0, latency in zip(mine.starts, mine.latencies, strict=True):
            at = bisect.bisect_right(lows, t0) - 1
            (near if at >= 0 and t0 <= windows[at][1] else elsewhere).add(latency)
            b = int((t0 - origin) / BIN)
            if 0 <= b < bins and latency > bin_max[b]:
                bin_max[b] = latency
        order = sorted(range(len(mine.latencies)), key=mine.latencies.__getitem__)
        slow.extend((mine.starts[i], mine.latencies[i]) for i in order[-SLOWEST_KEPT:])
        for digest, (first, last) in mine.tokens.items():
            was = tokens.get(digest)
            tokens[digest] = (
                (first, last) if was is None else (min(was[0], first), max(was[1], last))
            )
    slow.sort(key=lambda s: -s[1])
    return Report(index, near, elsewhere, bin_max, slow[:SLOWEST_KEPT], tokens)


def run(config: RunConfig) -> SectionResult:
    shape = QUICK if config.quick else FULL
    processes, threads = shape["processes"], shape["threads"]
    duration = shape["lifetimes"] * EXPIRES_IN + 1.0
    bins = math.ceil(duration / BIN)
    with (
        EmbeddedRedis() as redis_server,
        FakeK2Server(expires_in=EXPIRES_IN, latency=LATENCY) as k2,
    ):
        kwargs: dict[str, Any] = {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "base_url": k2.base_url,
            "redis": redis_server.url,
            "refresh_ahead": REFRESH_AHEAD,
            "min_validity": MIN_VALIDITY,
            "key_prefix": unique_prefix("roll"),
        }
        barrier = CTX.Barrier(processes * threads + 1)
        warm = CTX.Barrier(processes + 1)
        go = CTX.Value("d", 0.0)
        results, orders = CTX.Queue(), CTX.Queue()
        jobs = [
            Job(i, kwargs, threads, duration, barrier, warm, go, results, orders)
            for i in range(processes)
        ]
        with (
            SharedTokenProvider(**kwargs) as probe,
            spawned(worker, [(job,) for job in jobs]) as procs,
        ):

            def alive() -> bool:
                return any(p.is_alive() for p in procs)

            try:
                # The warm-up exchange happens once every worker is ready, right before the
                # load, so the 4-second token is fresh when it begins; then every worker reads
                # it once (see worker()).
                warm.wait(300)
                probe.get_token()
                warm.wait(60)
                warm.wait(60)
                start = start_round(barrier, go, processes * threads, 60)
                done: list[Done] = collect(results, processes, duration + 60, alive)
                issued = k2.issued
                windows = _windows([rec.issued_at for rec in issued])
                for _ in procs:
                    orders.put((windows, start, bins))
                reports: list[Report] = collect(results, processes, 120, alive)
            finally:
                barrier.abort()
                warm.abort()
    if len(done) < processes or len(reports) < processes:
        raise RuntimeError(f"rollover: {len(done)}/{len(reports)} of {processes} workers reported")
    return _report(config, processes, threads, duration, start, issued, done, reports)


def _windows(exchanges: list[float]) -> list[tuple[float, float]]:
    """Request-to-reply span of each exchange, widened by WINDOW, overlaps merged."""
    out: list[tuple[float, float]] = []
    for at in sorted(exchanges):
        low, high = at - LATENCY - WINDOW, at + WINDOW
        if out and low <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _report(
    config: RunConfig,
    processes: int,
    threads: int,
    duration: float,
    start: float,
    issued: list[Any],
    done: list[Done],
    reports: list[Report],
) -> SectionResult:
    end = start + duration
    near, elsewhere = LogHistogram(), LogHistogram()
    for r in reports:
        near.merge(r.near)
        elsewhere.merge(r.elsewhere)
    every = LogHistogram()
    every.merge(near)
    every.merge(elsewhere)
    calls = sum(d.calls for d in done)
    errors = [e for d in done for e in d.errors]

    times = [rec.issued_at for rec in issued]
    in_load = [t for t in times if start <= t <= end]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    period = EXPIRES_IN - min(REFRESH_AHEAD, EXPIRES_IN / 2)
    expected = duration / period
    per_lifetime = len(in_load) / (duration / EXPIRES_IN)
    tail = end - times[-1] if times else math.inf

    # Every token served must have had at least min_validity left (fake server's own clock).
    expiry = {_digest(rec.token): rec.issued_at + rec.expires_in for rec in issued}
    served: dict[str, tuple[float, float]] = {}
    for r in reports:
        for digest, (first, last) in r.tokens.items():
            was = served.get(digest)
            served[digest] = (
                (first, last) if was is None else (min(was[0], first), max(was[1], last))
            )
    foreign = [d for d in served if d not in expiry]
    late = [
        (d, expiry[d] - last)
        for d, (_, last) in served.items()
        if d in expiry and expiry[d] - last < MIN_VALIDITY
    ]

    exchange_rows = [
        (
            i + 1,
            f"{t - start:+.3f}",
            "-" if i == 0 else f"{t - times[i - 1]:.3f}",
            "warm-up (before the load)" if t < start else "",
        )
        for i, t in enumerate(times)
    ]
    latency_rows = [
        (
            name,
            h.n,
            fmt_ms(h.percentile(0.5), 3),
            fmt_ms(h.percentile(0.99), 3),
            fmt_ms(h.percentile(0.999), 3),
            fmt_ms(h.max, 3),
            h.count_over(1e-3),
            h.count_over(5e-3),
        )
        for name, h in (("around a rollover", near), ("elsewhere", elsewhere), ("all", every))
    ]
    slowest = sorted((s for r in reports for s in r.slowest), key=lambda s: -s[1])[:SLOWEST_KEPT]
    slow_rows = [(f"{t0 - start:.3f}", fmt_ms(lat, 2), _nearest(t0, times)) for t0, lat in slowest]
    near_seconds = sum(max(0.0, min(high, end) - max(low, start)) for low, high in _windows(times))
    body = (
        f"{processes} processes x {threads} threads (spawn), each thread calling `get_token()` "
        f"every {PACE * 1e3:g} ms for {duration:g} s ({duration / EXPIRES_IN:.2f} token "
        f"lifetimes). Fake K2: tokens of {EXPIRES_IN} s, {LATENCY * 1e3:.0f} ms per exchange; "
        f"providers: refresh_ahead={REFRESH_AHEAD:g}, min_validity={MIN_VALIDITY:g}, so one "
        f"refresh every {period:g} s fleet-wide. Warm start: the first token is put in Redis "
        "and read once by every process just before the load starts (a cold start is the "
        "stampede section's subject). Latency percentiles come from merged 2 %-wide histograms "
        "(max and the counts above 1 and 5 ms are exact).\n\n"
        "### Exchanges\n\n"
        f"{len(in_load)} exchanges during the load ({expected:.1f} refresh periods): "
        f"{per_lifetime:.2f} per token lifetime (one per refresh period is "
        f"{EXPIRES_IN / period:.2f}); time since the load started and gap to the previous "
        "one (s):\n\n"
        + md_table(("#", "issued at (s)", "gap (s)", "note"), exchange_rows, "rrrl")
        + "\n\n### Caller latency\n\n"
        f"*Around a rollover*: from 250 ms before each exchange's request to 250 ms after its "
        f"reply ({near_seconds:.1f} s of the {duration:g} s); *elsewhere*: the rest. "
        f"{calls} calls, {len(errors)} errors.\n\n"
        + md_table(
            (
                "window",
                "calls",
                "p50 (ms)",
                "p99 (ms)",
                "p99.9 (ms)",
                "max (ms)",
                "> 1 ms",
                "> 5 ms",
            ),
            latency_rows,
        )
        + "\n\nSlowest calls in the fleet:\n\n"
        + md_table(("started at (s)", "latency (ms)", "nearest exchange"), slow_rows, "rrl")
        + "\n\n### Tokens served\n\n"
        f"{len(served)} distinct tokens served; {len(foreign)} not issued by the fake server; "
        f"{len(late)} served with less than min_validity ({MIN_VALIDITY:g} s) left"
        + (f" (worst: {min(x for _, x in late):.3f} s left)" if late else "")
        + ".\n\n![rollover](rollover.png)\n"
    )
    ok_gaps = bool(gaps) and all(0.9 * period <= g <= 1.2 * period for g in gaps)
    verdicts = [
        Verdict(
            f"exactly one exchange per refresh period fleet-wide (every gap within "
            f"0.9-1.2 x {period:g} s, none missing at the end)",
            ok_gaps and tail <= 1.2 * period,
            f"{len(in_load)} exchanges in {duration:g} s, gaps "
            f"{min(gaps, default=math.nan):.3f}-{max(gaps, default=math.nan):.3f} s, "
            f"{per_lifetime:.2f} per lifetime",
        ),
        Verdict(
            f"no caller above {LATENCY_TARGET * 1e3:g} ms",
            every.max <= LATENCY_TARGET and not errors,
            f"max {every.max * 1e3:.2f} ms around rollovers {near.max * 1e3:.2f} ms, elsewhere "
            f"{elsewhere.max * 1e3:.2f} ms; {every.count_over(LATENCY_TARGET)} of {every.n} calls "
            f"above; p99 {every.percentile(0.99) * 1e3:.3f} ms; {len(errors)} errors",
        ),
        Verdict(
            f"no token served with less than min_validity ({MIN_VALIDITY:g} s) left",
            not late and not foreign,
            f"{len(late)} late, {len(foreign)} unknown of {len(served)} tokens",
        ),
    ]
    files = _plot(config, reports, times, start, duration)
    return SectionResult("rollover", "Rollover under load", body, verdicts, files)


def _nearest(t0: float, exchanges: list[float]) -> str:
    if not exchanges:
        return "-"
    at = min(exchanges, key=lambda t: abs(t - t0))
    return f"{(t0 - at) * 1e3:+.0f} ms from the reply of exchange #{exchanges.index(at) + 1}"


def _plot(
    config: RunConfig, reports: list[Report], times: list[float], start: float, duration: float
) -> list[str]:
    from benchmarks.plots import plt  # noqa: PLC0415 - matplotlib only in the coordinator

    bins = max(len(r.bin_max) for r in reports)
    fleet_max = [max(r.bin_max[i] for r in reports) * 1e3 for i in range(bins)]
    xs = [(i + 0.5) * BIN for i in range(bins)]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for low, high in _windows(times):
        ax.axvspan(low - start, high - start, color="tab:orange", alpha=0.15, lw=0)
    ax.plot(xs, [max(v, 1e-4) for v in fleet_max], lw=0.8, label=f"max per {BIN * 1e3:.0f} ms")
    for i, t in enumerate(times):
        ax.axvline(t - start, color="tab:red", lw=0.8, label="exchange (reply)" if i == 0 else None)
    ax.axhline(LATENCY_TARGET * 1e3, color="black", ls="--", lw=0.8, label="5 ms target")
    ax.set_yscale("log")
    ax.set_xlim(min(0.0, (times[0] - start) if times else 0.0) - 0.2, duration)
    ax.set_xlabel("time since the load started (s); shaded: around a rollover")
    ax.set_ylabel("get_token() latency, fleet max per bin (ms)")
    ax.set_title("Rollover under load")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = config.out_dir / "rollover.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]
