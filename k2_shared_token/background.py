"""Early refresh off the callers' path: at most one job per process, in a daemon thread.

The caller that notices a stale token only flips a flag and starts a thread; it returns the
current token at once. A thread per job (rather than a long-lived worker) is what makes this
fork-safe for free: a child forked mid-refresh inherits no thread, and :meth:`reset_after_fork`
clears the flag that said one was running.
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
        self._lock = threading.Lock()
        self._running = False
        self._not_before = 0.0
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        """Start a job unless one runs or the last one asked for a pause. Cheap when idle."""
        if self._running or time.monotonic() < self._not_before:
            return
        with self._lock:
            if self._running:
                return
            self._running = True
            thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread = thread
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: no new threads
            self._running = False

    def _run(self) -> None:
        pause: float | None = None
        try:
            pause = self._job()
        finally:
            if pause:
                self._not_before = time.monotonic() + pause
            self._running = False

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the current job, if any (tests, orderly shutdown). True if none runs."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return not self._running

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._running = False
        self._thread = None
        self._not_before = 0.0
