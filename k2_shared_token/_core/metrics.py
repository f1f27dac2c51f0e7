"""What a provider counts about itself, and the hook through which it tells you.

Counters cost nothing you would notice: the hot path (a local hit) bumps one integer and calls no
hook; every other event is rare (a Redis read, an exchange, a wait) and also goes to the hooks
you passed (or added later with ``provider.add_hook``), e.g. to feed statsd or a log.
:mod:`k2_shared_token.contrib.prometheus` exports the same counters for Prometheus at scrape
time, :mod:`k2_shared_token.contrib.otel` for OpenTelemetry (with spans and histograms).

A hook that raises is logged and ignored: observability must never take token delivery down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("k2_shared_token._core.metrics")

LOCAL_HIT = "local_hit"  # served from the per-process copy (counted, never hooked)
SHARED_HIT = "shared_hit"  # served from Redis
MISS = "miss"  # nothing usable: this process obtained or waited for a new token
EXCHANGE_OK = "exchange_ok"
EXCHANGE_FAILED = "exchange_failed"
WAIT = "wait"  # waited for another worker's announcement
LOCK_TAKEOVER = "lock_takeover"  # took the lock after its holder's lease ran out
REFRESH_FAILED = "refresh_failed"  # an early (background) refresh failed; callers kept the token
REDIS_ERROR = "redis_error"  # a Redis call failed (timeout, refused, ...); the breaker opened
FALLBACK = "fallback"  # a token was obtained without Redis, for this process only
EVENTS = (LOCAL_HIT, SHARED_HIT, MISS, EXCHANGE_OK, EXCHANGE_FAILED, WAIT, LOCK_TAKEOVER,
          REFRESH_FAILED, REDIS_ERROR, FALLBACK)  # fmt: skip
RECORDED = EVENTS[1:]  # local hits are counted by the provider itself, on its hot path
TIMED = (EXCHANGE_OK, EXCHANGE_FAILED, WAIT)


@dataclass(frozen=True)
class Event:
    name: str
    namespace: str
    seconds: float | None = None  # for timed events: how long it took
    # For exchanges: how many requests to K2 it made (retries included).
    attempts: int | None = None
    # For timed events: how it ended, one short word and never a token or message: "ok" for an
    # exchange that succeeded, else the error's ``code`` ("invalid_client", "unavailable", ...);
    # for a wait "announced", "holder_failed", "timed_out", "released" (the lock freed with no
    # usable token) or the Redis error's code.
    outcome: str | None = None


Hook = Callable[[Event], None]


class Metrics:
    """Thread-safe counters and time sums for one provider."""

    def __init__(self, namespace: str, hooks: Iterable[Hook] = ()) -> None:
        self.namespace = namespace
        self._hooks = tuple(hooks)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(RECORDED, 0)
        self._seconds = dict.fromkeys(TIMED, 0.0)

    def add_hook(self, hook: Hook) -> None:
        with self._lock:
            self._hooks = (*self._hooks, hook)

    def remove_hook(self, hook: Hook) -> None:
        """Stop calling ``hook`` (a no-op if it was never added)."""
        with self._lock:
            self._hooks = tuple(h for h in self._hooks if h != hook)

    def record(
        self,
        name: str,
        seconds: float | None = None,
        *,
        attempts: int | None = None,
        outcome: str | None = None,
    ) -> None:
        with self._lock:
            self._counts[name] += 1
            if seconds is not None:
                self._seconds[name] += seconds
            hooks = self._hooks
        event = Event(name, self.namespace, seconds, attempts, outcome)
        for hook in hooks:
            try:
                hook(event)
            except Exception:
                log.exception("namespace %s: metrics hook %r failed", self.namespace, hook)

    def counts(self) -> dict[str, int]:
        """Every counter but local hits, which the provider keeps on its hot path itself."""
        with self._lock:
            return dict(self._counts)

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    def reset_after_fork(self) -> None:
        """A child starts counting from zero: its parent's counts are the parent's to report."""
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(RECORDED, 0)
        self._seconds = dict.fromkeys(TIMED, 0.0)
