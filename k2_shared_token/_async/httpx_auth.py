"""httpx integration: a bearer auth that survives a token K2 no longer accepts.

Same contract as the requests auth (:mod:`..contrib.requests_auth`): send the shared token; on
a 401, invalidate it (compare-and-delete, so a fleet seeing the same 401 causes one refresh) and
send the request once more with whatever token is current. Exactly once: a second 401 is
returned as is. Each side's auth works with its own kind of client only; used with the other
kind it raises :class:`ConfigurationError` on the first request instead of a confusing
``'coroutine' object has no attribute ...``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import NoReturn

import httpx

from .._core.errors import ConfigurationError
from .._core.source import AsyncTokenSource


def failed_token(request: httpx.Request, response: httpx.Response) -> str | None:
    """The token a 401 rejected, if the request is worth one retry."""
    if response.status_code != 401:
        return None
    _, _, token = request.headers.get("Authorization", "").partition(" ")
    return token or None


class AsyncK2HttpxAuth(httpx.Auth):
    requires_request_body = True  # read it up front, so the retry can send it again
    works_with = "httpx.AsyncClient"

    def __init__(self, source: AsyncTokenSource) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = (await self.source.get()).authorization
        response = yield request
        failed = failed_token(request, response)
        if failed is not None:
            await self.source.report_rejected(failed)
            request.headers["Authorization"] = (await self.source.get()).authorization
            yield request

    def sync_auth_flow(self, request: httpx.Request) -> NoReturn:
        raise ConfigurationError(
            f"{type(self).__name__} works with {self.works_with} only: take the auth of the "
            "provider that matches the client (SharedTokenProvider for httpx.Client, "
            "AsyncSharedTokenProvider for httpx.AsyncClient)"
        )
