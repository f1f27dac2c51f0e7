"""The client-credentials exchange over httpx (the ``asyncio`` extra), awaited.

Same request, same retry policy (:func:`retry.policy`, run by tenacity's ``AsyncRetrying``),
same timeouts clipped to the exchange deadline and the same reply parsing
(:func:`exchange.issued_from_reply`) as the blocking client: only the transport differs.
"""

from __future__ import annotations

import time
from dataclasses import replace

from tenacity import AsyncRetrying

from .._core.errors import ConfigurationError
from .._core.settings import Settings
from .._core.tokens import IssuedToken
from . import retry, wire
from .exchange import MAX_BODY, attempt_timeouts, issued_from_reply, unavailable

try:
    import httpx
except ImportError:  # pragma: no cover - exercised only without the extra
    httpx = None  # type: ignore[assignment]


class AsyncExchangeClient:
    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        if httpx is None:  # pragma: no cover
            raise ConfigurationError(
                "AsyncSharedTokenProvider needs the 'asyncio' extra: pip install "
                "'k2-shared-token[asyncio]'"
            )
        self._settings = settings
        self._client = client
        self._owns_client = client is None

    def __repr__(self) -> str:
        return f"AsyncExchangeClient(url={self._settings.token_url!r})"

    def _http(self) -> httpx.AsyncClient:
        # Made on first use, inside the running loop that will use it.
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def fetch(self) -> IssuedToken:
        s = self._settings
        started = time.monotonic()
        policy = retry.policy(max_attempts=s.max_attempts, deadline=s.exchange_deadline)
        async for attempt in AsyncRetrying(**policy):
            with attempt:
                n = attempt.retry_state.attempt_number
                issued = await self._attempt(started + s.exchange_deadline, n)
                return replace(issued, took=time.monotonic() - started)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    async def _attempt(self, deadline: float, number: int) -> IssuedToken:
        s = self._settings
        connect, read = attempt_timeouts(s, deadline)
        timeout = httpx.Timeout(read, connect=connect)
        requested_at, requested_at_wall = time.monotonic(), time.time()
        try:
            async with self._http().stream(
                "POST",
                s.token_url,
                data=wire.form(s.client_id, s.client_secret),
                headers=wire.REQUEST_HEADERS,
                timeout=timeout,
            ) as response:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY:
                        break
                status, headers = response.status_code, response.headers
        except (httpx.HTTPError, OSError) as exc:
            raise unavailable(s, f"failed ({type(exc).__name__})", number) from None
        return issued_from_reply(
            status,
            headers,
            body,
            requested_at=requested_at,
            requested_at_wall=requested_at_wall,
            number=number,
        )
