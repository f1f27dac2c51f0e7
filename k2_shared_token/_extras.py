"""What one side's provider has that the other's cannot: the requests auth is blocking only.

The provider is written once (:mod:`._async.provider`) and its blocking twin generated, so a
method only one side may have lives on that side's mixin here; the generator swaps the names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from requests.auth import AuthBase

    from ._core.source import TokenSource


class AsyncProviderExtras:
    """Nothing yet: asyncio code authenticates httpx requests with ``httpx_auth()``."""


class ProviderExtras:
    def auth(self: TokenSource) -> AuthBase:
        """A requests auth that sends ``Authorization: Bearer ...`` and, on a 401, invalidates
        the token and retries the request once with a fresh one."""
        from .contrib.requests_auth import K2BearerAuth  # noqa: PLC0415 - only when used

        return K2BearerAuth(self)
