"""What the Cluster and Sentinel tests share: a fleet, a recovery measure, an asyncio check.

The fleet is a set of worker processes that serves several test steps.

Spawning a clean interpreter that imports the library costs about 0.65 s of CPU on the 2-core
test machine, so a module starts its fleet once and hands it one step at a time: a cold stampede
at a barrier, or a load run until told to stop. Every step builds fresh providers from the URL
it is given, so each starts cold, like newly started pods.

Workers report as they go, through one queue, what the test orders its steps by and measures:
each change of the token a worker hands out (as a fingerprint), each caller error, and the
provider's own events (``redis_error``, ``fallback``, ``exchange_ok``) through its ``hooks``.
All instants are ``time.monotonic()``, one clock for every process on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

from k2_shared_token import AsyncSharedTokenProvider, SharedCacheError, SharedTokenProvider
from k2_shared_token._core.metrics import Event
from k2_shared_token._core.tokens import fingerprint_of
from k2_shared_token.testing.fake_k2 import FakeK2Server
from tests.conftest import provider_kwargs, wait_until

CTX: SpawnContext = multiprocessing.get_context("spawn")

# (kind, worker index, payload, monotonic instant)
Report = tuple[str, int, Any, float]
HOOKED = ("redis_error", "fallback", "exchange_ok")


# -- the worker side (runs in the spawned processes) ------------------------------------------


class _Forward(logging.Handler):
    """The library's warnings go to the test (which prints a digest), not to stderr 8 times."""

    def __init__(self, index: int, reports: Queue[Report | None]) -> None:
        super().__init__(logging.WARNING)
        self.index = index
        self.reports = reports

    def emit(self, record: logging.LogRecord) -> None:
        self.reports.put(("log", self.index, record.getMessage(), time.monotonic()))


def _serve(
    index: int,
    commands: Queue[tuple[Any, ...]],
    reports: Queue[Report | None],
    barrier: Barrier,
    stop: MpEvent,
) -> None:
    logging.getLogger("k2_shared_token").addHandler(_Forward(index, reports))
    while True:
        command = commands.get()
        try:
            if command[0] == "stampede":
                _stampede(index, command[1], command[2], barrier, reports)
            elif command[0] == "load":
                _load(index, command[1], command[2], command[3], stop, reports)
            else:
                return
        except Exception as exc:  # the step fails at once, with the reason, not after a timeout
            reports.put(("result", index, {"crashed": repr(exc)}, time.monotonic()))


