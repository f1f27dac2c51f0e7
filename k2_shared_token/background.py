"""Early refresh off the callers' path: one long-lived daemon thread per provider.

The caller that notices a stale token sets an Event and returns the current token at once. A
thread started per refresh would cost that caller the thread start (``Thread.start`` waits until
the new thread runs: milliseconds on a busy 2-core machine, measured in the rollover
benchmark), so the thread is started once, on the slow path that fetched the first token.

Fork safety: a child inherits no thread. :meth:`reset_after_fork` forgets the parent's, and the
child's first kick starts its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


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
        self._thread: threading.Thread | None = None
        self._closed = False

    def ensure_thread(self) -> None:
        """Start the worker thread if this process has none (off the hot path)."""
        if self._thread is not None or self._closed:
            return
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                thread.start()
                self._thread = thread

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
