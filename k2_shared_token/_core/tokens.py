"""The access token value type, and the only place that decides how a token is shown.

A token is a bearer credential: whoever reads it can move money. So ``repr`` and ``str`` show
a short SHA-256 fingerprint instead of the value. The fingerprint is stable, which is what an
operator needs to tell "the same token" from "a new one" across log lines and processes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field


def fingerprint_of(token: str) -> str:
    """A non-reversible handle for a token, safe to log."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
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
