"""The circuit breaker in front of Redis: after a failure, skip Redis for a while.

Without it every call during a partition would pay the socket timeout again (a black-holed port
answers nothing; only the timeout ends the wait). With it, the first call pays once, and the
calls after it go straight to the process-local fallback until ``cooldown`` has passed; then one
call probes Redis again (half-open) and either closes the circuit or opens it for another
cooldown.

It also decides what is worth a log line: the first failure of an outage and the recovery, not
every failed probe, so an hour-long outage is two warnings per process, not a million.

No I/O and no clock reads: instants are passed in. Unlocked on purpose: the fields are single
attribute writes, and a race between two threads costs at most one extra probe.
"""

from __future__ import annotations


class Breaker:
    def __init__(self, cooldown: float) -> None:
        self.cooldown = cooldown
        self._open_until = 0.0
        self._outage_since: float | None = None
        self.outages = 0

    @property
    def is_open(self) -> bool:
        return self._outage_since is not None

    def allows(self, now: float) -> bool:
        """Whether to try Redis now: always while closed, once per cooldown while open."""
        if now < self._open_until:
            return False
        if self._outage_since is not None:
            self._open_until = now + self.cooldown  # this caller probes; the others skip
        return True

    def failed(self, now: float) -> bool:
        """Redis failed at ``now``; True if that starts an outage (log it)."""
        self._open_until = now + self.cooldown
        if self._outage_since is None:
            self._outage_since = now
            self.outages += 1
            return True
        return False

    def succeeded(self, now: float) -> float | None:
        """Redis answered; the outage's length if that ends one (log it), else None."""
        since, self._outage_since = self._outage_since, None
        if since is None:
            return None
        self._open_until = 0.0
        return now - since
