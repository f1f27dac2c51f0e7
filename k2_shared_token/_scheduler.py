"""Every provider's background work in one process, on a fixed number of threads.

A multi-tenant process holds thousands of providers. Given a thread each for its early
refreshes, a thousand tenants that each refreshed once leave a thousand threads behind, and a
thousand tenants coming due together send a thousand token requests to K2 at once. Instead:

* :class:`Scheduler` (blocking side) is one per process: a queue of jobs, a timer heap, and at
  most :data:`WORKERS` worker threads, started on demand and kept (a thread that came and went
  would leave ``threading`` a dummy entry each time). The workers service the heap too, so
  there is no timer thread. A provider's refresher submits its job here; its idle check is a
  timer here. Background jobs therefore run at most :data:`WORKERS` at a time whatever
  ``max_exchanges`` allows; the slots bound the callers' exchanges too.
* :class:`AsyncScheduler` is one per event loop: a job is a task that waits for one of
  :data:`WORKERS` places, and a timer is the loop's own ``call_later`` (already a heap).
* :class:`ExchangeSlots` / :class:`AsyncExchangeSlots` bound how many token exchanges run at
  once in the process (per event loop for asyncio), across every namespace: what the setting
  ``max_exchanges`` caps. The exchange's wait for a slot counts against its deadline, so it
  still ends inside the lock's lease.

A forked child inherits none of the threads, and locks or semaphores that a parent's thread held
at the fork would stay held there: the child starts with none of these objects and makes its own
on first use.
"""

from __future__ import annotations

import _thread
import asyncio
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger("k2_shared_token")

WORKERS = 4  # threads (or concurrent jobs per event loop) for every provider's background work

Job = Callable[[], None]


def weakly(method: Callable[[], None]) -> Job:
    """``method`` as a job that does not keep its object alive: a provider closed and dropped
    while its idle check is due is collected, not held by the timer until it fires."""
    ref = weakref.WeakMethod(method)

    def job() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return job


class Scheduler:
    """The process's worker pool and timer heap for background jobs (blocking side)."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._workers = workers
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[Job] = deque()
        self._timers: list[tuple[float, int, Job]] = []
        self._order = itertools.count()  # ties in the heap never compare the jobs
        self._threads = 0
        self._idle = 0

    @classmethod
    def here(cls) -> Scheduler:
        """This process's scheduler (made on first use, and anew in a forked child)."""
        found = _state.scheduler
        if found is None:
            with _state.lock:
                found = _state.scheduler
                if found is None:
                    found = _state.scheduler = cls()
        return found

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, job: Job) -> None:
        """Run ``job`` on a worker as soon as one is free. Never blocks the caller: a new worker
        is started without waiting for it to run (``Thread.start`` would)."""
        with self._cond:
            self._ready.append(job)
            self._cond.notify()
            # Idle workers that were notified but have not woken yet still count as idle, and
            # the jobs they will take are still queued: more jobs than idle workers, one more.
            if len(self._ready) > self._idle:
                self._start_worker()

    def call_later(self, delay: float, job: Job) -> None:
        """Run ``job`` on a worker after ``delay`` seconds (or later, if all are busy)."""
        with self._cond:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), job))
            self._cond.notify()  # a sleeping worker sets its timeout anew
            if not self._threads:
                self._start_worker()

    def _start_worker(self) -> None:
        if self._threads < self._workers:
            try:
                _thread.start_new_thread(self._work, ())
            except RuntimeError as exc:  # no thread to be had: the workers there carry on
                log.error("could not start a background worker (%s)", type(exc).__name__)
            else:
                self._threads += 1

    def _next(self) -> Job:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    self._ready.append(heapq.heappop(self._timers)[2])
                if self._ready:
                    if len(self._ready) > 1:
                        self._cond.notify(len(self._ready) - 1)  # timers due together
                    return self._ready.popleft()
                self._idle += 1
                try:
                    self._cond.wait(self._timers[0][0] - now if self._timers else None)
                finally:
                    self._idle -= 1

    def _work(self) -> None:
        threading.current_thread().name = "k2-token-worker"
        while True:
            job = self._next()
            try:
                job()
            except Exception as exc:  # the jobs handle their own errors; this is a last net
                log.error("background job failed (%s)", type(exc).__name__)
            except BaseException:
                with self._cond:
                    self._threads -= 1
                raise


class AsyncScheduler:
    """The event loop's share of background jobs: at most :data:`WORKERS` run at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int = WORKERS) -> None:
        self._loop = loop
        self._places = asyncio.Semaphore(workers)

    @classmethod
    def here(cls) -> AsyncScheduler:
        """The running loop's scheduler (made on first use)."""
        loop = asyncio.get_running_loop()
        found = _state.loops.get(loop)
        if found is None:
            found = _state.loops[loop] = cls(loop)
        return found

    def submit(self, job: Callable[[], Awaitable[None]], name: str) -> asyncio.Task[None]:
        """Run ``job`` as a task once a place is free; the task is returned at once, so it can
        be awaited or cancelled (waiting for its place, or running)."""
        return self._loop.create_task(self._run(job), name=name)

    async def _run(self, job: Callable[[], Awaitable[None]]) -> None:
        async with self._places:
            await job()

    def call_later(self, delay: float, job: Job) -> None:
        self._loop.call_later(delay, job)


class ExchangeSlots:
    """At most ``limit`` exchanges at once in this process, for every provider configured with
    that ``limit`` (providers normally share one setting, hence one bound)."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)

    @classmethod
    def here(cls, limit: int) -> ExchangeSlots:
        found = _state.slots.get(limit)
        if found is None:
            with _state.lock:
                found = _state.slots.setdefault(limit, cls(limit))
        return found

    def acquire(self, timeout: float) -> bool:
        return self._slots.acquire(timeout=max(timeout, 0.0))

    def release(self) -> None:
        self._slots.release()


class AsyncExchangeSlots:
    """As :class:`ExchangeSlots`, per event loop."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.BoundedSemaphore(limit)

    @classmethod
    def here(cls, limit: int) -> AsyncExchangeSlots:
        loop = asyncio.get_running_loop()
        per_loop = _state.async_slots.setdefault(loop, {})
        found = per_loop.get(limit)
        if found is None:
            found = per_loop[limit] = cls(limit)
        return found

    async def acquire(self, timeout: float) -> bool:
        """A slot within ``timeout`` seconds, or False. Never leaks one: ``wait_for`` around
        the acquisition can lose a slot acquired just as it times out or is cancelled."""
        if not self._slots.locked():
            return await self._slots.acquire()  # free now: no suspension
        waiter = asyncio.get_running_loop().create_task(self._slots.acquire())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
        except BaseException:
            self._abandon(waiter)
            raise
        if not done:
            self._abandon(waiter)
        return bool(done)

    def _abandon(self, waiter: asyncio.Task[bool]) -> None:
        """Give back the slot if the abandoned acquisition got one after all."""
        waiter.cancel()
        waiter.add_done_callback(lambda t: None if t.cancelled() else self._slots.release())

    def release(self) -> None:
        self._slots.release()


class _State:
    """What a process holds: reset in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scheduler: Scheduler | None = None
        self.slots: dict[int, ExchangeSlots] = {}
        self.loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncScheduler] = (
            weakref.WeakKeyDictionary()
        )
        self.async_slots: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[int, AsyncExchangeSlots]
        ] = weakref.WeakKeyDictionary()


_state = _State()


def _after_fork_in_child() -> None:
    global _state  # noqa: PLW0603 - the one process-wide state, replaced whole
    _state = _State()


os.register_at_fork(after_in_child=_after_fork_in_child)
