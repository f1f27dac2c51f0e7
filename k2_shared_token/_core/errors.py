"""Every error a caller of this package can see.

All of them derive from :class:`K2TokenError`, so one ``except`` clause covers the package, and
none of them ever carries the client secret, a whole access token or a raw response body: their
messages are written here, from parsed fields, never copied from the wire wholesale.

Each error that can be reported to a fleet (a lock holder telling its waiters why it gave up)
has a short ``code`` so that the report travels through Redis as a word, not as pickled state.
"""

from __future__ import annotations


class K2TokenError(Exception):
    """Base class of every error raised by k2_shared_token.

    ``attempts``: on an error that ended an exchange, how many requests it made (else None).
    """

    code = "error"
    attempts: int | None = None


class ConfigurationError(K2TokenError, ValueError):
    """The provider was built with settings that cannot work; raised at construction."""

    code = "configuration"


class ClosedMidFlowError(ConfigurationError):
    """Internal: an effect refused because the provider was closed while its flow ran. The
    driver settles the flow's lock as for an interruption; callers see a ConfigurationError."""


class TokenEndpointError(K2TokenError):
    """The token endpoint did not hand out a usable token.

    ``status`` is the HTTP status (``None`` when no reply arrived), ``error`` the OAuth error code
    when the reply had one, ``retry_after`` the server's requested pause in seconds, if any.
    """

    code = "endpoint"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.retry_after = retry_after


class InvalidCredentialsError(TokenEndpointError):
    """K2 rejected the client id or secret (``invalid_client``). Retrying cannot help."""

    code = "invalid_client"


class TokenRequestRejectedError(TokenEndpointError):
    """K2 refused the request itself (400: ``invalid_request``, ``unsupported_grant_type``,
    ``unauthorized_client``...). A configuration or server-side problem; retrying cannot help."""

    code = "rejected"


class InvalidTokenResponseError(TokenEndpointError):
    """A success status with a body that is not a K2 token reply (a proxy's HTML page, truncated
    JSON, missing or mistyped fields). Retried: proxies and load balancers produce these briefly."""

    code = "invalid_response"


class TokenEndpointUnavailableError(TokenEndpointError):
    """Connection errors, timeouts, 5xx or 429 that outlasted the retry budget."""

    code = "unavailable"


class InvalidTokenError(TokenEndpointError):
    """K2 answered that an access token is not valid (``invalid_token``: expired, revoked or
    unknown), e.g. token info for a dead token. Only the token API raises it; the exchange
    never does."""

    code = "invalid_token"


class TokenUnavailableError(K2TokenError):
    """No valid token could be had within ``wait_timeout`` (another worker holds the lock and
    has not published a token in time)."""

    code = "timeout"


class SharedCacheError(K2TokenError):
    """Redis failed or answered something unusable; the underlying redis error is chained."""

    code = "shared_cache"


_REPORTABLE: dict[str, type[TokenEndpointError]] = {
    cls.code: cls
    for cls in (
        InvalidCredentialsError,
        TokenRequestRejectedError,
        InvalidTokenResponseError,
        TokenEndpointUnavailableError,
    )
}


def error_from_report(code: str, retry_after: float | None = None) -> TokenEndpointError:
    """Rebuild the error another worker reported through Redis: a lock holder telling its
    waiters why it gave up, or the fleet's hold-off after a failed exchange. ``retry_after`` is
    how long the fleet will not ask K2 again (seconds), when known."""
    cls = _REPORTABLE.get(code, TokenEndpointError)
    message = f"a recent token exchange failed: {cls.__name__} ({code})"
    if retry_after is not None:
        message += f"; the fleet asks K2 again in {retry_after:.1f} s"
    return cls(message, retry_after=retry_after)
