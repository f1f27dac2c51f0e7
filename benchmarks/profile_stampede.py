"""Where the library's time goes in a cold stampede: a timeline of one instrumented round.

Not part of ``python -m benchmarks``; run ``python -m benchmarks.profile_stampede [-p 64]
[--client own|user|both]`` when the stampede section's numbers need explaining. It runs the
library contender (``own``: the provider builds its client from the URL; ``user``: it is given
``redis.Redis.from_url(url)`` with redis-py's defaults, as a user would) exactly as the
stampede section does (P spawned processes x 4 threads, common start instant, empty cache,
fake K2 latency 100 ms), but each worker first wraps a few functions with timers:

- redis-py ``Connection.__init__`` (redis-py 8 resolves its own version through
  ``importlib.metadata`` here, for every connection), ``Connection.connect`` (TCP connect
  plus the handshake) and, inside it, the handshake alone (``on_connect``: CLIENT SETINFO
  and the like, which a default client sends and the library's own skips);
- the store's Redis operations (read, try-lock, publish, wait) and the exchange;
- pub/sub: each SUBSCRIBE sent, each message a subscription receives (the waiter's, and the
  backplane's listener thread), the announcement's decoding, the subscription's close;
- the single flight: every thread's ``Flight.run``, so the followers' hand-off shows.

After the exchange, each process is followed from the announcement's arrival to its last
caller's return, which splits the post-exchange lag into transit, the waiter's own work and
the hand-off to the other threads.

Wrapping costs a few microseconds per event, against phases of milliseconds. Each worker also
reports the CPU time its process used during the round, so the fleet's CPU demand can be set
against what 2 cores supply. Writes ``results/stampede_profile_data.md``; what it shows is
discussed in ``results/stampede_profile.md``.
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
    timed(rc.AbstractConnection, "on_connect_check_health", "redis handshake (on_connect)")
    import redis.client as client_module  # noqa: PLC0415

    from k2_shared_token._concurrency import Flight  # noqa: PLC0415
    from k2_shared_token._redis import codec  # noqa: PLC0415

    pubsub = client_module.PubSub
    timed(pubsub, "subscribe", "pubsub SUBSCRIBE sent")
    timed(pubsub, "close", "pubsub close")
    timed(codec, "decode_announcement", "announcement decoded")
    timed(Flight, "run", "Flight.run (every thread)")
    get_message: Callable[..., Any] = pubsub.get_message

    def noted_get_message(self: Any, *args: Any, **kwargs: Any) -> Any:
        """A message received, labelled by kind and by who listens (waiter or backplane)."""
        message = get_message(self, *args, **kwargs)
        if message is not None:
            now = time.monotonic()
            who = idents.setdefault(threading.get_ident(), len(idents))
            listener = (
                "backplane"
                if threading.current_thread().name.startswith("k2-token-backplane")
                else "waiter"
            )
            events.append((f"pubsub {message['type']} received ({listener})", who, now, now))
        return message

    pubsub.get_message = noted_get_message  # type: ignore[method-assign]
    timed(RedisStore, "read", "store.read (GET + 2 PTTL, pipelined)")
    timed(RedisStore, "try_lock", "store.try_lock (script)")
    timed(RedisStore, "publish", "store.publish (script)")
    timed(RedisStore, "wait", "store.wait (subscribe + re-read + wait)")
    timed(ExchangeClient, "fetch", "exchange (HTTP POST to K2)")


CONTENDER = {"own": "library", "user": "library (user client)"}


def worker(
    index: int,
    barrier: Any,
    go: Any,
    results: Any,
    redis_url: str,
    base_url: str,
    prefix: str,
    contender: str,
) -> None:
    events: list[tuple[str, int, float, float]] = []
    _instrument(events)
    client = build(contender, Target(redis_url, base_url, prefix))
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
    parser.add_argument("--client", choices=("own", "user", "both"), default="both")
    args = parser.parse_args(argv)
    kinds = ("own", "user") if args.client == "both" else (args.client,)
    texts = []
    for kind in kinds:
        text = _profile(args.processes, kind)
        print(text)
        texts.append(f"## {CONTENDER[kind]}\n\n{text}")
    out = RESULTS_DIR / "stampede_profile_data.md"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n\n".join(texts)
    out.write_text(
        f"# Where the cold stampede's time goes (P={args.processes}): the measurements\n\n"
        f"Written by `python -m benchmarks.profile_stampede -p {args.processes} --client "
        f"{args.client}` at {when}, load average (1/5/15 min) at the end: {load_average()}. "
        f"What they mean: [stampede_profile.md](stampede_profile.md).\n\n{body}\n"
    )
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


def _profile(p: int, kind: str) -> str:
    """One instrumented round of P processes with that client kind, rendered as markdown."""
    with EmbeddedRedis() as redis_server, FakeK2Server(latency=LATENCY) as k2:
        barrier = CTX.Barrier(p * THREADS + 1)
        go = CTX.Value("d", 0.0)
        results = CTX.Queue()
        prefix = unique_prefix("prof")
        argsets = [
            (i, barrier, go, results, redis_server.url, k2.base_url, prefix, CONTENDER[kind])
            for i in range(p)
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
    return _render(p, start, timelines, [rec.issued_at for rec in issued])


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
    after = _after_exchange(timelines, min(issued) if issued else float("nan"))
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
        "After the exchange, per waiting process (ms; from the exchange's completion at K2, "
        "the fake server's `issued_at`):",
        "",
        after,
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


def _after_exchange(timelines: list[Timeline], issued: float) -> str:
    """Each waiting process from the exchange's completion to its last caller's return:
    the announcement's transit, the waiter's own work, the hand-off to its other threads."""
    stages: dict[str, list[float]] = defaultdict(list)
    for t in timelines:
        if any(w == "exchange (HTTP POST to K2)" for w, *_ in t.events):
            continue  # the winner publishes; it waits for nothing
        got = [s for w, _, s, _ in t.events if w == "pubsub message received (waiter)"]
        waited = [e for w, _, _, e in t.events if w.startswith("store.wait")]
        backplane = [s for w, _, s, _ in t.events if w == "pubsub message received (backplane)"]
        if not got or not waited or not t.calls:
            continue
        last = max(d for _, d in t.calls)
        first = min(d for _, d in t.calls)
        stages["announcement received by the waiter"].append(got[0] - issued)
        if backplane:
            stages["announcement received by the backplane"].append(backplane[0] - issued)
        stages["waiter's wait returned"].append(max(waited) - issued)
        stages["first caller of the process returned"].append(first - issued)
        stages["last caller of the process returned"].append(last - issued)
        stages["(waiter: received to wait returned)"].append(max(waited) - got[0])
        stages["(hand-off: wait returned to last caller)"].append(last - max(waited))
    rows = []
    for what, values in stages.items():
        values.sort()
        rows.append((what, len(values), _ms(statistics.median(values)), _ms(values[-1])))
    return md_table(("stage", "processes", "median (ms)", "max (ms)"), rows, "lrrr")


if __name__ == "__main__":
    sys.exit(main())
