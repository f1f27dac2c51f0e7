"""The client-credentials exchange over requests, retried by the policy in :mod:`.retry`.

Every attempt carries explicit connect and read timeouts, clipped so the last attempt still ends
before the exchange deadline (and so inside the lock lease). Connection-level failures become
:class:`TokenEndpointUnavailableError` with a message naming the failure class only: requests'
own messages can contain the full URL and are not ours to vouch for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace

import requests
import urllib3
from tenacity import Retrying

from .._core.errors import TokenEndpointError, TokenEndpointUnavailableError
from .._core.settings import Settings
from .._core.tokens import IssuedToken
from . import retry, wire

log = logging.getLogger("k2_shared_token._k2.exchange")

MAX_BODY = 64 * 1024


class ExchangeClient:
    """Performs ``POST {base_url}/oauth/token`` for one set of credentials."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self._settings = settings
        self._session = session or requests.Session()
        self._owns_session = session is None

    def __repr__(self) -> str:
        return f"ExchangeClient(url={self._settings.token_url!r})"

    def reset_after_fork(self) -> None:
        """Pooled connections are shared with the parent after fork(); start a fresh pool."""
        if self._owns_session:
            self._session = requests.Session()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def fetch(self) -> IssuedToken:
        s = self._settings
        started = time.monotonic()
        for attempt in Retrying(
            **retry.policy(max_attempts=s.max_attempts, deadline=s.exchange_deadline)
        ):
            with attempt:
                n = attempt.retry_state.attempt_number
                issued = self._attempt(started + s.exchange_deadline, n)
                return replace(issued, took=time.monotonic() - started)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    def _attempt(self, deadline: float, number: int) -> IssuedToken:
        s = self._settings
        timeout = attempt_timeouts(s, deadline)
        requested_at, requested_at_wall = time.monotonic(), time.time()
        try:
            with self._session.post(
                s.token_url,
                data=wire.form(s.client_id, s.client_secret),
                headers=wire.REQUEST_HEADERS,
                timeout=timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                body = response.raw.read(MAX_BODY + 1, decode_content=True)
                status, headers = response.status_code, response.headers
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise unavailable(s, f"failed ({type(exc).__name__})", number) from None
        return issued_from_reply(
            status,
            headers,
            body,
            requested_at=requested_at,
            requested_at_wall=requested_at_wall,
            number=number,
        )


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
