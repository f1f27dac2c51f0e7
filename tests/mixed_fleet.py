"""Worker processes for the mixed fleet test: blocking and asyncio workers on one namespace.

Importable, so 'spawn' children can run them (see :mod:`tests.fleet`). Each worker builds its
provider, reports ready at a cross-process barrier, learns the common end instant from the
coordinator at the barrier's second phase, and then calls ``get_token()`` until that instant.
It sends back, per token, the first and last instant (``time.monotonic()``, one clock for every
process on Linux and the fake server's clock too) at which a caller held it, so the test can
check each use against the fake server's own record of when the token was issued.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from k2_shared_token import AsyncSharedTokenProvider, SharedTokenProvider

# token -> (first use, last use), monotonic seconds
Seen = dict[str, tuple[float, float]]


@dataclass
class Report:
    kind: str  # "sync" or "async"
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    seen: Seen = field(default_factory=dict)

    def note(self, token: str) -> None:
        now = time.monotonic()
        span = self.seen.get(token)
        self.seen[token] = (now, now) if span is None else (span[0], now)
        self.calls += 1

    def merge(self, other: Report) -> None:
        self.calls += other.calls
        self.errors += other.errors
        for token, (first, last) in other.seen.items():
            span = self.seen.get(token)
            self.seen[token] = (
                (first, last) if span is None else (min(span[0], first), max(span[1], last))
            )


def _released(barrier: Any, end: Any, timeout: float) -> float:
    """Both phases of the start: ready, then released with the end instant set. The
    coordinator writes ``end`` between the phases, so every worker reads the same value."""
    barrier.wait(timeout)
    barrier.wait(timeout)
    return float(end.value)


def sync_worker(
    kwargs: dict[str, Any],
    barrier: Any,
    end: Any,
    results: Any,
    threads: int,
    pace: float,
    timeout: float,
) -> None:
    """``threads`` threads of one process share one blocking provider, as gthread workers do."""
    provider = SharedTokenProvider(**kwargs)
    go = threading.Event()
    reports = [Report("sync") for _ in range(threads)]
    until: list[float] = []

    def loop(report: Report) -> None:
        go.wait(timeout)
        while until and time.monotonic() < until[0]:
            try:
                report.note(provider.get_token())
            except Exception as exc:  # reported to the test, which fails on it
                report.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(pace)  # the load's pace, not an ordering

    pool = [threading.Thread(target=loop, args=(r,), daemon=True) for r in reports]
    for thread in pool:
        thread.start()
    try:
        until.append(_released(barrier, end, timeout))
    finally:
        go.set()  # on a broken barrier, `until` is empty and the threads leave at once
    for thread in pool:
        thread.join(timeout)
    provider.close()
    total = Report("sync")
    for report in reports:
        total.merge(report)
    results.put(total)


def async_worker(
    kwargs: dict[str, Any],
    barrier: Any,
    end: Any,
    results: Any,
    tasks: int,
    pace: float,
    timeout: float,
) -> None:
    """``tasks`` concurrent tasks of one event loop share one asyncio provider."""
    results.put(asyncio.run(_async_main(kwargs, barrier, end, tasks, pace, timeout)))


async def _async_main(
    kwargs: dict[str, Any], barrier: Any, end: Any, tasks: int, pace: float, timeout: float
) -> Report:
    report = Report("async")
    go = asyncio.Event()
    until: list[float] = []

    async def loop(provider: AsyncSharedTokenProvider) -> None:
        await go.wait()
        while until and time.monotonic() < until[0]:
            try:
                report.note(await provider.get_token())
            except Exception as exc:
                report.errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(pace)  # the load's pace, not an ordering

    async with AsyncSharedTokenProvider(**kwargs) as provider:
        running = [asyncio.create_task(loop(provider)) for _ in range(tasks)]
        try:
            until.append(await asyncio.to_thread(_released, barrier, end, timeout))
        finally:
            go.set()
            await asyncio.wait_for(asyncio.gather(*running), timeout)
    return report
