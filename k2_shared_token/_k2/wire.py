"""The K2 token endpoint's wire contract: what we send, and how every reply is judged.

Pure functions over (status, headers, body) so the requests and httpx clients share them and the
property tests can throw arbitrary replies at them. Error messages name what was wrong (a status,
a missing field, a type) and never quote the body: a garbage reply might echo our credentials.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Mapping
from datetime import datetime

from .._core.errors import (
    InvalidCredentialsError,
    InvalidTokenResponseError,
    TokenEndpointError,
    TokenEndpointUnavailableError,
    TokenRequestRejectedError,
)
from .._redis.codec import MAX_TOKEN_CHARS
from .._version import __version__

USER_AGENT = f"k2-shared-token/{__version__}"
REQUEST_HEADERS = {
    "Accept": "application/json",
    "Content-Type": "application/x-www-form-urlencoded",
    "User-Agent": USER_AGENT,
}
_REJECTED = {
    "invalid_request",
    "unsupported_grant_type",
    "unauthorized_client",
    "invalid_scope",
    "invalid_grant",
}
# RFC 6750 b64token: what a bearer token may look like on the wire (ASCII only).
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_RETRY_AFTER_SECONDS = re.compile(r"[0-9]{1,9}")
_SHOWN_MEDIA_TYPES = {"application/json", "text/html", "text/plain", "application/xml"}
MAX_EXPIRES_IN = 10 * 366 * 86400  # anything longer is not a K2 reply we understand
# OAuth error codes we name in messages. Another code is kept (in ``error``, never in the
# message) only if it has the shape of one (RFC 6749: short, lower case and underscores), since
# a reply can put arbitrary text (an echoed credential, say) where the code should be.
_KNOWN_ERRORS = _REJECTED | {
    "invalid_client",
    "invalid_token",
    "server_error",
    "temporarily_unavailable",
    "access_denied",
    "rate_limited",
    # Doorkeeper's own race with revoke_previous_client_credentials_token: two token requests
    # for one client at once; an immediate retry succeeds (see the contract, section 9).
    "invalid_token_reuse",
}
_CODE_SHAPE = re.compile(r"[a-z][a-z0-9_]{0,47}")


def form(client_id: str, client_secret: str) -> dict[str, str]:
    return {
        "client_id": client_id,
        "client_secret": client_secret,
        "grant_type": "client_credentials",
    }


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if _RETRY_AFTER_SECONDS.fullmatch(value):
        return float(min(int(value), 86400))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, min(86400.0, when.timestamp() - (time.time() if now is None else now)))


def oauth_error(body: bytes) -> str | None:
    """The reply's OAuth ``error`` code if it has the shape of one, else ``None``."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) and _CODE_SHAPE.fullmatch(error) else None


def shown_error(error: str | None) -> str | None:
    """``error`` if a message may name it (a code we know), else ``None``."""
    return error if error in _KNOWN_ERRORS else None


def _valid_created_at(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return False
        return True
    return False


def parse_token_reply(status: int, headers: Mapping[str, str], body: bytes) -> tuple[str, str, int]:
    """``(access_token, token_type, expires_in)`` from a reply, or the error it amounts to.

    ``created_at`` is accepted as an integer or an ISO-8601 string (K2 material shows both) but
    never used: expiry is counted from when the request was sent.
    """
    if status != 200:
        raise error_for_status(status, headers, body)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        kind = media if media in _SHOWN_MEDIA_TYPES else "another content type"
        raise InvalidTokenResponseError(
            f"token endpoint answered 200 with a body that is not JSON ({kind}, {len(body)} bytes)",
            status=status,
        ) from None
    if not isinstance(data, dict):
        raise InvalidTokenResponseError(
            f"token reply is JSON {type(data).__name__}, not an object", status=status
        )
    token, token_type, expires_in = (
        data.get("access_token"),
        data.get("token_type"),
        data.get("expires_in"),
    )
    problem = None
    if not isinstance(token, str) or not token.strip():
        problem = "access_token is missing or not a non-empty string"
    elif len(token) > MAX_TOKEN_CHARS or not _BEARER_TOKEN.fullmatch(token):
        problem = "access_token is not a bearer token (RFC 6750 syntax)"
    elif not isinstance(token_type, str) or token_type.lower() != "bearer":
        problem = "token_type is missing or not Bearer"
    elif isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
        problem = "expires_in is missing or not a number"
    elif not 0 <= expires_in <= MAX_EXPIRES_IN or expires_in != math.floor(expires_in):
        # 0 is a real reply: Doorkeeper's reuse_access_token hands back a token about to die
        # with its remaining lifetime rounded. It means "expired now" (the flow decides).
        problem = "expires_in is not a whole number of seconds >= 0"
    elif "created_at" in data and not _valid_created_at(data["created_at"]):
        problem = "created_at is neither an integer nor an ISO-8601 string"
    if problem is not None:
        raise InvalidTokenResponseError(f"invalid token reply: {problem}", status=status)
    assert isinstance(token, str)
    assert isinstance(token_type, str)
    return token, "Bearer", int(expires_in)  # type: ignore[arg-type]


def error_for_status(
    status: int, headers: Mapping[str, str], body: bytes, *, endpoint: str = "token endpoint"
) -> TokenEndpointError:
    """Map a non-200 reply to its error class; the class decides whether it is retried.
    ``endpoint`` names the endpoint in the message (the token API's endpoints share this)."""
    error = oauth_error(body)
    retry_after = parse_retry_after(headers.get("retry-after"))
    named = shown_error(error)
    where = f"{endpoint} answered HTTP {status}" + (f" ({named})" if named else "")
    if error == "invalid_token_reuse":
        # Not the request's fault: retried at once by the exchange, and no fleet hold-off
        # beyond the shortest one if the retries all lose the race too.
        return TokenEndpointUnavailableError(where, status=status, error=error, retry_after=0.0)
    if error == "invalid_client" or (status == 401 and error not in _REJECTED):
        return InvalidCredentialsError(
            f"{where}: K2 rejected the client id or secret", status=status, error=error
        )
    if error in _REJECTED or status in (400, 403):
        return TokenRequestRejectedError(
            f"{where}: K2 refused the request", status=status, error=error
        )
    if status in {429, 408} or status >= 500:
        return TokenEndpointUnavailableError(
            where, status=status, error=error, retry_after=retry_after
        )
    return TokenEndpointError(where, status=status, error=error, retry_after=retry_after)
