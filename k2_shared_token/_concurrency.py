"""The few primitives the I/O shells are written against, one per side.

The provider, store, exchange and registry are written once, for asyncio, in :mod:`._async`;
the blocking ones in :mod:`._sync` are generated from them (``tools/unasync.py``). What cannot
be generated is how each side waits and runs work off the callers' path: asyncio has tasks,
blocking code has threads (greenlets under gevent's monkey-patching). Those primitives are
written here for both sides, as name pairs (``AsyncFlight`` and ``Flight``); no decision about
tokens lives here.

Interruption is designed in, not patched on:

* :class:`AsyncFlight` runs the shared work as a task of its own and every caller, the first
  included, awaits it through :func:`asyncio.shield`. A caller cancelled (a client disconnect,
  ``asyncio.timeout``) just stops waiting; the exchange goes on, is published for the fleet, and
  the other callers get its token.
* :class:`Flight` runs the work in the first caller's thread (a hand-off to another thread would
  cost every cold call a context switch). An interruption delivered to that thread
  (``KeyboardInterrupt``, a gevent ``Timeout``) stops the work there; the driver settles the
  lock (:class:`.flow.LockGuard`), and the waiting threads are not failed with it: one of them
  leads a new attempt.
* The refreshers survive any error of their job: it is counted and logged by the ``on_error``
  the provider passes, and the next kick runs again.
"""

from __future__ import annotations

import _thread
import asyncio
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, Protocol, TypeVar

from ._core.errors import TokenUnavailableError
from ._scheduler import AsyncScheduler, Scheduler

T = TypeVar("T")

_FLIGHT_TIMEOUT = "no token within wait_timeout: this process's refresh is still running"


class _LeaderInterruptedError(Exception):
    """Given to the threads waiting on a leader that a BaseException took away."""


class Flight(Generic[T]):
    """One in-flight call per process; the other threads wait for its result or its error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Future[T] | None = None

    def run(self, call: Callable[[], T], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                future = self._current
                leader = future is None
                if future is None:
                    future = self._current = Future()
            if leader:
                return self._lead(future, call)
            try:
                return future.result(max(deadline - time.monotonic(), 0))
            except FutureTimeout:
                raise TokenUnavailableError(_FLIGHT_TIMEOUT) from None
            except _LeaderInterruptedError:
                continue  # the leader was interrupted, not failed: lead or follow anew

    def _lead(self, future: Future[T], call: Callable[[], T]) -> T:
        try:
            result = call()
        except Exception as exc:
            self._finish()
            future.set_exception(exc)
            raise
        except BaseException:
            self._finish()
            future.set_exception(_LeaderInterruptedError())
            raise
        self._finish()
        future.set_result(result)
        # Hand the GIL over now: otherwise the waiting threads sit out up to a switch interval
        # (5 ms) each while this one keeps running, which a cold fleet of many multi-threaded
        # processes on few cores pays many times over.
        time.sleep(0)
        return result

    def _finish(self) -> None:
        # Before the result is set: a woken follower must find the slot free.
        with self._lock:
            self._current = None


class AsyncFlight(Generic[T]):
    """One in-flight call per event loop, run as a task that every caller awaits shielded."""

    def __init__(self) -> None:
        self._task: asyncio.Task[T] | None = None

    async def run(self, call: Callable[[], Awaitable[T]], timeout: float) -> T:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._task = loop.create_task(self._lead(call))
            task.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            raise TokenUnavailableError(_FLIGHT_TIMEOUT) from None

    async def _lead(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        finally:
            if self._task is asyncio.current_task():
                self._task = None


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every caller may have been cancelled: the error is theirs to see, not asyncio's to warn of.
    if not task.cancelled():
        task.exception()


class Timer:
    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


class AsyncTimer:
    @staticmethod
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Started:
    """A daemon thread's handle: started without waiting for it to run, and its end."""

    def __init__(self, job: Callable[[], None], name: str) -> None:
        self._job = job
        self._name = name
        self.ident: int | None = None
        self.done = threading.Event()

    def _main(self) -> None:
        self.ident = threading.get_ident()
        threading.current_thread().name = self._name
        try:
            self._job()
        finally:
            self.done.set()


