"""The HTTP requests we make to K2, per side: requests for blocking code, httpx for asyncio.
One generic :meth:`~Transport.request` serves the exchange (``post``) and the token API
(revoke, introspect, token info). Everything around it (retries, timeouts, what a reply
means) is written once in :mod:`k2_shared_token._async.exchange`, :mod:`.attempts`,
:mod:`k2_shared_token._async.token_api` and :mod:`.token_api`.

A transport returns the status, the headers and at most ``limit + 1`` bytes of the body, or
raises :class:`TransportError` naming the failure's class only: the HTTP libraries' own
messages can contain the full URL and are not ours to vouch for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import requests
import urllib3

from .._core.errors import ConfigurationError

if TYPE_CHECKING:
    import httpx


class TransportError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport:
    """requests; ``session`` is yours to close if you pass one."""

    def __init__(self, session: Any = None) -> None:
        if session is not None and not isinstance(session, requests.Session):
            raise ConfigurationError(
                "session must be a requests.Session for SharedTokenProvider "
                f"(got {type(session).__name__}; an httpx.AsyncClient belongs to "
                "AsyncSharedTokenProvider)"
            )
        self._session = session or requests.Session()
        self._owns = session is None

    def request(
        self,
        method: str,
        url: str,
        *,
        data: Mapping[str, str] | None,
        headers: Mapping[str, str],
        timeout: tuple[float, float],
        limit: int,
    ) -> Reply:
        """One request, no redirects followed; ``data`` is sent form-encoded (``None``: no
        body); at most ``limit + 1`` bytes of the reply's body are read."""
        try:
            with self._session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                body = response.raw.read(limit + 1, decode_content=True)
                return Reply(response.status_code, response.headers, body)
        # ValueError: http.client's verdict on a malformed body framing (a bad chunk size),
        # which reaches us unwrapped while the body is read.
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            raise TransportError(type(e).__name__) from None

    def post(
        self,
        url: str,
        data: Mapping[str, str],
        headers: Mapping[str, str],
        timeout: tuple[float, float],
        limit: int,
    ) -> Reply:
        return self.request("POST", url, data=data, headers=headers, timeout=timeout, limit=limit)

    def reset_after_fork(self) -> None:
        """Pooled connections are shared with the parent after fork(); start a fresh pool."""
        if self._owns:
            self._session = requests.Session()

    def close(self) -> None:
        if self._owns:
            self._session.close()


def _httpx() -> Any:
    try:
        import httpx  # noqa: PLC0415 - the 'asyncio' extra
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            "AsyncSharedTokenProvider needs the 'asyncio' extra: pip install "
            "'k2-shared-token[asyncio]'"
        ) from None
    return httpx


class AsyncTransport:
    """httpx; the client is made on first use, inside the running loop that will use it."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._httpx = _httpx()
        if client is not None and not isinstance(client, self._httpx.AsyncClient):
            raise ConfigurationError(
                "session must be an httpx.AsyncClient for AsyncSharedTokenProvider "
                f"(got {type(client).__name__})"
            )
        self._client: httpx.AsyncClient | None = client
        self._owns = client is None

    def _http(self) -> httpx.AsyncClient:
        client = self._client
        if client is None:
            client = self._client = self._httpx.AsyncClient(follow_redirects=False)
        return client

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: Mapping[str, str] | None,
        headers: Mapping[str, str],
        timeout: tuple[float, float],
        limit: int,
    ) -> Reply:
        """As :meth:`Transport.request`."""
        httpx = self._httpx
        connect, read = timeout
        try:
            timeouts = httpx.Timeout(read, connect=connect)
            async with self._http().stream(
                method,
                url,
                data=dict(data) if data is not None else None,
                headers=dict(headers),
                timeout=timeouts,
            ) as response:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        break
                return Reply(response.status_code, response.headers, body)
        except (httpx.HTTPError, OSError) as exc:
            raise TransportError(type(exc).__name__) from None

    async def post(
        self,
        url: str,
        data: Mapping[str, str],
        headers: Mapping[str, str],
        timeout: tuple[float, float],
        limit: int,
    ) -> Reply:
        return await self.request(
            "POST", url, data=data, headers=headers, timeout=timeout, limit=limit
        )

    def reset_after_fork(self) -> None:
        if self._owns:
            self._client = None

    async def aclose(self) -> None:
        if self._owns and self._client is not None:
            await self._client.aclose()
            self._client = None
