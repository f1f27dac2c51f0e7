"""The rest of K2's token API (Doorkeeper's routes): revoke, introspect and token info.

Pure functions, like :mod:`.wire`: the request each call sends, and the verdict on each reply
(status, headers, body), shared by the requests and httpx sides
(:mod:`k2_shared_token._async.token_api` performs them). Messages name what was wrong (a
status, a field, a type) and never quote the body, the token or the secret.

Shapes (k2-contract.md sections 4 and 9):

- ``POST /oauth/revoke`` (form: client_id, client_secret, token): 200 ``{}``, also for an
  unknown or already revoked token; 403 ``unauthorized_client`` for bad client credentials
  or another client's token.
- ``POST /oauth/introspect`` (form: client_id, client_secret, token): 200
  ``{"active": true, "scope", "client_id", "token_type", "exp", "iat"}`` or
  ``{"active": false}``; K2 sends ``exp``/``iat`` as ISO-8601 strings with an offset
  (``"2021-04-07T10:31:01+03:00"``), stock Doorkeeper as integer epoch seconds: both parse.
- ``GET /oauth/token/info`` (``Authorization: Bearer <token>``): 200
  ``{"resource_owner_id", "scope": [...], "expires_in", "application": {"uid"}, "created_at"}``
  (``expires_in`` is the remaining lifetime); 401 ``invalid_token`` for a dead token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .._core.errors import (
    ConfigurationError,
    InvalidTokenError,
    InvalidTokenResponseError,
    TokenEndpointError,
    TokenRequestRejectedError,
)
from . import wire

REVOKE_PATH = "/oauth/revoke"
INTROSPECT_PATH = "/oauth/introspect"
TOKEN_INFO_PATH = "/oauth/token/info"
MAX_BODY = 64 * 1024

REVOKE, INTROSPECT, TOKEN_INFO = "revoke", "introspect", "token info"
_GET_HEADERS = {"Accept": "application/json", "User-Agent": wire.USER_AGENT}
# A token we put into a form field or an Authorization header: printable ASCII, no spaces
# (a CR or LF would let a caller's value inject a header).
_SENDABLE_TOKEN = re.compile(r"[\x21-\x7e]+")
_DIGITS = re.compile(r"[0-9]{1,12}")
# Epoch seconds we turn into datetimes: 1970 .. 9999 (beyond that datetime cannot hold it).
_MAX_EPOCH = 253402300799


@dataclass(frozen=True)
class ApiRequest:
    """One request of the token API. ``data`` and ``headers`` carry the secret or the token,
    so neither is in the repr."""

    what: str
    method: str
    url: str
    data: Mapping[str, str] | None = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)


@dataclass(frozen=True)
class Introspection:
    """What ``POST /oauth/introspect`` said about a token (RFC 7662 fields K2 sends).

    ``exp`` and ``iat`` are timezone-aware datetimes (K2's ISO-8601 strings keep their offset;
    Doorkeeper's integers become UTC); every field but ``active`` is ``None`` when the reply
    does not carry it, as in ``{"active": false}``. ``raw`` is the reply's JSON object as
    received (what the k2-connect SDK returns); it is not in the repr.
    """

    active: bool
    scope: str | None = None
    client_id: str | None = None
    token_type: str | None = None
    exp: datetime | None = None
    iat: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)


@dataclass(frozen=True)
class TokenInfo:
    """What ``GET /oauth/token/info`` said about the token it was called with.

    ``expires_in`` is the *remaining* lifetime in whole seconds (0 near the end; ``None`` for
    a token without expiry); ``scope`` the token's scopes; ``application_uid`` the client id
    it was issued to; ``created_at`` an aware datetime (UTC for Doorkeeper's integer). ``raw``
    is the reply's JSON object as received; it is not in the repr.
    """

    expires_in: int | None
    scope: tuple[str, ...]
    application_uid: str | None
    created_at: datetime | None
    resource_owner_id: str | int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)


# -- requests ------------------------------------------------------------------------------


def check_token(token: object) -> str:
    """The token as we will send it, or :class:`ConfigurationError` naming the problem (never
    the value)."""
    if not isinstance(token, str) or not token:
        raise ConfigurationError("token must be a non-empty string")
    if not _SENDABLE_TOKEN.fullmatch(token):
        raise ConfigurationError("token contains spaces or characters outside printable ASCII")
    return token


def revoke_request(base_url: str, client_id: str, client_secret: str, token: str) -> ApiRequest:
    data = {"client_id": client_id, "client_secret": client_secret, "token": check_token(token)}
    return ApiRequest(REVOKE, "POST", base_url + REVOKE_PATH, data, dict(wire.REQUEST_HEADERS))


def introspect_request(base_url: str, client_id: str, client_secret: str, token: str) -> ApiRequest:
    data = {"client_id": client_id, "client_secret": client_secret, "token": check_token(token)}
    url = base_url + INTROSPECT_PATH
    return ApiRequest(INTROSPECT, "POST", url, data, dict(wire.REQUEST_HEADERS))


def token_info_request(base_url: str, token: str) -> ApiRequest:
    headers = {**_GET_HEADERS, "Authorization": f"Bearer {check_token(token)}"}
    return ApiRequest(TOKEN_INFO, "GET", base_url + TOKEN_INFO_PATH, None, headers)


# -- replies -------------------------------------------------------------------------------


def error_for_reply(
    what: str, status: int, headers: Mapping[str, str], body: bytes
) -> TokenEndpointError:
    """The typed error a non-200 reply of ``what`` amounts to."""
    endpoint = f"{what} endpoint"
    error = wire.oauth_error(body)
    shown = wire.shown_error(error)
    # Token info authenticates with the token alone: any 401 there is about the token.
    if error == "invalid_token" or (
        what == TOKEN_INFO and status == 401 and error != "invalid_client"
    ):
        return InvalidTokenError(
            f"{endpoint} answered HTTP {status}" + (f" ({shown})" if shown else "")
            + ": the token is expired, revoked or unknown",
            status=status,
            error=error,
        )  # fmt: skip
    if what == REVOKE and status == 403:
        # Doorkeeper answers both cases alike: it does not say which one it was.
        return TokenRequestRejectedError(
            f"{endpoint} answered HTTP 403" + (f" ({shown})" if shown else "")
            + ": K2 refused to revoke the token (wrong client credentials, or a token issued "
            "to another client)",
            status=status,
            error=error,
        )  # fmt: skip
    return wire.error_for_status(status, headers, body, endpoint=endpoint)


def _json_object(what: str, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY:
        raise InvalidTokenResponseError(
            f"{what} endpoint answered HTTP {status} with a body over {MAX_BODY} bytes",
            status=status,
        )
    if status != 200:
        raise error_for_reply(what, status, headers, body)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidTokenResponseError(
            f"{what} endpoint answered 200 with a body that is not JSON ({len(body)} bytes)",
            status=status,
        ) from None
    if not isinstance(data, dict):
        raise InvalidTokenResponseError(
            f"{what} reply is JSON {type(data).__name__}, not an object", status=status
        )
    return data


def _invalid(what: str, problem: str) -> InvalidTokenResponseError:
    return InvalidTokenResponseError(f"invalid {what} reply: {problem}", status=200)


def parse_time(value: object) -> datetime | None:
    """An aware datetime from an ISO-8601 string with an offset (K2) or integer epoch seconds
    (Doorkeeper, RFC 7662); ``None`` for ``None``. :class:`ValueError` for anything else,
    naive ISO strings included (which zone would they be in?)."""
    if value is None:
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value <= _MAX_EPOCH:
            raise ValueError("epoch seconds out of range")
        return datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"  # Python 3.10's fromisoformat does not read "Z"
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("not an ISO-8601 time") from None
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("an ISO-8601 time without an offset")
        return when
    raise ValueError(f"a JSON {type(value).__name__} is not a time")


def _time_field(what: str, data: Mapping[str, Any], name: str) -> datetime | None:
    try:
        return parse_time(data.get(name))
    except ValueError as exc:
        raise _invalid(what, f"{name} is not a time ({exc})") from None


def _optional_str(what: str, data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(what, f"{name} is not a string")
    return value


def parse_revoke_reply(status: int, headers: Mapping[str, str], body: bytes) -> None:
    """None for a success (200, K2's ``{}``; an empty body is accepted too), else the error."""
    if status == 200 and not body.strip() and len(body) <= MAX_BODY:
        return
    _json_object(REVOKE, status, headers, body)


def parse_introspection(status: int, headers: Mapping[str, str], body: bytes) -> Introspection:
    data = _json_object(INTROSPECT, status, headers, body)
    active = data.get("active")
    if not isinstance(active, bool):
        raise _invalid(INTROSPECT, "active is missing or not a boolean")
    return Introspection(
        active=active,
        scope=_optional_str(INTROSPECT, data, "scope"),
        client_id=_optional_str(INTROSPECT, data, "client_id"),
        token_type=_optional_str(INTROSPECT, data, "token_type"),
        exp=_time_field(INTROSPECT, data, "exp"),
        iat=_time_field(INTROSPECT, data, "iat"),
        raw=data,
    )


def parse_token_info(status: int, headers: Mapping[str, str], body: bytes) -> TokenInfo:
    data = _json_object(TOKEN_INFO, status, headers, body)
    expires_in = data.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, (int, float))
        or not math.isfinite(expires_in)
        or expires_in < 0
    ):
        raise _invalid(TOKEN_INFO, "expires_in is not a number of seconds >= 0")
    scope = data.get("scope")
    if scope is None:
        scopes: tuple[str, ...] = ()
    elif isinstance(scope, str):  # RFC 7662 style, space-separated
        scopes = tuple(scope.split())
    elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        scopes = tuple(scope)
    else:
        raise _invalid(TOKEN_INFO, "scope is neither a list of strings nor a string")
    application = data.get("application")
    if application is None:
        uid = None
    elif isinstance(application, dict):
        uid = _optional_str(TOKEN_INFO, application, "uid")
    else:
        raise _invalid(TOKEN_INFO, "application is not an object")
    owner = data.get("resource_owner_id")
    if owner is not None and (isinstance(owner, bool) or not isinstance(owner, (str, int))):
        raise _invalid(TOKEN_INFO, "resource_owner_id is neither a string nor an integer")
    return TokenInfo(
        expires_in=None if expires_in is None else math.floor(expires_in),
        scope=scopes,
        application_uid=uid,
        created_at=_time_field(TOKEN_INFO, data, "created_at"),
        resource_owner_id=owner,
        raw=data,
    )
