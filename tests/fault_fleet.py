"""Load workers for the fault-injection tests (tests/test_faults.py), and the parent's handle.

Importable, so 'spawn' children can run :func:`load_worker`: each child is a clean interpreter,
like a pod, that builds one :class:`SharedTokenProvider` and runs a few threads calling
``get()`` in a paced loop and, every few calls, the fake server's protected API through
``auth()``. Each child records every call (when, outcome, the token's *fingerprint*, never the
token), captures its own log records at DEBUG, and sends everything back at the end through a
Queue, so the test can check invariants and scan what the workers saw for secrets.

Why the live counters are lock-free slots (one row per process, written only by that process):
a test SIGSTOPs or SIGKILLs workers here. A multiprocessing lock, Event or Condition touched
during the run could be held by the stopped or killed process at that instant and freeze the
whole fleet, which would test our harness, not the library. Only the start (a Barrier) and the
final report (a Queue) use shared synchronisation, and neither is touched while faults happen.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, NamedTuple

import requests

from k2_shared_token import AccessToken, SharedTokenProvider
from k2_shared_token._core.metrics import Event
from k2_shared_token._core.tokens import fingerprint_of

CTX: SpawnContext = multiprocessing.get_context("spawn")

# Live counter slots; row ``index`` of the shared array belongs to worker ``index``.
CALLS = 0  # get() calls finished (any outcome)
ERRORS = 1  # get() or API calls that ended in an exception
API_CALLS = 2
API_RETRIED = 3  # API calls whose first answer was a 401 (auth() retried once)
API_NOT_OK = 4  # API calls whose final status was not 200
REDIS_DOWN = 5  # "Redis unavailable" warnings logged
REDIS_BACK = 6  # "Redis answers again" warnings logged
EXCHANGE_OK = 7
EXCHANGE_FAILED = 8
FALLBACK = 9  # exchanges made while the circuit was open (the process-local fallback)
REFRESH_FAILED = 10
LAST_TOKEN = 11  # fingerprint_number() of the token this process served last
SLOTS = 12

_EVENT_SLOTS = {
    "exchange_ok": EXCHANGE_OK,
    "exchange_failed": EXCHANGE_FAILED,
    "fallback": FALLBACK,
    "refresh_failed": REFRESH_FAILED,
}
# The outage log lines the library promises, once each per outage and process.
REDIS_DOWN_TEXT = "Redis unavailable"
REDIS_BACK_TEXT = "Redis answers again"
_MAX_TRACEBACKS = 200


def fingerprint_number(fingerprint: str) -> int:
    """A fingerprint as a positive int64 (its first 15 hex digits), to fit a counter slot."""
    return int(fingerprint.removeprefix("sha256:")[:15], 16)


class CallRecord(NamedTuple):
    """One call as a caller saw it. Times are ``time.monotonic()``: CLOCK_MONOTONIC is one
    clock for every process on the machine, so they compare with the fake server's records."""

    kind: str  # "get" or "api"
    wall: float  # time.time() at the start, for humans reading a dump
    started: float
    ended: float
    outcome: str  # "ok" or the exception's type name
    fingerprint: str  # of the token used (api: of the final attempt); "" on an error
    status: int  # api: the final HTTP status; get: 0
    retried: bool  # api: the first answer was a 401 and auth() retried once
    first_fingerprint: str  # api: of the token of the first attempt


class LogLine(NamedTuple):
    at: float  # time.monotonic() when the record was emitted
    level: str
    logger: str
    message: str  # record.getMessage()
    text: str  # fully formatted, traceback included: what a log file would hold


@dataclass
class WorkerReport:
    index: int
    pid: int
    calls: list[CallRecord] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)  # exceptions callers saw (see saw())
    crashes: list[str] = field(default_factory=list)  # exceptions no code caught (any thread)
    reprs: list[str] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # provider hook events
    # fingerprint -> the earliest expiry (monotonic) the library reported for that token, from
    # AccessToken.expires_at: the library retires a token at its own horizon, which is earlier
    # than K2's by the exchange's transit, so the judge needs it to tell errors apart.
    horizons: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    fatal: str | None = None  # set when the worker could not run at all


@dataclass
class LoadJob:
    """What every worker process is told; the multiprocessing objects travel with it."""

    kwargs: dict[str, Any]
    api_url: str
    threads: int
    duration: float  # a hard bound on the run, in case the test never says stop
    call_interval: float  # pause between two calls of one thread: load, not ordering
    api_every: int  # every n-th call of a thread is also an API call
    barrier: Any  # Barrier(processes * threads + 1): the test is the last party
    stop: Any  # RawValue('b'): the test sets it to end the run (read lock-free)
    counters: Any  # RawArray('q', processes * SLOTS)
    results: Any  # Queue of WorkerReport


