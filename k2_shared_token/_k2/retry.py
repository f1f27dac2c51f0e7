"""The exchange's retry policy, as composable tenacity values.

Retried: connection errors, timeouts, 5xx, 408, 429 and garbage 200s (proxies and load balancers
emit those for a moment). Never retried: ``invalid_client`` and other 4xx, because repeating a
rejected request only gets the client rate-limited. Waits are exponential with full jitter, but a
server's ``Retry-After`` wins when it asks for longer. Attempts are bounded by count and by a
deadline that ends inside the lock lease (see ``Settings.exchange_deadline``); a wait (say, a long
``Retry-After``) that would overrun that deadline ends the retries at once rather than sleeping
past the lease.
"""

from __future__ import annotations

from typing import Any

from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from .._core.errors import InvalidTokenResponseError, TokenEndpointUnavailableError

RETRYABLE = (TokenEndpointUnavailableError, InvalidTokenResponseError)

retry_transient = retry_if_exception(lambda exc: isinstance(exc, RETRYABLE))


def _retry_after(state: RetryCallState) -> float:
    outcome = state.outcome
    exc = outcome.exception() if outcome is not None else None
    return float(getattr(exc, "retry_after", None) or 0.0)


class wait_retry_after(wait_base):  # noqa: N801 - tenacity's naming style
    """Wait at least what the server asked for in ``Retry-After``."""

    def __call__(self, retry_state: RetryCallState) -> float:
        return _retry_after(retry_state)


class wait_longest(wait_base):  # noqa: N801
    """The longest of several waits: a Retry-After of 3 s means "3 s", not "3 s plus backoff"."""

    def __init__(self, *waits: wait_base) -> None:
        self.waits = waits

    def __call__(self, retry_state: RetryCallState) -> float:
        return max(w(retry_state) for w in self.waits)


def policy(*, max_attempts: int, deadline: float) -> dict[str, Any]:
    """Keyword arguments for ``tenacity.Retrying`` and ``tenacity.AsyncRetrying`` alike."""
    return {
        "retry": retry_transient,
        # stop_before_delay counts the coming sleep: no attempt starts past the deadline.
        "stop": stop_after_attempt(max_attempts) | stop_before_delay(deadline),
        "wait": wait_longest(
            wait_exponential(multiplier=0.2, max=2.0) + wait_random(0, 0.3), wait_retry_after()
        ),
        "reraise": True,
    }
