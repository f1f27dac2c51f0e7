"""A token's stages, as types: issued by K2, stored in Redis, read back, held, handed out.

:class:`IssuedToken` is what the exchange returns; :class:`StoredToken` is what the Redis value
holds; :class:`Snapshot` is a stored token as one read saw it (with the TTL Redis reported);
:class:`Held` is a process's copy with the instants at which it changes state; and
:class:`AccessToken` is what callers get. Each stage is made from the one before it, in one
direction, so no stage carries a field it cannot know.

A token is a bearer credential: whoever reads it can move money. So ``repr`` and ``str`` show
a short SHA-256 fingerprint instead of the value, here and nowhere else. The fingerprint is
stable, which is what an operator needs to tell "the same token" from "a new one" across log
lines and processes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field


def fingerprint_of(token: str) -> str:
    """A non-reversible handle for a token, safe to log."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A K2 access token and when it stops working.

    ``expires_at`` is epoch seconds on this machine's clock, computed from the remaining lifetime
    Redis reports (PTTL), so it is right even when pods' clocks disagree.
    """

    value: str = field(repr=False)
    token_type: str
    expires_at: float

    def __repr__(self) -> str:
        return (
            f"AccessToken(value=<{fingerprint_of(self.value)}>, token_type={self.token_type!r}, "
            f"expires_at={self.expires_at:.3f})"
        )

    __str__ = __repr__

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value."""
        return f"{self.token_type} {self.value}"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just granted by K2.

    ``expires_in`` counts from ``requested_at`` (monotonic), the moment the request was sent, so
    time spent in transit shortens the lifetime, never extends it.
    """

    value: str = field(repr=False)
    token_type: str
    expires_in: int
    requested_at: float
    requested_at_wall: float  # the same instant on the wall clock, for status displays
    took: float  # seconds the exchange took, retries included
    attempts: int = 1  # requests the exchange made, the one that succeeded included


@dataclass(frozen=True, slots=True)
class StoredToken:
    """The decoded content of the token key."""

    value: str = field(repr=False)
    token_type: str
    lifetime: float
    fence: int
    issued_at: float = 0.0  # epoch seconds on the writer's clock when it asked K2 (for status)
    took_ms: int = 0  # how long that exchange took, retries included (for status)
    # The server hands back a live token instead of a new one (Doorkeeper's
    # reuse_access_token): an early ask cannot help, so the windows have none.
    reuse: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A token as Redis reported it: what it is and how many ms it had left at ``seen_at``."""

    stored: StoredToken
    ttl_ms: int
    seen_at: float  # time.monotonic() when the reply arrived
    seen_at_wall: float  # time.time() at the same moment

    @property
    def expires_at(self) -> float:
        """When the token dies, on the monotonic clock (as Redis counted it at ``seen_at``)."""
        return self.seen_at + self.ttl_ms / 1000


@dataclass(frozen=True, slots=True)
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
    source: Snapshot  # what it was made from: the previous grant, for the next exchange

    def is_fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def is_usable(self, now: float) -> bool:
        return now < self.usable_until
