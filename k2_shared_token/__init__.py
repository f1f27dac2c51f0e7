"""One Kopo Kopo K2 Connect access token, shared by a fleet of processes through Redis."""

from ._version import __version__
from .access_token import AccessToken
from .errors import (
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
from .provider import SharedTokenProvider
from .settings import PRODUCTION_URL, SANDBOX_URL

__all__ = [
    "PRODUCTION_URL",
    "SANDBOX_URL",
    "AccessToken",
    "ConfigurationError",
    "InvalidCredentialsError",
    "InvalidTokenResponseError",
    "K2TokenError",
    "SharedCacheError",
    "SharedTokenProvider",
    "TokenEndpointError",
    "TokenEndpointUnavailableError",
    "TokenRequestRejectedError",
    "TokenUnavailableError",
    "__version__",
]
