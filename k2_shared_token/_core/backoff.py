"""How long the fleet leaves K2 alone after a failed exchange: pure policy, no I/O.

The exchange client already retries a few times inside the lock lease (:mod:`.retry`). When
those retries are spent, the lock holder writes a *hold-off* next to the token in Redis, and
until it ends no worker in the fleet asks K2 again: callers without a usable token get the
failure at once instead of every worker retrying in lockstep, which is what turns an auth
server's bad minute into an outage (MSAL Python throttles per process for the same reason; we
throttle per fleet).

- ``invalid_client`` and other rejected requests: retrying cannot help until someone fixes the
  credentials, so hold off for ``credentials`` seconds. The hold-off records a fingerprint of the
  secret, and a worker started with a different secret ignores it: a rotation takes effect at
  once instead of waiting out the hold-off.
- ``invalid_token_reuse`` (Doorkeeper's race between two token requests of one client under
  ``revoke_previous_client_credentials_token``): retried at once, and at most the base hold-off.
- 5xx, timeouts, garbage replies: exponential in the number of consecutive failed exchanges,
  from ``base`` up to ``cap``, and never shorter than a ``Retry-After`` the server sent (itself
  capped at an hour, as MSAL does, so a broken header cannot park a fleet for a day).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .errors import (
    InvalidCredentialsError,
    K2TokenError,
    TokenEndpointError,
    TokenRequestRejectedError,
    TokenUnavailableError,
    error_from_report,
)

RETRY_AFTER_CAP = 3600.0


def credentials_fingerprint(client_id: str, client_secret: str) -> str:
    """8 hex digits keyed by the secret: tells one secret from another, reveals nothing of it."""
    mac = hmac.new(client_secret.encode(), b"k2-shared-token:" + client_id.encode(), "sha256")
    return mac.hexdigest()[:8]


def is_credentials_error(error: K2TokenError) -> bool:
    return isinstance(error, (InvalidCredentialsError, TokenRequestRejectedError))


@dataclass(frozen=True)
class BackoffPolicy:
    base: float = 1.0
    cap: float = 60.0
    credentials: float = 60.0

    def holdoff(self, error: K2TokenError, streak: int) -> float:
        """Seconds to leave K2 alone after ``error``, the ``streak``-th failure in a row (>= 1).
        Zero for errors that are not the token endpoint's (a Redis failure, a timeout waiting)."""
        if not isinstance(error, TokenEndpointError):
            return 0.0
        if is_credentials_error(error):
            return self.credentials
        if error.error == "invalid_token_reuse":
            # Doorkeeper's own race, not an outage: the shortest pause, never a growing one.
            return min(self.base, 1.0)
        wait = min(self.cap, self.base * 2.0 ** min(max(streak, 1) - 1, 30))
        return max(wait, min(error.retry_after or 0.0, RETRY_AFTER_CAP))


class LocalRevocations:
    """How often a process without Redis may replace its own token after K2 rejected it.

    With Redis down, each process exchanges for itself. If K2 revokes a client's previous token
    whenever it issues one (Doorkeeper's ``revoke_previous_client_credentials_token``), every
    such exchange kills the other processes' tokens, whose next exchange kills this one's: a
    revocation war, at the request rate. So the first rejection is replaced at once, and each
    one after it only after a pause doubling from ``first`` to ``cap``. In between, callers get
    :class:`TokenUnavailableError` instead of a token K2 will refuse: the calls that end on a
    401 are bounded by the replacements, not by the request rate.
    """

    def __init__(self, first: float = 2.0, cap: float = 30.0) -> None:
        self.first, self.cap = first, cap
        self.pause = 0.0
        self.not_before = 0.0
        self.warned = False

    def rejected(self, now: float) -> float:
        """This process's own token was rejected at ``now``; the pause before it is replaced."""
        pause = self.pause
        self.not_before = now + pause
        self.pause = min(self.cap, pause * 2 if pause else self.first)
        return pause

    def blocked(self, now: float) -> float:
        """Seconds until the next replacement may be exchanged (0: now)."""
        return max(self.not_before - now, 0.0)

    def reset(self) -> None:
        self.pause, self.not_before, self.warned = 0.0, 0.0, False


class LocalFailures:
    """The hold-off of a process that cannot reach Redis (local fallback): same policy, kept in
    memory. Mutated only by the flow's local branch (see the provider for who runs it)."""

    def __init__(self) -> None:
        self.streak = 0
        self.until = 0.0
        self.code = ""
        self.revoked_until = 0.0  # see LocalRevocations

    def check(self, now: float) -> None:
        if now < self.revoked_until:
            raise TokenUnavailableError(
                "K2 revoked this process's own token while Redis is unavailable (see the "
                f"warning logged); it is replaced in {self.revoked_until - now:.1f} s"
            )
        if now < self.until:
            raise error_from_report(self.code, self.until - now)

    def revoked(self, until: float) -> None:
        """Exchange nothing before ``until``: our own token was revoked again."""
        self.revoked_until = until

    def failed(self, error: K2TokenError, policy: BackoffPolicy, now: float) -> None:
        self.streak += 1
        self.until = now + policy.holdoff(error, self.streak)
        self.code = error.code

    def succeeded(self) -> None:
        self.streak, self.until, self.code = 0, 0.0, ""
