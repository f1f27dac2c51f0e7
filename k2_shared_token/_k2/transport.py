"""The HTTP requests we make to K2, per side: requests for blocking code, httpx for asyncio.
One generic :meth:`~Transport.request` serves the exchange (``post``) and the token API
(revoke, introspect, token info). Everything around it (retries, timeouts, what a reply
means) is written once in :mod:`k2_shared_token._async.exchange`, :mod:`.attempts`,
:mod:`k2_shared_token._async.token_api` and :mod:`.token_api`.

A transport returns the status, the headers and at most ``limit + 1`` bytes of the body, or
raises :class:`TransportError` naming the failure's class only: the HTTP libraries' own
messages can contain the full URL and are not ours to vouch for.

Without a session of the user's, the providers of one base URL share one HTTP client and its
connection pool (per process; per event loop for asyncio): a thousand tenants of one K2 keep a
few connections open, not a thousand. A shared client keeps no cookies, so nothing one tenant's
reply sets travels with another tenant's request. It is closed when its last provider closes.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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


C = TypeVar("C")


_NO_COOKIES = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])


class _Shared(Generic[C]):
    """HTTP clients shared per base URL, counted by their users, made anew in a forked child
    (whose pooled connections would be the parent's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._clients: dict[str, tuple[C, int]] = {}

    def _forked(self) -> bool:
        """In a forked child (where only this thread runs), start afresh: the lock may have
        been held by a parent's thread at the fork, and the clients are the parent's."""
        if self._pid == os.getpid():
            return False
        self._lock, self._pid, self._clients = threading.Lock(), os.getpid(), {}
        return True

    def acquire(self, key: str, make: Callable[[], C]) -> C:
        self._forked()
        with self._lock:
            client, users = self._clients.get(key) or (make(), 0)
            self._clients[key] = (client, users + 1)
            return client

    def release(self, key: str) -> C | None:
        """The client to close, once its last user let go of it; else None."""
        if self._forked():
            return None
        with self._lock:
            entry = self._clients.get(key)
            if entry is None:
                return None
            client, users = entry
            if users > 1:
                self._clients[key] = (client, users - 1)
                return None
            del self._clients[key]
            return client


def _requests_session() -> requests.Session:
    session = requests.Session()
    session.cookies.set_policy(_NO_COOKIES)
    return session


_sessions: _Shared[requests.Session] = _Shared()


class Transport:
    """requests; ``session`` is yours to close if you pass one, else the session of
    ``base_url`` shared in this process is used."""

    def __init__(self, session: Any = None, base_url: str = "") -> None:
        if session is not None and not isinstance(session, requests.Session):
            raise ConfigurationError(
                "session must be a requests.Session for SharedTokenProvider "
                f"(got {type(session).__name__}; an httpx.AsyncClient belongs to "
                "AsyncSharedTokenProvider)"
            )
        self._key = base_url
        self._owns = session is None
        self._session: requests.Session = (
            _sessions.acquire(base_url, _requests_session) if session is None else session
        )

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
        """Pooled connections are shared with the parent after fork(); take the child's own."""
        if self._owns:
            self._session = _sessions.acquire(self._key, _requests_session)

    def close(self) -> None:
        if self._owns:
            self._owns = False  # one release per acquire, however often close() is called
            last = _sessions.release(self._key)
            if last is not None:
                last.close()


def _httpx() -> Any:
    try:
        import httpx  # noqa: PLC0415 - the 'asyncio' extra
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            "AsyncSharedTokenProvider needs the 'asyncio' extra: pip install "
            "'k2-shared-token[asyncio]'"
        ) from None
    return httpx


_async_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, _Shared[httpx.AsyncClient]
] = weakref.WeakKeyDictionary()


class AsyncTransport:
    """httpx; without a client of the user's, the one of ``base_url`` shared in the running
    loop is taken on first use (an httpx client belongs to the loop it was used in)."""

    def __init__(self, client: httpx.AsyncClient | None = None, base_url: str = "") -> None:
        self._httpx = _httpx()
        if client is not None and not isinstance(client, self._httpx.AsyncClient):
            raise ConfigurationError(
                "session must be an httpx.AsyncClient for AsyncSharedTokenProvider "
                f"(got {type(client).__name__})"
            )
        self._client: httpx.AsyncClient | None = client
        self._owns = client is None
        self._key = base_url
        self._shared: _Shared[httpx.AsyncClient] | None = None

    def _http(self) -> httpx.AsyncClient:
        client = self._client
        if client is None:
            loop = asyncio.get_running_loop()
            shared = self._shared = _async_clients.setdefault(loop, _Shared())
            client = self._client = shared.acquire(self._key, self._new_client)
        return client

    def _new_client(self) -> httpx.AsyncClient:
        client: httpx.AsyncClient = self._httpx.AsyncClient(
            follow_redirects=False, cookies=http.cookiejar.CookieJar(_NO_COOKIES)
        )
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
            # follow_redirects here as well as on our own client: a user's client may follow
            # them, and a 307 would re-post the secret (or the token) wherever it points.
            async with self._http().stream(
                method,
                url,
                data=dict(data) if data is not None else None,
                headers=dict(headers),
                timeout=timeouts,
                follow_redirects=False,
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
            self._client, self._shared = None, None

    async def aclose(self) -> None:
        shared, self._shared = self._shared, None
        if self._owns and shared is not None:
            self._client = None
            last = shared.release(self._key)
            if last is not None:
                await last.aclose()
