"""Early refresh off the callers' path: one long-lived daemon thread per provider.

The caller that notices a stale token sets an Event and returns the current token at once. A
thread started per refresh would cost that caller the thread start (milliseconds on a busy
2-core machine, measured in the rollover benchmark), so the thread is started once, by the
first kick, without waiting for it to run, and then only woken.

Fork safety: a child inherits no thread. :meth:`reset_after_fork` forgets the parent's, and the
child's first kick starts its own.
"""

from __future__ import annotations

import _thread
import asyncio
import threading
import time
from collections.abc import Awaitable, Callable


class BackgroundRefresh:
    def __init__(self, job: Callable[[], float | None], name: str) -> None:
        """``job`` returns ``None`` when done, or seconds to wait before the next attempt."""
        self._job = job
        self._name = name
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = False  # a job is queued or running
        self._not_before = 0.0
        self._started = False
        self._closed = False

    def ensure_thread(self) -> None:
        """Start the worker thread if this process has none.

        ``_thread.start_new_thread`` rather than ``threading.Thread.start``: the latter blocks
        until the new thread runs, milliseconds for the caller that kicks on a busy machine.
        """
        if self._started or self._closed:
            return
        with self._lock:
            if not self._started:
                _thread.start_new_thread(self._loop, ())
                self._started = True

    def kick(self) -> None:
        """Queue a job unless one is pending or the last one asked for a pause. No blocking."""
        if self._pending or time.monotonic() < self._not_before:
            return
        with self._lock:
            if self._pending or self._closed:
                return
            self._pending = True
            self._idle.clear()
        self.ensure_thread()
        self._wake.set()

    def _loop(self) -> None:
        threading.current_thread().name = self._name
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            pause: float | None = None
            try:
                pause = self._job()
            finally:
                if pause:
                    self._not_before = time.monotonic() + pause
                self._pending = False
                self._idle.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is pending (tests, orderly shutdown). True if idle."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def reset_after_fork(self) -> None:
        self._reset()


class AsyncBackgroundRefresh:
    """The asyncio counterpart: a task per refresh (cheap in asyncio), one at a time."""

    def __init__(self, job: Callable[[], Awaitable[float | None]]) -> None:
        self._job = job
        self._task: asyncio.Task[None] | None = None
        self._not_before = 0.0

    def kick(self) -> None:
        if self._task is not None or time.monotonic() < self._not_before:
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        pause: float | None = None
        try:
            pause = await self._job()
        finally:
            if pause:
                self._not_before = time.monotonic() + pause
            self._task = None

    async def join(self) -> None:
        """Wait for a running refresh (tests, orderly shutdown)."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