def _stampede(
    index: int,
    kwargs: dict[str, Any],
    threads: int,
    barrier: Barrier,
    reports: Queue[Report | None],
) -> None:
    provider = SharedTokenProvider(**kwargs)
    outcomes: list[tuple[str, str]] = []

    def ask() -> None:
        barrier.wait(60)
        try:
            outcomes.append(("ok", fingerprint_of(provider.get_token())))
        except Exception as exc:  # reported to the test, which fails on it
            outcomes.append(("error", f"{type(exc).__name__}: {exc}"))

    callers = [threading.Thread(target=ask) for _ in range(threads)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    stats = provider.stats()
    provider.close()
    reports.put(("result", index, {"outcomes": outcomes, "stats": stats}, time.monotonic()))


def _load(
    index: int,
    kwargs: dict[str, Any],
    threads: int,
    period: float,
    stop: MpEvent,
    reports: Queue[Report | None],
) -> None:
    def hook(event: Event) -> None:
        if event.name in HOOKED:
            reports.put((event.name, index, None, time.monotonic()))

    provider = SharedTokenProvider(**kwargs, hooks=[hook])
    done = threading.Event()
    lock = threading.Lock()
    last: list[str] = []
    totals = {"calls": 0, "errors": 0, "min_seconds_left": math.inf}

    def call() -> None:
        calls = errors = 0
        min_left = math.inf
        while not done.is_set():
            try:
                token = provider.get()
            except Exception as exc:  # a caller error: the test fails on any
                errors += 1
                reports.put(("error", index, f"{type(exc).__name__}: {exc}", time.monotonic()))
            else:
                calls += 1
                min_left = min(min_left, token.seconds_left())
                printed = fingerprint_of(token.value)
                with lock:
                    if not last or last[-1] != printed:
                        last.append(printed)
                        reports.put(("token", index, printed, time.monotonic()))
            done.wait(period)
        with lock:
            totals["calls"] += calls
            totals["errors"] += errors
            totals["min_seconds_left"] = min(totals["min_seconds_left"], min_left)

    def watch() -> None:
        stop.wait()
        done.set()

    workers = [threading.Thread(target=call) for _ in range(threads)]
    workers.append(threading.Thread(target=watch))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stats = provider.stats()
    provider.close()
    summary = {**totals, "stats": stats, "local_cache": kwargs.get("local_cache", True)}
    reports.put(("result", index, summary, time.monotonic()))


# -- the test side -----------------------------------------------------------------------------


@dataclass
class FleetLog:
    """Everything the workers reported during one step; ``wait_for`` wakes on each report."""

    workers: int
    tokens: dict[int, str] = field(default_factory=dict)
    token_changes: list[tuple[int, str, float]] = field(default_factory=list)
    errors: list[tuple[int, str, float]] = field(default_factory=list)
    hooked: list[tuple[str, int, float]] = field(default_factory=list)
    logs: list[tuple[int, str, float]] = field(default_factory=list)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, report: Report) -> None:
        kind, index, payload, at = report
        with self._cond:
            if kind == "token":
                self.tokens[index] = payload
                self.token_changes.append((index, payload, at))
            elif kind == "error":
                self.errors.append((index, payload, at))
            elif kind == "result":
                self.results[index] = payload
            elif kind == "log":
                self.logs.append((index, payload, at))
            else:
                self.hooked.append((kind, index, at))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[FleetLog], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def all_hold(self, printed: str) -> bool:
        return len(self.tokens) == self.workers and set(self.tokens.values()) == {printed}

    def agreed(self) -> str | None:
        """The token every worker hands out, if they all hand out the same one."""
        values = set(self.tokens.values())
        return values.pop() if len(self.tokens) == self.workers and len(values) == 1 else None

    def adopted_at(self, printed: str) -> list[float]:
        """When each worker first handed out ``printed``."""
        with self._cond:
            first: dict[int, float] = {}
            for index, value, at in self.token_changes:
                if value == printed:
                    first.setdefault(index, at)
            return list(first.values())

    def count(self, kind: str, since: float = -math.inf, until: float = math.inf) -> int:
        """Hooked provider events of ``kind`` reported for instants in [since, until)."""
        with self._cond:
            return sum(1 for name, _i, at in self.hooked if name == kind and since <= at < until)

    def caller_errors(self) -> list[tuple[int, str, float]]:
        with self._cond:
            return list(self.errors)

    def outages(self, since: float, until: float = math.inf) -> list[float]:
        """The Redis outages the providers logged as over ("answers again after N s"): each
        process's own time from its first failed call to its first good one. For display."""
        with self._cond:
            found = [_OUTAGE.search(text) for _i, text, at in self.logs if since <= at < until]
        return sorted(float(match.group(1)) for match in found if match)


_OUTAGE = re.compile(r"answers again after ([0-9.]+) s")


