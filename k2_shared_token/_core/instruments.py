"""What a provider counts and logs around each effect of the core, written once for both sides.

The I/O shells perform an effect and report here how it went; the decisions about which event
it is, how long it took and what is worth a log line live in this module, so the blocking and
the asyncio provider report the same things the same way. Log lines carry the namespace and
token fingerprints, never a token or a secret; an error of unknown origin is named by its class
only (foreign messages can carry a URL with a password).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import flow, metrics
from .errors import K2TokenError
from .gate import RedisGate
from .metrics import Metrics
from .tokens import fingerprint_of

log = logging.getLogger("k2_shared_token")


class Instruments:
    def __init__(self, namespace: str, counts: Metrics, gate: RedisGate) -> None:
        self.namespace = namespace
        self.metrics = counts
        self._gate = gate

    def performed(self, effect: flow.Effect[Any], result: Any, started: float) -> None:
        """An effect succeeded (``started``: monotonic, before it)."""
        match effect:
            case flow.TryLock(after_timeout=True) if result.acquired:
                self.metrics.record(metrics.LOCK_TAKEOVER)
                log.warning(
                    "namespace %s: took over the refresh lock after its holder's lease ran out",
                    self.namespace,
                )
            case flow.Wait():
                self.metrics.record(
                    metrics.WAIT, time.monotonic() - started, outcome=_wait_outcome(result)
                )
            case flow.Exchange():
                self.metrics.record(
                    metrics.EXCHANGE_OK, result.took, attempts=result.attempts, outcome="ok"
                )
                if self._gate.is_open:
                    self.metrics.record(metrics.FALLBACK)
                log.info(
                    "namespace %s: exchanged a new token %s, valid %d s",
                    self.namespace,
                    fingerprint_of(result.value),
                    result.expires_in,
                )

    def failed(self, effect: flow.Effect[Any], started: float, exc: K2TokenError) -> None:
        took = time.monotonic() - started
        if isinstance(effect, flow.Exchange):
            self.metrics.record(
                metrics.EXCHANGE_FAILED, took, attempts=exc.attempts, outcome=exc.code
            )
        elif isinstance(effect, flow.Wait):
            self.metrics.record(metrics.WAIT, took, outcome=exc.code)

    def refresh_failed(self, exc: K2TokenError, pause: float) -> float:
        """An early refresh failed; callers keep the current token. Returns the pause."""
        self.metrics.record(metrics.REFRESH_FAILED)
        pause = max(pause, getattr(exc, "retry_after", 0) or 0)
        log.warning(
            "namespace %s: early refresh failed (%s: %s); serving the current token, "
            "next try in %.1f s",
            self.namespace,
            type(exc).__name__,
            exc,
            pause,
        )
        return pause

    def refresh_crashed(self, exc: BaseException, pause: float) -> float:
        """An early refresh raised something that is not ours: a bug, or a library's error we
        do not map. The refresh survives it (the next kick runs again); callers keep the token."""
        self.metrics.record(metrics.REFRESH_FAILED)
        log.error(
            "namespace %s: early refresh crashed (%s); serving the current token, "
            "next try in %.1f s",
            self.namespace,
            type(exc).__name__,
            pause,
        )
        return pause

    def interrupted(self, settled: str, exc: BaseException) -> None:
        log.warning(
            "namespace %s: a flow was interrupted (%s); %s",
            self.namespace,
            type(exc).__name__,
            settled,
        )

    def revocation_war(self, revocations: Any, pause: float) -> None:
        """Logged once per outage: what is happening, and what to do about it."""
        if revocations.warned:
            return
        revocations.warned = True
        log.warning(
            "namespace %s: K2 rejected this process's own token while Redis is unavailable: "
            "K2 probably revokes a client's previous token on each issue, so the processes "
            "exchanging for themselves revoke each other's. Replacing it after %.0f s, then "
            "after doubling pauses (calls in between get TokenUnavailableError); restore Redis "
            "so the fleet shares one token",
            self.namespace,
            pause,
        )

    def foreign_revocation(self, value: str, seconds_left: float) -> None:
        log.warning(
            "namespace %s: K2 rejected the shared token %s with %.0f s left, and no process of "
            "this fleet replaced or revoked it: another deployment probably uses the same client "
            "id (with revoke_previous_client_credentials_token each of its exchanges revokes "
            "ours); give each deployment its own application",
            self.namespace,
            fingerprint_of(value),
            seconds_left,
        )

    def invalidated(self, value: str, deleted: bool) -> bool:
        log.info(
            "namespace %s: token %s invalidated (%s)",
            self.namespace,
            fingerprint_of(value),
            "was shared" if deleted else "no longer shared",
        )
        return deleted


def _wait_outcome(result: flow.WaitOutcome) -> str:
    if result.snapshot is not None:
        return "announced"
    if result.error_code is not None:
        return "holder_failed"
    return "timed_out" if result.timed_out else "released"
