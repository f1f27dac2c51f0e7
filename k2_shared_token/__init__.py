"""One Kopo Kopo K2 Connect access token, shared by a fleet of processes through Redis."""

from ._core.errors import (
    ConfigurationError,
    InvalidCredentialsError,
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
from ._sync.provider import SharedTokenProvider
from ._sync.registry import ProviderRegistry
from ._version import __version__


def __getattr__(name: str) -> object:
    # The asyncio side needs httpx (the 'asyncio' extra) only when used; import it on demand.
    if name == "AsyncSharedTokenProvider":
        from ._async.provider import AsyncSharedTokenProvider  # noqa: PLC0415

        return AsyncSharedTokenProvider
    if name == "AsyncProviderRegistry":
        from ._async.registry import AsyncProviderRegistry  # noqa: PLC0415

        return AsyncProviderRegistry
    raise AttributeError(name)


__all__ = [
    "PRODUCTION_URL",
    "SANDBOX_URL",
    "AccessToken",
    "AsyncProviderRegistry",
    "AsyncSharedTokenProvider",
    "ConfigurationError",
    "InvalidCredentialsError",
    "InvalidTokenResponseError",
    "K2TokenError",
    "ProviderRegistry",
    "SharedCacheError",
    "SharedTokenProvider",
    "TokenEndpointError",
    "TokenEndpointUnavailableError",
    "TokenRequestRejectedError",
    "TokenUnavailableError",
    "__version__",
]