class _Capture(logging.Handler):
    """Keeps every record of the process, and counts the outage warnings as they happen."""

    def __init__(self, bump: Any) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[LogLine] = []
        self._bump = bump
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(
            LogLine(time.monotonic(), record.levelname, record.name, message, self.format(record))
        )
        if record.name.startswith("k2_shared_token"):
            if REDIS_DOWN_TEXT in message:
                self._bump(REDIS_DOWN)
            elif REDIS_BACK_TEXT in message:
                self._bump(REDIS_BACK)


def _bearer_fingerprint(request: Any) -> str:
    """The header is the only place a request's token is visible: keep its fingerprint only."""
    header = str(request.headers.get("Authorization", "")) if request is not None else ""
    _, _, token = header.partition(" ")
    return fingerprint_of(token) if token else ""


def load_worker(job: LoadJob, index: int) -> None:
    """Run one worker process: build a provider, run the load threads, report at the end."""
    report = WorkerReport(index, os.getpid())
    base = index * SLOTS
    counter_lock = threading.Lock()  # this process's threads only: never shared with others

    def bump(slot: int) -> None:
        with counter_lock:
            job.counters[base + slot] += 1

    capture = _Capture(bump)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(capture)
    lock = threading.Lock()
    seen_messages: set[str] = set()
    last_tokens: list[AccessToken] = []

    def saw(exc: BaseException) -> str:
        """Keep what a caller saw, for the secret scan: every distinct message, with its full
        traceback (chained causes included) the first time, up to a bound on the report size."""
        message = f"{type(exc).__name__}: {exc!r} {exc}"
        with lock:
            if message not in seen_messages and len(seen_messages) < _MAX_TRACEBACKS:
                seen_messages.add(message)
                report.tracebacks.append(message + "\n" + "".join(traceback.format_exception(exc)))
        bump(ERRORS)
        return type(exc).__name__

    # A library thread dying of an exception would print it to stderr, unseen by the test:
    # keep it instead, to fail on it and to scan it for secrets.
    def crashed(args: threading.ExceptHookArgs) -> None:
        report.crashes.append("".join(traceback.format_exception(args.exc_value)))

    def unraisable(args: sys.UnraisableHookArgs) -> None:
        text = "".join(traceback.format_exception(args.exc_value)) if args.exc_value else ""
        report.crashes.append(f"{args.err_msg or 'unraisable'}: {args.object!r}\n{text}")

    threading.excepthook = crashed
    sys.unraisablehook = unraisable

    def on_event(event: Event) -> None:
        with lock:
            report.events.append((time.monotonic(), event.name))
        slot = _EVENT_SLOTS.get(event.name)
        if slot is not None:
            bump(slot)

    try:
        provider = SharedTokenProvider(**job.kwargs, hooks=[on_event])
    except Exception as exc:  # reported: the test fails on it with the reason
        report.fatal = "".join(traceback.format_exception(exc))
        with contextlib.suppress(threading.BrokenBarrierError):
            job.barrier.abort()
        job.results.put(report)
        return

    def api_call(session: requests.Session) -> CallRecord:
        wall, started = time.time(), time.monotonic()
        try:
            reply = session.get(job.api_url, timeout=5)
        except Exception as exc:
            return CallRecord("api", wall, started, time.monotonic(), saw(exc), "", 0, False, "")
        ended = time.monotonic()
        retried = bool(reply.history) and reply.history[0].status_code == 401
        first = reply.history[0].request if reply.history else reply.request
        reply.close()
        bump(API_CALLS)
        if retried:
            bump(API_RETRIED)
        if reply.status_code != 200:
            bump(API_NOT_OK)
        return CallRecord(
            "api",
            wall,
            started,
            ended,
            "ok",
            _bearer_fingerprint(reply.request),
            reply.status_code,
            retried,
            _bearer_fingerprint(first),
        )

    def run() -> None:
        mine: list[CallRecord] = []
        horizons: dict[str, float] = {}
        session = requests.Session()
        session.auth = provider.auth()
        try:
            job.barrier.wait(60)
        except threading.BrokenBarrierError:
            session.close()
            return
        end = time.monotonic() + job.duration
        n = 0
        token: AccessToken | None = None
        while not job.stop.value and time.monotonic() < end:
            n += 1
            wall, started = time.time(), time.monotonic()
            try:
                token = provider.get()
                fingerprint = fingerprint_of(token.value)
                job.counters[base + LAST_TOKEN] = fingerprint_number(fingerprint)
                horizon = token.expires_at - time.time() + time.monotonic()
                if horizon < horizons.get(fingerprint, math.inf):
                    horizons[fingerprint] = horizon
                mine.append(
                    CallRecord(
                        "get", wall, started, time.monotonic(), "ok", fingerprint, 0, False, ""
                    )
                )
            except Exception as exc:
                mine.append(
                    CallRecord("get", wall, started, time.monotonic(), saw(exc), "", 0, False, "")
                )
            bump(CALLS)
            if job.api_every and n % job.api_every == 0:
                mine.append(api_call(session))
            time.sleep(job.call_interval)
        session.close()
        with lock:
            report.calls.extend(mine)
            for fingerprint, horizon in horizons.items():
                report.horizons[fingerprint] = min(
                    horizon, report.horizons.get(fingerprint, math.inf)
                )
            if token is not None:
                last_tokens.append(token)

    pool = [threading.Thread(target=run, name=f"load-{index}-{i}") for i in range(job.threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    report.reprs = [
        repr(provider),
        str(provider),
        repr(provider.auth()),
        repr(provider.settings),
        repr(provider.keys),
        *(repr(t) for t in last_tokens),
        *(str(t) for t in last_tokens),
    ]
    report.stats = provider.stats()
    provider.close()
    root.removeHandler(capture)
    report.logs = capture.lines
    report.reprs.append(repr(report.stats))
    job.results.put(report)
    job.results.close()
    job.results.join_thread()


class Fleet:
    """The parent's side: start the workers, watch their counters, stop them, collect reports.

    Every child is ended by its PID on exit, whatever happened (a stopped child is continued
    first, so it can be killed and reaped).
    """

    def __init__(
        self,
        kwargs: dict[str, Any],
        api_url: str,
        *,
        processes: int = 4,
        threads: int = 4,
        duration: float = 60.0,
        call_interval: float = 0.01,
        api_every: int = 10,
    ) -> None:
        self.processes = processes
        self.job = LoadJob(
            kwargs=kwargs,
            api_url=api_url,
            threads=threads,
            duration=duration,
            call_interval=call_interval,
            api_every=api_every,
            barrier=CTX.Barrier(processes * threads + 1),
            stop=CTX.RawValue("b", 0),
            counters=CTX.RawArray("q", processes * SLOTS),
            results=CTX.Queue(),
        )
        self.children: list[SpawnProcess] = []
        self.killed: set[int] = set()  # indexes of children the test SIGKILLed
        self.started_at = 0.0
        self._tick = threading.Event()  # never set: its wait() is a bounded pause in wait_until

    def __enter__(self) -> Fleet:
        try:
            for index in range(self.processes):
                child = CTX.Process(target=load_worker, args=(self.job, index), daemon=True)
                child.start()
                self.children.append(child)
            # Every thread of every worker has built its provider and session: start together.
            self.job.barrier.wait(60)
        except BaseException:
            self.__exit__()
            raise
        self.started_at = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        """After :meth:`stop` every child has exited; on a failure, end the rest by PID now
        (continued first if stopped), rather than wait for reports nobody will read."""
        self.job.stop.value = 1
        for child in self.children:
            if child.is_alive() and child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGCONT)
                child.kill()
                child.join(5)
        self.job.results.cancel_join_thread()
        self.job.results.close()

    # -- who is who --------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children if c.pid is not None]

    def index_of(self, pid: int) -> int:
        for index, child in enumerate(self.children):
            if child.pid == pid:
                return index
        raise LookupError(f"pid {pid} is not one of this fleet's workers")

    def signal(self, index: int, signum: int) -> None:
        pid = self.children[index].pid
        assert pid is not None
        os.kill(pid, signum)
        if signum == signal.SIGKILL:
            self.killed.add(index)
            self.children[index].join(10)

    # -- live counters -----------------------------------------------------------------------

    def count(self, slot: int, index: int | None = None) -> int:
        rows = range(self.processes) if index is None else (index,)
        return sum(int(self.job.counters[i * SLOTS + slot]) for i in rows)

    def per_process(self, slot: int) -> list[int]:
        return [self.count(slot, i) for i in range(self.processes)]

    def wait_until(self, condition: Any, timeout: float) -> bool:
        """Wait (bounded) until ``condition()`` holds; True if it did."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                return False
            self._tick.wait(0.01)
        return True

    def wait_calls(
        self, more: int, timeout: float = 20.0, *, among: set[int] | None = None
    ) -> bool:
        """Wait until the fleet (or the workers ``among``) has made ``more`` calls from now."""
        rows = set(range(self.processes)) - self.killed if among is None else among

        def calls() -> int:
            return sum(self.count(CALLS, i) for i in rows)

        target = calls() + more
        return self.wait_until(lambda: calls() >= target, timeout)

    # -- the end -----------------------------------------------------------------------------

    def stop(self, timeout: float = 60.0) -> list[WorkerReport]:
        """End the run and return the report of every worker that was not killed."""
        self.job.stop.value = 1
        reports: list[WorkerReport] = []
        deadline = time.monotonic() + timeout
        while len(reports) < self.processes - len(self.killed):
            reports.append(self.job.results.get(timeout=max(0.1, deadline - time.monotonic())))
        for child in self.children:
            child.join(10)
        fatal = [r.fatal for r in reports if r.fatal]
        assert not fatal, "a worker could not run:\n" + "\n".join(fatal)
        return sorted(reports, key=lambda r: r.index)
