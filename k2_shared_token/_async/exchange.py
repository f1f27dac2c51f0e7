"""The client-credentials exchange, retried by the policy in :mod:`.._k2.retry`.

Same request, same retry policy, same timeouts clipped to the exchange deadline and the same
reply verdict (:mod:`.._k2.attempts`) on both sides: only the transport differs (httpx here,
requests in the generated blocking client). Every attempt takes one of the process's exchange
slots (``max_exchanges``), so a thousand tenants coming due together reach K2 a few at a time.
"""

from __future__ import annotations

import time
from dataclasses import replace

from tenacity import AsyncRetrying

from .._core.errors import K2TokenError
from .._core.settings import Settings
from .._core.tokens import IssuedToken
from .._k2 import retry, wire
from .._k2.attempts import MAX_BODY, attempt_timeouts, issued_from_reply, unavailable
from .._k2.transport import AsyncTransport, TransportError
from .._scheduler import AsyncExchangeSlots


class AsyncExchangeClient:
    """Performs ``POST {base_url}/oauth/token`` for one set of credentials."""

    def __init__(self, settings: Settings, transport: AsyncTransport) -> None:
        self._settings = settings
        self.transport = transport

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self._settings.token_url!r})"

    async def fetch(self) -> IssuedToken:
        s = self._settings
        started = time.monotonic()
        policy = retry.policy(max_attempts=s.max_attempts, deadline=s.exchange_deadline)
        n = 0
        try:
            async for attempt in AsyncRetrying(**policy):
                with attempt:
                    n = attempt.retry_state.attempt_number
                    issued = await self._attempt(started + s.exchange_deadline, n)
                    return replace(issued, took=time.monotonic() - started, attempts=n)
        except K2TokenError as exc:
            exc.attempts = n  # for the metrics: how many requests this exchange made
            raise
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    async def _attempt(self, deadline: float, number: int) -> IssuedToken:
        s = self._settings
        slots = AsyncExchangeSlots.here(s.max_exchanges)
        if not await slots.acquire(deadline - time.monotonic()):
            raise unavailable(s, "found no free exchange slot in this process in time", number)
        try:
            timeout = attempt_timeouts(s, deadline)
            requested_at, requested_at_wall = time.monotonic(), time.time()
            reply = await self.transport.post(
                s.token_url,
                wire.form(s.client_id, s.client_secret),
                wire.REQUEST_HEADERS,
                timeout,
                MAX_BODY,
            )
        except TransportError as exc:
            raise unavailable(s, f"failed ({exc.kind})", number) from None
        finally:
            slots.release()
        return issued_from_reply(
            reply.status,
            reply.headers,
            reply.body,
            requested_at=requested_at,
            requested_at_wall=requested_at_wall,
            number=number,
        )