class Fleet:
    """``processes`` spawned workers of ``threads`` caller threads each; stop it by ``close``."""

    def __init__(self, processes: int, threads: int) -> None:
        self.processes = processes
        self.threads = threads
        self._reports: Queue[Report | None] = CTX.Queue()
        self._commands: list[Queue[tuple[Any, ...]]] = [CTX.Queue() for _ in range(processes)]
        self._barrier = CTX.Barrier(processes * threads)
        self._stop = CTX.Event()
        self._children: list[SpawnProcess] = []
        self._log: FleetLog | None = None
        self._collector = threading.Thread(target=self._collect, daemon=True)

    def start(self) -> Fleet:
        """Start the processes; they boot while the caller does other work (a topology)."""
        self._collector.start()
        for index in range(self.processes):
            child = CTX.Process(
                target=_serve,
                args=(index, self._commands[index], self._reports, self._barrier, self._stop),
            )
            self._children.append(child)
            child.start()
        return self

    def _collect(self) -> None:
        while True:
            report = self._reports.get()
            if report is None:
                return
            log = self._log
            if log is not None:
                log.add(report)

    def _run(self, commands: list[tuple[Any, ...]]) -> FleetLog:
        log = self._log = FleetLog(self.processes)
        for queue, command in zip(self._commands, commands, strict=True):
            queue.put(command)
        return log

    def _results(self, log: FleetLog, timeout: float) -> dict[int, dict[str, Any]]:
        if not log.wait_for(lambda got: len(got.results) == self.processes, timeout):
            raise AssertionError(f"only {len(log.results)}/{self.processes} workers reported")
        crashed = {i: r["crashed"] for i, r in log.results.items() if "crashed" in r}
        if crashed:
            raise AssertionError(f"workers failed: {crashed}")
        return dict(log.results)

    def stampede(self, kwargs: dict[str, Any], timeout: float = 60) -> FleetLog:
        """Every thread of every worker asks at once, on a cold provider."""
        log = self._run([("stampede", kwargs, self.threads)] * self.processes)
        self._results(log, timeout)
        return log

    @contextlib.contextmanager
    def load(
        self, kwargs: list[dict[str, Any]], period: float = 0.01, timeout: float = 60
    ) -> Iterator[FleetLog]:
        """Worker ``i`` calls ``get()`` in every thread with ``kwargs[i]`` until the block ends;
        the results are in the log afterwards, also when the block fails."""
        self._stop.clear()
        log = self._run([("load", kw, self.threads, period) for kw in kwargs])
        try:
            yield log
        except BaseException:
            self._stop.set()
            with contextlib.suppress(AssertionError):  # the first failure is the one to see
                self._results(log, timeout)
            raise
        self._stop.set()
        self._results(log, timeout)

    def close(self) -> None:
        """Stop every worker: asked first, then killed by PID if it does not exit."""
        self._stop.set()
        for queue in self._commands:
            with contextlib.suppress(Exception):
                queue.put(("exit",))
        for child in self._children:
            child.join(10)
            if child.is_alive():  # pragma: no cover - only on a hang
                child.kill()
                child.join(5)
        self._reports.put(None)
        self._collector.join(5)
        self._reports.close()
        self._reports.join_thread()
        for queue in self._commands:
            queue.close()
            queue.join_thread()


# -- measuring a recovery ----------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """How the fleet came back after a fault that began at ``fault_at`` (monotonic)."""

    readable_after: float  # a new provider, sharing only (no fallback), got the shared token
    lost_token: bool  # that first read had to exchange: the fault lost the stored token
    converged_after: float  # every worker hands out the token written after the fault
    reshare_seconds: float  # from the invalidation to the last worker adopting its successor
    rollover_exchanges: int  # what that forced rollover cost at K2 (1: the fleet shared)

    def line(self) -> str:
        return (
            f"readable again after {self.readable_after:.2f}s"
            f"{' (stored token lost, re-exchanged)' if self.lost_token else ''}, "
            f"fleet on one new shared token after {self.converged_after:.2f}s "
            f"({self.reshare_seconds:.2f}s after the forced rollover, "
            f"{self.rollover_exchanges} exchange)"
        )


def _strict(kwargs: dict[str, Any]) -> SharedTokenProvider:
    """A new process's view: no fallback, so a Redis failure is an error, not a local token."""
    return SharedTokenProvider(**{**kwargs, "on_redis_error": "raise", "local_cache": True})


def recover(
    kwargs: dict[str, Any],
    fake_k2: FakeK2Server,
    log: FleetLog,
    fault_at: float,
    timeout: float = 30.0,
    poll: float = 0.05,
) -> Recovery:
    """Measure the way back to sharing after a fault.

    1. Until one succeeds, a fresh provider without fallback reads the namespace; a second one
       must then read the same token without exchanging (it is shared again, for new processes).
    2. That token is invalidated (a compare-and-delete, so a write on the current primary), and
       the fleet must replace it with exactly one exchange and all hand out the successor: the
       running processes share again, not just Redis answering.
    """
    deadline = time.monotonic() + timeout
    probe_exchanges = 0.0
    while True:
        probe = _strict(kwargs)
        try:
            token = probe.get_token()
            break
        except SharedCacheError:
            if time.monotonic() > deadline:
                raise
            time.sleep(poll)  # polling the topology's state, bounded by the deadline
        finally:
            probe_exchanges += probe.stats()["exchange_ok"]
            probe.close()
    readable_after = time.monotonic() - fault_at
    second = _strict(kwargs)
    try:
        assert second.get_token() == token
        assert second.stats()["exchange_ok"] == 0
        requests = fake_k2.token_requests
        invalidated_at = time.monotonic()
        assert second.invalidate(token), "the shared token was not in Redis to invalidate"
    finally:
        second.close()
    assert fake_k2.wait_for_token_requests(
        requests + 1, timeout=max(deadline - time.monotonic(), 1)
    )
    successor = fingerprint_of(fake_k2.issued[-1].token)
    assert log.wait_for(lambda got: got.all_hold(successor), max(deadline - time.monotonic(), 1)), (
        f"the fleet did not converge on {successor}: {log.tokens}"
    )
    adopted = log.adopted_at(successor)
    return Recovery(
        readable_after=readable_after,
        lost_token=probe_exchanges > 0,
        converged_after=max(adopted) - fault_at,
        reshare_seconds=max(adopted) - invalidated_at,
        rollover_exchanges=fake_k2.token_requests - requests,
    )


