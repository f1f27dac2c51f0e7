"""httpx integration: the counterpart of :mod:`.auth` for ``httpx.Client`` and ``AsyncClient``.

Same contract as the requests auth: send the shared token; on a 401, invalidate it
(compare-and-delete, so a fleet seeing the same 401 causes one refresh) and send the request
once more with whatever token is current. Exactly once: a second 401 is returned as is.
:class:`.SharedTokenProvider` drives the sync flow, :class:`.AsyncSharedTokenProvider` the async
one; httpx picks the flow that matches the client.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .._async_provider import AsyncSharedTokenProvider
    from .._provider import SharedTokenProvider


def failed_token(request: httpx.Request, response: httpx.Response) -> str | None:
    """The token a 401 rejected, if the request is worth one retry."""
    if response.status_code != 401:
        return None
    _, _, token = request.headers.get("Authorization", "").partition(" ")
    return token or None


class K2HttpxAuth(httpx.Auth):
    requires_request_body = True  # read it up front, so the retry can send it again

    def __init__(self, provider: SharedTokenProvider | AsyncSharedTokenProvider) -> None:
        self.provider = provider

    def __repr__(self) -> str:
        return f"K2HttpxAuth({self.provider!r})"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, Any, None]:
        provider: Any = self.provider
        request.headers["Authorization"] = provider.get().authorization
        response = yield request
        failed = failed_token(request, response)
        if failed is not None:
            provider.invalidate(failed)
            request.headers["Authorization"] = provider.get().authorization
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, Any]:
        provider: Any = self.provider
        request.headers["Authorization"] = (await provider.get()).authorization
        response = yield request
        failed = failed_token(request, response)
        if failed is not None:
            await provider.invalidate(failed)
            request.headers["Authorization"] = (await provider.get()).authorization
            yield request
