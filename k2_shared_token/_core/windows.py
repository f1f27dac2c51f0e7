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

from .tokens import AccessToken, Held, Snapshot

# Under token reuse, the longest a token is withheld before it dies (see for_lifetime).
REUSE_MARGIN = 1.0
# Doorkeeper rounds expires_in to whole seconds, so a reused token's reported lifetime can
# overstate by up to half a second: past its expiry, wait this long before asking again.
REUSE_ALLOWANCE = 1.0


@dataclass(frozen=True)
class Windows:
    refresh_ahead: float
    min_validity: float
    local_max_age: float

    def for_lifetime(self, lifetime: float | None, reuse: bool = False) -> tuple[float, float]:
        """Effective (refresh_ahead, min_validity) for a token granted ``lifetime`` seconds;
        the configured windows when no token (so no lifetime) is known.

        ``reuse``: the server hands a live token back instead of a new one, so an early ask
        only returns the same token; there is no refresh window, and the token is handed out
        until a short margin before it dies (at most ``REUSE_MARGIN``, so a fleet does not
        stall for ``min_validity`` at every rollover waiting for a token that cannot come).
        """
        if lifetime is None:
            return self.refresh_ahead, self.min_validity
        if reuse:
            margin = min(self.min_validity, REUSE_MARGIN, lifetime / 4)
            return margin, margin
        return min(self.refresh_ahead, lifetime / 2), min(self.min_validity, lifetime / 4)

    def hold(self, snap: Snapshot) -> Held:
        refresh_ahead, min_validity = self.for_lifetime(snap.stored.lifetime, snap.stored.reuse)
        left = snap.ttl_ms / 1000
        expires = snap.seen_at + left
        fresh_until = expires - refresh_ahead
        return Held(
            token=AccessToken(snap.stored.value, snap.stored.token_type, snap.seen_at_wall + left),
            lifetime=snap.stored.lifetime,
            recheck_at=min(fresh_until, snap.seen_at + self.local_max_age),
            fresh_until=fresh_until,
            usable_until=expires - min_validity,
            source=snap,
        )

    def retry_interval(self, lifetime: float | None, reuse: bool = False) -> float:
        """How long a worker waits before retrying a failed early refresh: a few tries fit in
        the stale window, and never more often than every 50 ms nor less often than every 5 s."""
        refresh_ahead, min_validity = self.for_lifetime(lifetime, reuse)
        return max(0.05, min(5.0, (refresh_ahead - min_validity) / 4))

    def lock_threshold_ms(self, lifetime: float | None, *, fresh: bool, reuse: bool = False) -> int:
        """The TTL above which the lock script leaves the lock alone: the token is good enough.

        ``fresh`` asks for the refresh window (background refresh), otherwise the validity floor
        (a caller that needs a token now).
        """
        refresh_ahead, min_validity = self.for_lifetime(lifetime, reuse)
        return int((refresh_ahead if fresh else min_validity) * 1000)
