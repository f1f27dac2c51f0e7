"""The gate in front of Redis: the circuit breaker, what a failure means, and what to log.

Every Redis call of a provider passes here. A failure opens the breaker (the next calls skip
Redis for ``redis_cooldown``) and, with the fallback on, callers carry on with a process-local
token; with it off they get :class:`SharedCacheError`. An outage is logged twice per process:
when it starts and when it ends, not once per failed call.
"""

from __future__ import annotations

import logging
import time

from . import metrics
from .breaker import Breaker
from .errors import SharedCacheError
from .metrics import Metrics

log = logging.getLogger("k2_shared_token")


class RedisGate:
    def __init__(self, namespace: str, cooldown: float, *, fallback: bool, counts: Metrics) -> None:
        self.namespace = namespace
        self.cooldown = cooldown
        self.fallback = fallback
        self._breaker = Breaker(cooldown)
        self._metrics = counts

    @property
    def is_open(self) -> bool:
        return self._breaker.is_open

    def allowed(self) -> bool:
        """Whether to try Redis now; with the circuit open and no fallback, fail at once."""
        if self._breaker.allows(time.monotonic()):
            return True
        if self.fallback:
            return False
        raise SharedCacheError(
            f"Redis is unavailable (circuit open: not retried for {self.cooldown:g} s "
            "after a failure)"
        )

    def failed(self, exc: SharedCacheError) -> None:
        """Feed the breaker; log an outage's start, once."""
        self._metrics.record(metrics.REDIS_ERROR)
        if self._breaker.failed(time.monotonic()):
            log.warning(
                "namespace %s: Redis unavailable (%s); %s, retrying Redis every %g s",
                self.namespace,
                exc,
                "each process keeps its own token meanwhile"
                if self.fallback
                else "token requests fail meanwhile",
                self.cooldown,
            )

    def answered(self) -> None:
        outage = self._breaker.succeeded(time.monotonic())
        if outage is not None:
            log.warning(
                "namespace %s: Redis answers again after %.1f s; the token is shared again",
                self.namespace,
                outage,
            )

    def fallback_or_raise(self, exc: SharedCacheError) -> None:
        if not self.fallback:
            raise exc
