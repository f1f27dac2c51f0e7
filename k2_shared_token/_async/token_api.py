"""K2's token API beyond the exchange: revoke, introspect, token info.

One request per call, on the exchange's transport (the same connection pool) with the
``connect_timeout`` and ``read_timeout`` settings, and no retries: none of these hands out a
token, so nothing waits on them but their caller. What is sent and what a reply means is
:mod:`.._k2.token_api`; the provider decides which token and what follows (``invalidate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

from .._core.errors import TokenEndpointError, TokenEndpointUnavailableError
from .._core.settings import Settings
from .._core.tokens import fingerprint_of
from .._k2 import token_api
from .._k2.token_api import ApiRequest, Introspection, TokenInfo
from .._k2.transport import AsyncTransport, TransportError

log = logging.getLogger("k2_shared_token.token_api")

T = TypeVar("T")
Parse = Callable[[int, Mapping[str, str], bytes], T]


class AsyncTokenApiClient:
    """Revoke, introspect and token info for one set of credentials."""

    def __init__(self, settings: Settings, transport: AsyncTransport) -> None:
        self._settings = settings
        self.transport = transport

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._settings.base_url!r})"

    async def _call(self, request: ApiRequest, token: str, parse: Parse[T]) -> T:
        """Send ``request`` once and judge its reply; failures are logged by the token's
        fingerprint and raised as typed errors."""
        s = self._settings
        try:
            reply = await self.transport.request(
                request.method,
                request.url,
                data=request.data,
                headers=request.headers,
                timeout=(s.connect_timeout, s.read_timeout),
                limit=token_api.MAX_BODY,
            )
        except TransportError as exc:
            log.warning("%s of token %s failed (%s)", request.what, fingerprint_of(token), exc.kind)
            raise TokenEndpointUnavailableError(
                f"{request.what} request to {s.base_url} failed ({exc.kind})"
            ) from None
        try:
            return parse(reply.status, reply.headers, reply.body)
        except TokenEndpointError as exc:
            log.warning("%s of token %s: %s", request.what, fingerprint_of(token), exc)
            raise

    async def revoke(self, token: str) -> None:
        """``POST /oauth/revoke``; returns when K2 answered 200."""
        s = self._settings
        request = token_api.revoke_request(s.base_url, s.client_id, s.client_secret, token)
        await self._call(request, token, token_api.parse_revoke_reply)
        log.info("namespace %s: token %s revoked at K2", s.namespace, fingerprint_of(token))

    async def introspect(self, token: str) -> Introspection:
        """``POST /oauth/introspect``."""
        s = self._settings
        request = token_api.introspect_request(s.base_url, s.client_id, s.client_secret, token)
        return await self._call(request, token, token_api.parse_introspection)

    async def token_info(self, token: str) -> TokenInfo:
        """``GET /oauth/token/info`` with the token as the bearer."""
        request = token_api.token_info_request(self._settings.base_url, token)
        return await self._call(request, token, token_api.parse_token_info)
