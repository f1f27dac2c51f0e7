"""Where the library's time goes in a cold stampede: a timeline of one instrumented round.

Not part of ``python -m benchmarks``; run ``python -m benchmarks.profile_stampede [-p 64]``
when the stampede section's numbers need explaining. It runs the library contender exactly as
the stampede section does (P spawned processes x 4 threads, common start instant, empty cache,
fake K2 latency 100 ms), but each worker first wraps a few functions with timers:

- redis-py ``Connection.__init__`` (redis-py 8 resolves its own version through
  ``importlib.metadata`` here, for every connection) and ``Connection.connect`` (TCP connect
  plus the handshake: HELLO, CLIENT SETINFO, PING);
- the store's four Redis operations (read, try-lock, publish, wait) and the exchange.

Wrapping costs a few microseconds per event, against phases of milliseconds. Each worker also
reports the CPU time its process used during the round, so the fleet's CPU demand can be set
against what 2 cores supply. Writes ``results/stampede_profile.md``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    CTX,
    RESULTS_DIR,
    collect,
    load_average,
    md_table,
    spawned,
    start_round,
    unique_prefix,
    wait_for_start,
)
from benchmarks.contenders import Target, build
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis

THREADS = 4
LATENCY = 0.100


@dataclass
class Timeline:
    process: int
    events: list[tuple[str, int, float, float]]  # (what, thread ident index, start, end)
    calls: list[tuple[float, float]]  # (released, done) per thread
    cpu: float  # process CPU seconds from the start instant until its last thread was done


def _instrument(events: list[tuple[str, int, float, float]]) -> None:
    """Wrap the functions of interest with timers that append to ``events``."""
    import redis.connection as rc  # noqa: PLC0415

    from k2_shared_token._sync.exchange import ExchangeClient  # noqa: PLC0415
    from k2_shared_token._sync.store import RedisStore  # noqa: PLC0415

    idents: dict[int, int] = {}

    def timed(owner: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                who = idents.setdefault(threading.get_ident(), len(idents))
                events.append((label, who, start, time.monotonic()))

        setattr(owner, name, wrapper)

    timed(rc.AbstractConnection, "__init__", "redis Connection() construction")
    connect: Callable[..., Any] = rc.AbstractConnection.connect

    def real_connect(self: Any) -> Any:
        """Only connects that open a socket: redis-py calls connect() before every command."""
        if getattr(self, "_sock", None) is not None:
            return connect(self)
        start = time.monotonic()
        try:
            return connect(self)
        finally:
            who = idents.setdefault(threading.get_ident(), len(idents))
            events.append(("redis connect + handshake", who, start, time.monotonic()))

    rc.AbstractConnection.connect = real_connect  # type: ignore[method-assign]
    timed(RedisStore, "read", "store.read (GET + 2 PTTL, pipelined)")
    timed(RedisStore, "try_lock", "store.try_lock (script)")
    timed(RedisStore, "publish", "store.publish (script)")
    timed(RedisStore, "wait", "store.wait (subscribe + re-read + wait)")
    timed(ExchangeClient, "fetch", "exchange (HTTP POST to K2)")


def worker(
    index: int, barrier: Any, go: Any, results: Any, redis_url: str, base_url: str, prefix: str
) -> None:
    events: list[tuple[str, int, float, float]] = []
    _instrument(events)
    client = build("library", Target(redis_url, base_url, prefix))
    calls: list[tuple[float, float]] = []
    cpu_at: list[float] = []

    def ask() -> None:
        released = wait_for_start(barrier, go, 120)
        if released is None:
            return
        if not cpu_at:
            cpu_at.append(time.process_time())
        client.get_token()
        calls.append((released, time.monotonic()))

    pool = [threading.Thread(target=ask) for _ in range(THREADS)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    cpu = time.process_time() - cpu_at[0] if cpu_at else 0.0
    client.close()
    results.put(Timeline(index, events, calls, cpu))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_stampede")
    parser.add_argument("-p", "--processes", type=int, default=64)
    args = parser.parse_args(argv)
    p = args.processes
    with EmbeddedRedis() as redis_server, FakeK2Server(latency=LATENCY) as k2:
        barrier = CTX.Barrier(p * THREADS + 1)
        go = CTX.Value("d", 0.0)
        results = CTX.Queue()
        prefix = unique_prefix("prof")
        argsets = [
            (i, barrier, go, results, redis_server.url, k2.base_url, prefix) for i in range(p)
        ]
        with spawned(worker, argsets) as procs:
            try:
                start = start_round(barrier, go, p * THREADS, 300)
                timelines: list[Timeline] = collect(
                    results, p, 90, lambda: any(x.is_alive() for x in procs)
                )
            finally:
                barrier.abort()
        issued = k2.issued
    text = _render(p, start, timelines, [rec.issued_at for rec in issued])
    print(text)
    out = RESULTS_DIR / "stampede_profile.md"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.write_text(
        f"# Where the cold stampede's time goes (P={p})\n\n"
        f"Written by `python -m benchmarks.profile_stampede -p {p}` at {when}, load average "
        f"(1/5/15 min) at the end: {load_average()}.\n\n{text}\n"
    )
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _render(p: int, start: float, timelines: list[Timeline], issued: list[float]) -> str:
    calls = [c for t in timelines for c in t.calls]
    last_done = max(d for _, d in calls)
    by_kind: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for t in timelines:
        for what, _, s, e in t.events:
            if e >= start:
                by_kind[what].append((t.process, s, e))
    rows = []
    for what, spans in by_kind.items():
        durations = sorted(e - s for _, s, e in spans)
        rows.append(
            (
                what,
                len(spans),
                _ms(sum(durations)),
                _ms(statistics.median(durations)),
                _ms(durations[-1]),
                _ms(min(s for _, s, _ in spans) - start),
                _ms(statistics.median(s for _, s, _ in spans) - start),
                _ms(max(e for _, _, e in spans) - start),
            )
        )
    rows.sort(key=lambda r: float(r[5]))
    phases = md_table(
        (
            "what",
            "count",
            "total (ms)",
            "median (ms)",
            "max (ms)",
            "first start (ms)",
            "median start (ms)",
            "last end (ms)",
        ),
        rows,
        "lrrrrrrr",
    )
    winner = next(
        (t for t in timelines if any(w == "exchange (HTTP POST to K2)" for w, *_ in t.events)),
        None,
    )
    path_rows = []
    if winner is not None:
        for what, who, s, e in sorted(winner.events, key=lambda ev: ev[2]):
            if e >= start:
                path_rows.append((what, who, _ms(s - start), _ms(e - start), _ms(e - s)))
    # From the moment a process's token arrived (its publish or its wait returned) to each of
    # its callers' return: the hand-over inside the process, under the fleet's CPU contention.
    handover: list[float] = []
    for t in timelines:
        arrived = [e for what, _, _, e in t.events if what.startswith(("store.wait", "store.pub"))]
        if arrived:
            handover.extend(done - max(arrived) for _, done in t.calls)
    handover.sort()
    cpu = sum(t.cpu for t in timelines)
    wall = last_done - start
    first_issue = min(issued) - start if issued else float("nan")
    summary = [
        f"{p} processes x {THREADS} threads, one round, empty cache, fake K2 latency "
        f"{LATENCY * 1e3:.0f} ms. Times are from the common start instant.",
        "",
        f"- every caller held a token after {_ms(wall)} ms; the only exchange completed at "
        f"{_ms(first_issue)} ms ({len(issued)} exchange(s));",
        f"- the workers used {cpu:.2f} s of CPU between the start and their last caller's "
        f"return, against {2 * wall:.2f} s that 2 cores supply in that wall time "
        f"({cpu / (2 * wall) * 100:.0f} %; the coordinator, fake K2 and redis-server share "
        "the same 2 cores);",
        f"- token arrived in a process (publish, or its wait returned) to each of its callers' "
        f"return: median {_ms(statistics.median(handover)) if handover else '-'} ms, "
        f"max {_ms(handover[-1]) if handover else '-'} ms;",
        f"- last caller released (scheduler's start spread): "
        f"{_ms(max(r for r, _ in calls) - start)} ms after the start instant.",
        "",
        "Phases across the fleet:",
        "",
        phases,
        "",
        f"The winning process (#{winner.process if winner else '-'}), event by event "
        "(thread = order in which its threads first hit an instrumented function):",
        "",
        md_table(("what", "thread", "start (ms)", "end (ms)", "took (ms)"), path_rows, "lrrrr"),
    ]
    return "\n".join(summary)


if __name__ == "__main__":
    sys.exit(main())
