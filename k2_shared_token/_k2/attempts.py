"""One exchange attempt's arithmetic and verdict, shared by both sides' exchange clients.

Every attempt carries explicit connect and read timeouts, clipped so the last attempt still ends
before the exchange deadline (and so inside the lock lease). A reply becomes an
:class:`.IssuedToken` or the typed error it is; a connection-level failure becomes
:class:`TokenEndpointUnavailableError` with a message naming the failure class only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from .._core.errors import TokenEndpointError, TokenEndpointUnavailableError
from .._core.settings import Settings
from .._core.tokens import IssuedToken
from . import wire

log = logging.getLogger("k2_shared_token.exchange")

MAX_BODY = 64 * 1024


def attempt_timeouts(settings: Settings, deadline: float) -> tuple[float, float]:
    """(connect, read) timeouts for an attempt that must end by ``deadline`` (monotonic)."""
    left = deadline - time.monotonic()
    if left <= 0.05:
        raise TokenEndpointUnavailableError("exchange deadline reached before an attempt")
    return min(settings.connect_timeout, left), min(settings.read_timeout, left)


def issued_from_reply(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    requested_at: float,
    requested_at_wall: float,
    number: int,
) -> IssuedToken:
    """The token in a reply (``body`` read up to ``MAX_BODY + 1`` bytes), or the error it is."""
    try:
        if len(body) > MAX_BODY:
            raise TokenEndpointError(
                f"token endpoint answered HTTP {status} with a body over {MAX_BODY} bytes",
                status=status,
            )
        token, token_type, expires_in = wire.parse_token_reply(status, headers, body)
    except TokenEndpointError as exc:
        log.warning("token exchange attempt %d: %s", number, exc)
        raise
    log.debug("token exchange attempt %d: granted for %d s", number, expires_in)
    return IssuedToken(token, token_type, expires_in, requested_at, requested_at_wall, 0.0)


def unavailable(settings: Settings, what: str, number: int) -> TokenEndpointUnavailableError:
    """A connection-level failure, named by class only: the HTTP libraries' own messages can
    contain the full URL and are not ours to vouch for."""
    log.warning("token exchange attempt %d %s", number, what)
    return TokenEndpointUnavailableError(f"token request to {settings.base_url} {what}")