class Daemon:
    """A job that runs for a long time off the callers' path (the fleet backplane's listener):
    a daemon thread here, a task on the asyncio side.

    Started as the refresher's thread is (``_thread.start_new_thread``): ``Thread.start``
    blocks until the new thread runs, and a cold process starts this one on its callers' path,
    when on a busy machine that wait is a scheduler's turn."""

    @staticmethod
    def start(job: Callable[[], None], name: str) -> _Started:
        started = _Started(job, name)
        _thread.start_new_thread(started._main, ())
        return started

    @staticmethod
    def stop(thread: _Started) -> None:
        """The job ends by itself once it has nothing left to do; wait a little for it."""
        if thread.ident != threading.get_ident():
            thread.done.wait(1.0)


class AsyncDaemon:
    @staticmethod
    def start(job: Callable[[], Awaitable[None]], name: str) -> asyncio.Task[None]:
        async def run() -> None:
            await job()

        return asyncio.get_running_loop().create_task(run(), name=name)

    @staticmethod
    async def stop(task: asyncio.Task[None]) -> None:
        if task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


Job = Callable[[], float | None]
AsyncJob = Callable[[], Awaitable[float | None]]
OnError = Callable[[BaseException], float]


class Refresher:
    """Early refresh off the callers' path, on the process's :class:`.._scheduler.Scheduler`.

    The caller that notices a stale token queues the job and returns the current token at once;
    at most one job per provider is queued or running. The job returns ``None`` when done, or
    seconds to pause before the next kick may run it again.
    """

    def __init__(self, job: Job, on_error: OnError, name: str) -> None:
        self._job = job
        self._on_error = on_error
        self._name = name
        self._lock = threading.Lock()
        self._pending = False  # a job is queued or running
        self._done: threading.Event | None = None  # made by join(), only while a job is pending
        self._not_before = 0.0
        self._closed = False

    def kick(self) -> None:
        """Queue a job unless one is pending or the last one asked for a pause. No blocking."""
        if self._pending or time.monotonic() < self._not_before:
            return
        with self._lock:
            if self._pending or self._closed:
                return
            self._pending = True
        Scheduler.here().submit(self._run)

    def _run(self) -> None:
        pause: float | None = None
        try:
            if not self._closed:
                pause = self._job()
        except Exception as exc:
            pause = self._on_error(exc)
        finally:
            if pause:
                self._not_before = time.monotonic() + pause
            with self._lock:
                self._pending = False
                done, self._done = self._done, None
            if done is not None:
                done.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is pending (tests, orderly shutdown). True if idle. The event is
        made here rather than per provider: thousands of idle tenants need none."""
        with self._lock:
            if not self._pending:
                return True
            done = self._done = self._done or threading.Event()
        return done.wait(timeout)

    def close(self) -> None:
        """No job starts after this; a running one finishes (its effects are refused)."""
        self._closed = True
        self.join(1.0)

    def after_fork(self) -> Refresher:
        """A child inherits no worker: a new refresher, on the child's own scheduler."""
        return Refresher(self._job, self._on_error, self._name)


class AsyncRefresher:
    """The asyncio refresher: a task per refresh, one at a time, on the loop's
    :class:`.._scheduler.AsyncScheduler`."""

    def __init__(self, job: AsyncJob, on_error: OnError, name: str) -> None:
        self._job = job
        self._on_error = on_error
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._not_before = 0.0
        self._closed = False

    def kick(self) -> None:
        task = self._task
        # A task cancelled before it ran (its event loop ended) never cleared itself.
        if (task is not None and not task.done()) or self._closed:
            return
        if time.monotonic() < self._not_before:
            return
        self._task = AsyncScheduler.here().submit(self._run, self._name)

    async def _run(self) -> None:
        try:
            pause = await self._job()
        except Exception as exc:
            pause = self._on_error(exc)
        finally:
            self._task = None
        if pause:
            self._not_before = time.monotonic() + pause

    async def join(self, timeout: float | None = None) -> bool:
        """Wait for a running refresh (tests, orderly shutdown). True if idle."""
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            return bool(done)
        return True

    async def aclose(self) -> None:
        """No job starts after this; a running one is cancelled (the driver settles its lock)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def after_fork(self) -> AsyncRefresher:
        return AsyncRefresher(self._job, self._on_error, self._name)


class _ForkAware(Protocol):
    def _reset_after_fork(self) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_in_children(obj: _ForkAware) -> None:
    """Call ``obj._reset_after_fork()`` in every child forked from now on, while ``obj`` lives."""
    _live.add(obj)


def forget_in_children(obj: _ForkAware) -> None:
    _live.discard(obj)


def _after_fork_in_child() -> None:
    for obj in list(_live):
        obj._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
