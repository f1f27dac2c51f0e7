"""Fresh, stale or expired: the pure arithmetic of the two refresh windows.

A token with more than ``refresh_ahead`` seconds left is *fresh*: hand it out. Below that it is
*stale*: still handed out, but one worker in the fleet refreshes it in the background. Below
``min_validity`` it is *expired* for our purposes: never handed out, callers wait for a new one.

Both windows shrink for tokens whose granted lifetime is short (half and a quarter of it at
most). Without that, a server granting 60 s tokens to a provider configured with the default
300 s window would see every token as stale from birth and every caller would refresh forever.

No I/O and no clock reads here: instants are passed in, so the sync and asyncio providers and the
tests share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._redis.codec import StoredToken
from .tokens import AccessToken


@dataclass(frozen=True)
class Snapshot:
    """A token as Redis reported it: what it is and how many ms it had left at ``seen_at``."""

    stored: StoredToken
    ttl_ms: int
    seen_at: float  # time.monotonic() when the reply arrived
    seen_at_wall: float  # time.time() at the same moment


@dataclass(frozen=True)
class Held:
    """A token this process holds, and the monotonic instants at which it changes state.

    ``recheck_at`` is when the per-process copy must be confirmed against Redis again: the start
    of the refresh window, or ``local_max_age`` after it was read, whichever comes first. That is
    the bound on how stale a warm worker's view of the shared token can be.
    """

    token: AccessToken
    lifetime: float
    recheck_at: float
    fresh_until: float
    usable_until: float

    def is_fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def is_usable(self, now: float) -> bool:
        return now < self.usable_until


@dataclass(frozen=True)
class Windows:
    refresh_ahead: float
    min_validity: float
    local_max_age: float

    def for_lifetime(self, lifetime: float | None) -> tuple[float, float]:
        """Effective (refresh_ahead, min_validity) for a token granted ``lifetime`` seconds;
        the configured windows when no token (so no lifetime) is known."""
        if lifetime is None:
            return self.refresh_ahead, self.min_validity
        return min(self.refresh_ahead, lifetime / 2), min(self.min_validity, lifetime / 4)

    def hold(self, snap: Snapshot) -> Held:
        refresh_ahead, min_validity = self.for_lifetime(snap.stored.lifetime)
        left = snap.ttl_ms / 1000
        expires = snap.seen_at + left
        fresh_until = expires - refresh_ahead
        return Held(
            token=AccessToken(snap.stored.value, snap.stored.token_type, snap.seen_at_wall + left),
            lifetime=snap.stored.lifetime,
            recheck_at=min(fresh_until, snap.seen_at + self.local_max_age),
            fresh_until=fresh_until,
            usable_until=expires - min_validity,
        )

    def retry_interval(self, lifetime: float | None) -> float:
        """How long a worker waits before retrying a failed early refresh: a few tries fit in
        the stale window, and never more often than every 50 ms nor less often than every 5 s."""
        refresh_ahead, min_validity = self.for_lifetime(lifetime)
        return max(0.05, min(5.0, (refresh_ahead - min_validity) / 4))

    def lock_threshold_ms(self, lifetime: float | None, *, fresh: bool) -> int:
        """The TTL above which the lock script leaves the lock alone: the token is good enough.

        ``fresh`` asks for the refresh window (background refresh), otherwise the validity floor
        (a caller that needs a token now).
        """
        refresh_ahead, min_validity = self.for_lifetime(lifetime)
        return int((refresh_ahead if fresh else min_validity) * 1000)
