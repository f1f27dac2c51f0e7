"""One Kopo Kopo K2 Connect access token, shared by a fleet of processes through Redis."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from ._async.provider import AsyncSharedTokenProvider
    from ._async.registry import AsyncProviderRegistry
    from ._core.errors import (
        ConfigurationError,
        InvalidCredentialsError,
        InvalidTokenError,
        InvalidTokenResponseError,
        K2TokenError,
        SharedCacheError,
        TokenEndpointError,
        TokenEndpointUnavailableError,
        TokenRequestRejectedError,
        TokenUnavailableError,
    )
    from ._core.settings import PRODUCTION_URL, SANDBOX_URL
    from ._core.tokens import AccessToken
    from ._k2.token_api import Introspection, TokenInfo
    from ._sync.provider import SharedTokenProvider
    from ._sync.registry import ProviderRegistry

# Where each public name lives. Loaded on first use, so importing the package (``k2-token
# --help``, a settings module that only names the provider) costs no redis, requests or httpx
# import; the asyncio side needs httpx (the 'asyncio' extra) only when it is used.
_HOMES = {
    "AsyncSharedTokenProvider": "._async.provider",
    "AsyncProviderRegistry": "._async.registry",
    "SharedTokenProvider": "._sync.provider",
    "ProviderRegistry": "._sync.registry",
    "AccessToken": "._core.tokens",
    "Introspection": "._k2.token_api",
    "TokenInfo": "._k2.token_api",
    "PRODUCTION_URL": "._core.settings",
    "SANDBOX_URL": "._core.settings",
    **dict.fromkeys(
        (
            "ConfigurationError",
            "InvalidCredentialsError",
            "InvalidTokenError",
            "InvalidTokenResponseError",
            "K2TokenError",
            "SharedCacheError",
            "TokenEndpointError",
            "TokenEndpointUnavailableError",
            "TokenRequestRejectedError",
            "TokenUnavailableError",
        ),
        "._core.errors",
    ),
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute read
    return value


__all__ = [
    "PRODUCTION_URL",
    "SANDBOX_URL",
    "AccessToken",
    "AsyncProviderRegistry",
    "AsyncSharedTokenProvider",
    "ConfigurationError",
    "Introspection",
    "InvalidCredentialsError",
    "InvalidTokenError",
    "InvalidTokenResponseError",
    "K2TokenError",
    "ProviderRegistry",
    "SharedCacheError",
    "SharedTokenProvider",
    "TokenEndpointError",
    "TokenEndpointUnavailableError",
    "TokenInfo",
    "TokenRequestRejectedError",
    "TokenUnavailableError",
    "__version__",
]