def summary(log: FleetLog) -> dict[str, float]:
    """Fleet-wide totals of the workers' results (calls, caller errors, provider counters)."""
    out: dict[str, float] = {"calls": 0, "errors": 0, "min_seconds_left": math.inf}
    for result in log.results.values():
        out["calls"] += result["calls"]
        out["errors"] += result["errors"]
        out["min_seconds_left"] = min(out["min_seconds_left"], result["min_seconds_left"])
        for name in ("redis_error", "fallback", "exchange_ok", "shared_hit", "wait"):
            out[name] = out.get(name, 0) + result["stats"][name]
    return out


# -- asyncio and blocking providers on one topology --------------------------------------------


async def _until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)  # polling the server's state, bounded by the deadline


async def async_shares_with_sync(
    kwargs: dict[str, Any], fake_k2: FakeK2Server, subscribers: Callable[[str], int]
) -> None:
    """An asyncio provider and a blocking one share one token both ways, with no extra exchange.

    First an asyncio caller waits for a blocking holder's exchange and is woken by its
    announcement (``subscribers(channel)`` tells when it listens); then a blocking reader
    takes what an asyncio provider exchanged.
    """
    assert fake_k2.exchanges == 0
    # Without the backplane: its subscriptions would satisfy ``subscribers`` before the wait.
    kwargs = {**kwargs, "backplane": False}
    holder = SharedTokenProvider(**kwargs)
    held: list[str] = []
    fake_k2.pause_tokens()
    thread = threading.Thread(target=lambda: held.append(holder.get_token()))
    thread.start()
    waiter = AsyncSharedTokenProvider(**kwargs)
    try:
        assert await asyncio.to_thread(fake_k2.wait_for_token_requests, 1, 10)
        waiting = asyncio.create_task(waiter.get_token())
        await _until(lambda: subscribers(waiter.keys.channel) >= 1, 10)
        fake_k2.resume_tokens()
        token = await asyncio.wait_for(waiting, 10)
        await asyncio.to_thread(thread.join, 10)
        assert held == [token]
        assert fake_k2.exchanges == 1
        assert waiter.stats()["wait"] == 1
        assert waiter.stats()["exchange_ok"] == 0

        assert await waiter.invalidate(token)
        exchanger = AsyncSharedTokenProvider(**kwargs)
        try:
            fresh = await exchanger.get_token()
        finally:
            await exchanger.aclose()
        assert fresh != token
        assert fake_k2.exchanges == 2
        reader = SharedTokenProvider(**kwargs)
        try:
            assert await asyncio.to_thread(reader.get_token) == fresh
            assert reader.stats()["exchange_ok"] == 0
        finally:
            reader.close()
    finally:
        fake_k2.resume_tokens()
        await waiter.aclose()
        await asyncio.to_thread(thread.join, 10)
        holder.close()


def backplane_drops_copies(url: str, fake_k2: FakeK2Server) -> None:
    """On this topology, an invalidation by one provider drops the others' copies through the
    fleet backplane, and ``status()`` counts the processes listening."""
    providers = [SharedTokenProvider(**provider_kwargs(url, fake_k2.base_url)) for _ in range(3)]
    try:
        token = providers[0].get_token()
        assert all(p.get_token() == token for p in providers)
        wait_until(lambda: all(p.stats()["backplane"] == 1 for p in providers), 10, "listeners")
        assert providers[0].status()["listening"] in (None, 3)
        assert providers[0].invalidate(token)
        wait_until(
            lambda: all(p._local.held is None for p in providers[1:]), 3, "copies to drop"
        )
    finally:
        for p in providers:
            p.close()
