"""The token endpoint's wire contract and the exchange's retry policy (pure: no network)."""

from __future__ import annotations

import calendar
import json
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict
from tenacity import Retrying

from k2_shared_token._core.errors import (
    InvalidCredentialsError,
    InvalidTokenResponseError,
    TokenEndpointError,
    TokenEndpointUnavailableError,
    TokenRequestRejectedError,
)
from k2_shared_token._k2 import wire
from k2_shared_token._k2.retry import policy
from tests.strategies import json_values

MARKER = "ZQ7SECRETMARKER9XK"


def headers(**values: str) -> CaseInsensitiveDict[str]:
    return CaseInsensitiveDict({k.replace("_", "-"): v for k, v in values.items()})


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def good(**overrides: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "access_token": "tKn-abc.DEF_123~/+=",
        "token_type": "Bearer",
        "expires_in": 3600,
    }
    reply.update(overrides)
    return {k: v for k, v in reply.items() if v is not ...}


# -- successful replies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "created_at",
    [1700000000, 0, "2024-01-01T12:00:00Z", "2024-01-01T12:00:00+03:00", "2024-01-01", ...],
)
def test_valid_reply_with_created_at_int_iso_or_absent(created_at: object) -> None:
    reply = good(created_at=created_at)
    assert wire.parse_token_reply(200, headers(), body(**reply)) == (
        "tKn-abc.DEF_123~/+=",
        "Bearer",
        3600,
    )


@pytest.mark.parametrize("expires_in", [3600, 3600.0])
def test_valid_reply_expires_in_integer_or_integral_float(expires_in: float) -> None:
    token, token_type, lifetime = wire.parse_token_reply(
        200, headers(), body(**good(expires_in=expires_in))
    )
    assert (token, token_type, lifetime) == ("tKn-abc.DEF_123~/+=", "Bearer", 3600)
    assert type(lifetime) is int


@pytest.mark.parametrize("token_type", ["bearer", "BEARER", "Bearer"])
def test_token_type_is_case_insensitive_and_normalised(token_type: str) -> None:
    _, returned_type, _ = wire.parse_token_reply(
        200, headers(), body(**good(token_type=token_type))
    )
    assert returned_type == "Bearer"


def test_valid_reply_with_extra_fields_and_charset() -> None:
    reply = body(**good(scope="", refresh_token=None, extra={"a": [1, 2]}))
    content_type = "application/json; charset=utf-8"
    result = wire.parse_token_reply(200, headers(content_type=content_type), reply)
    assert result[2] == 3600


# -- invalid 200 replies ---------------------------------------------------------------------

INVALID_BODIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("html", f"<html><body>{MARKER}</body></html>".encode()),
    ("truncated", body(**good(access_token=MARKER))[:-5]),
    ("not utf-8", b"\xff\xfe\x00" + MARKER.encode()),
    ("json list", json.dumps([MARKER]).encode()),
    ("json string", json.dumps(MARKER).encode()),
    ("json null", b"null"),
    ("json number", b"3600"),
    ("deep nesting", b"[" * 100_000),
    ("no token", body(**good(access_token=..., note=MARKER))),
    ("token null", body(**good(access_token=None, note=MARKER))),
    ("token empty", body(**good(access_token=""))),
    ("token blank", body(**good(access_token="   "))),
    ("token int", body(**good(access_token=12345))),
    ("token list", body(**good(access_token=[MARKER]))),
    ("token with space", body(**good(access_token=f"{MARKER} x"))),
    ("token with newline", body(**good(access_token=f"{MARKER}\nx"))),
    ("token with nbsp", body(**good(access_token=f"{MARKER}\u00a0x"))),
    ("token too long", body(**good(access_token=MARKER + "a" * 5000))),
    ("no token_type", body(**good(token_type=..., access_token=MARKER))),
    ("token_type mac", body(**good(token_type="mac", access_token=MARKER))),
    ("token_type int", body(**good(token_type=1, access_token=MARKER))),
    ("no expires_in", body(**good(expires_in=..., access_token=MARKER))),
    ("expires_in str", body(**good(expires_in="3600", access_token=MARKER))),
    ("expires_in bool", body(**good(expires_in=True, access_token=MARKER))),
    ("expires_in null", body(**good(expires_in=None, access_token=MARKER))),
    ("expires_in negative", body(**good(expires_in=-5, access_token=MARKER))),
    ("expires_in fraction", body(**good(expires_in=3599.5, access_token=MARKER))),
    ("expires_in NaN", body(**good(expires_in=float("nan"), access_token=MARKER))),
    ("expires_in inf", body(**good(expires_in=float("inf"), access_token=MARKER))),
    ("expires_in 1e400", b'{"access_token":"a","token_type":"Bearer","expires_in":1e400}'),
    ("created_at float", body(**good(created_at=1.7e9, access_token=MARKER))),
    ("created_at bool", body(**good(created_at=True, access_token=MARKER))),
    ("created_at null", body(**good(created_at=None, access_token=MARKER))),
    ("created_at junk", body(**good(created_at=MARKER, access_token=MARKER))),
]


@pytest.mark.parametrize(("label", "raw"), INVALID_BODIES, ids=[b[0] for b in INVALID_BODIES])
def test_invalid_200_reply_raises_invalid_token_response_without_body(
    label: str, raw: bytes
) -> None:
    with pytest.raises(InvalidTokenResponseError) as info:
        wire.parse_token_reply(200, headers(content_type="text/html; charset=utf-8"), raw)
    assert info.value.status == 200
    assert MARKER not in str(info.value)
    assert MARKER not in repr(info.value)
    assert raw.decode("utf-8", "replace") not in str(info.value) or not raw


def test_non_json_200_names_the_content_type_and_size_only() -> None:
    raw = f"<html>{MARKER}</html>".encode()
    with pytest.raises(InvalidTokenResponseError, match=r"text/html, \d+ bytes"):
        wire.parse_token_reply(200, headers(content_type="text/html; charset=utf-8"), raw)


def test_invalid_token_response_is_retryable_class() -> None:
    assert InvalidTokenResponseError.code == "invalid_response"
    assert issubclass(InvalidTokenResponseError, TokenEndpointError)


def test_huge_integer_expires_in_is_an_invalid_response() -> None:
    raw = b'{"access_token":"a","token_type":"Bearer","expires_in":1' + b"0" * 400 + b"}"
    with pytest.raises(InvalidTokenResponseError):
        wire.parse_token_reply(200, headers(), raw)


# -- error statuses --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 500])
def test_invalid_client_is_invalid_credentials(status: int) -> None:
    raw = body(error="invalid_client", error_description=f"bad secret {MARKER}")
    with pytest.raises(InvalidCredentialsError) as info:
        wire.parse_token_reply(status, headers(), raw)
    assert (info.value.status, info.value.error) == (status, "invalid_client")
    assert MARKER not in str(info.value)


@pytest.mark.parametrize("raw", [b"", b"<html>Unauthorized</html>", body(error="access_denied")])
def test_401_without_a_rejection_code_is_invalid_credentials(raw: bytes) -> None:
    with pytest.raises(InvalidCredentialsError):
        wire.parse_token_reply(401, headers(), raw)


@pytest.mark.parametrize(
    "error",
    [
        "invalid_request",
        "unsupported_grant_type",
        "unauthorized_client",
        "invalid_scope",
        "invalid_grant",
    ],
)
def test_400_rejection_codes_are_request_rejected(error: str) -> None:
    raw = body(error=error, error_description=MARKER)
    with pytest.raises(TokenRequestRejectedError) as info:
        wire.parse_token_reply(400, headers(), raw)
    assert (info.value.status, info.value.error) == (400, error)
    assert MARKER not in str(info.value)


@pytest.mark.parametrize("error", ["invalid_request", "unsupported_grant_type"])
def test_legacy_401_with_rejection_code_is_request_rejected(error: str) -> None:
    with pytest.raises(TokenRequestRejectedError) as info:
        wire.parse_token_reply(401, headers(), body(error=error))
    assert info.value.status == 401
    assert info.value.code == "rejected"


@pytest.mark.parametrize(("status", "raw"), [(400, b""), (403, b"forbidden"), (403, b"{}")])
def test_400_and_403_without_code_are_request_rejected(status: int, raw: bytes) -> None:
    with pytest.raises(TokenRequestRejectedError):
        wire.parse_token_reply(status, headers(), raw)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_transient_statuses_are_unavailable(status: int) -> None:
    with pytest.raises(TokenEndpointUnavailableError) as info:
        wire.parse_token_reply(status, headers(), f"<html>{MARKER}</html>".encode())
    assert info.value.status == status
    assert info.value.retry_after is None
    assert MARKER not in str(info.value)


@pytest.mark.parametrize("status", [201, 204, 301, 302, 404, 405, 418])
def test_other_statuses_are_plain_endpoint_errors(status: int) -> None:
    with pytest.raises(TokenEndpointError) as info:
        wire.parse_token_reply(status, headers(), body(**good()))
    assert type(info.value) is TokenEndpointError
    assert info.value.status == status


def test_error_code_that_is_not_a_short_printable_string_is_ignored() -> None:
    for bogus in (["x"], 7, "", "x" * 65, "bad\ncode"):
        error = wire.error_for_status(503, headers(), body(error=bogus))
        assert error.error is None
        assert isinstance(error, TokenEndpointUnavailableError)


@pytest.mark.parametrize(
    ("value", "expected"), [("120", 120.0), (" 7 ", 7.0), ("0", 0.0), ("999999", 86400.0)]
)
def test_unavailable_carries_retry_after_seconds(value: str, expected: float) -> None:
    error = wire.error_for_status(429, headers(retry_after=value), b"")
    assert isinstance(error, TokenEndpointUnavailableError)
    assert error.retry_after == expected


def test_retry_after_header_lookup_is_case_insensitive() -> None:
    error = wire.error_for_status(503, CaseInsensitiveDict({"RETRY-AFTER": "3"}), b"")
    assert error.retry_after == 3.0


HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
HTTP_DATE_EPOCH = calendar.timegm((2015, 10, 21, 7, 28, 0))


def test_retry_after_http_date_is_seconds_from_now() -> None:
    assert wire.parse_retry_after(HTTP_DATE, now=HTTP_DATE_EPOCH - 90) == 90.0
    assert wire.parse_retry_after("Wed, 21 Oct 2015 10:28:00 +0300", now=HTTP_DATE_EPOCH) == 0.0


def test_retry_after_http_date_in_the_past_or_far_future_is_clamped() -> None:
    assert wire.parse_retry_after(HTTP_DATE, now=HTTP_DATE_EPOCH + 1000) == 0.0
    assert wire.parse_retry_after(HTTP_DATE, now=0) == 86400.0


def test_unavailable_retry_after_from_http_date_header() -> None:
    error = wire.error_for_status(503, headers(retry_after=HTTP_DATE), b"")
    assert error.retry_after == 0.0  # a date long past: retry now, not never


@pytest.mark.parametrize(
    "junk",
    [
        None,
        "",
        "   ",
        "soon",
        "-5",
        "1.5",
        "3 seconds",
        "Wed, 99 Foo 2015",
        "Wed, 21 Oct 2015 07:28:00 -0000",  # no zone: ambiguous, ignored
    ],
)
def test_junk_retry_after_is_none(junk: str | None) -> None:
    assert wire.parse_retry_after(junk) is None
    assert wire.error_for_status(503, headers(retry_after=junk or ""), b"").retry_after is None


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000])
def test_retry_after_that_int_cannot_parse_is_none(value: str) -> None:
    with pytest.raises(TokenEndpointUnavailableError) as info:
        wire.parse_token_reply(503, headers(retry_after=value), b"")
    assert info.value.retry_after is None


def test_oauth_error_field_is_not_quoted_verbatim() -> None:
    with pytest.raises(TokenEndpointError) as info:
        wire.parse_token_reply(400, headers(), body(error=MARKER))
    assert MARKER not in str(info.value)


def test_request_form_and_headers() -> None:
    assert wire.form("id", "sec") == {
        "client_id": "id",
        "client_secret": "sec",
        "grant_type": "client_credentials",
    }
    assert wire.REQUEST_HEADERS["Content-Type"] == "application/x-www-form-urlencoded"
    assert wire.REQUEST_HEADERS["User-Agent"].startswith("k2-shared-token/")


# -- property: nothing but a plausible token or a TokenEndpointError comes out ----------------

token_like = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~+/= \t", min_size=0, max_size=40
) | st.text(max_size=20)
markers = st.text(alphabet=string.ascii_uppercase + string.digits, min_size=16, max_size=32).map(
    lambda s: "MK" + s
)
error_codes = st.sampled_from(
    ["invalid_client", "invalid_request", "unsupported_grant_type", "unauthorized_client"]
) | st.text(alphabet=string.ascii_lowercase + "_", max_size=20)
reply_objects = st.fixed_dictionaries(
    {},
    optional={
        "access_token": token_like | json_values,
        "token_type": st.sampled_from(["Bearer", "bearer", "BEARER", "mac", ""]) | json_values,
        "expires_in": st.integers(-10, 10**9) | st.integers() | st.floats() | json_values,
        "created_at": st.integers(0, 2**40)
        | st.sampled_from(["2024-01-01T00:00:00Z", "yesterday"])
        | json_values,
        "error": error_codes | json_values.filter(lambda v: not isinstance(v, str)),
        "extra": json_values,
    },
)
header_maps = st.dictionaries(
    st.text(max_size=15), st.text(max_size=30), max_size=4
) | st.fixed_dictionaries(
    {},
    optional={
        "Retry-After": st.text(alphabet=string.printable, max_size=30)
        | st.text(max_size=10)
        | st.text(alphabet="0123456789\u00b2\u0663", min_size=1, max_size=5000)
        | st.integers(0, 10**6).map(str)
        | st.just(HTTP_DATE),
        "Content-Type": st.text(alphabet=string.ascii_lowercase + "/;=- +", max_size=60),
    },
)
statuses = st.integers(100, 599) | st.sampled_from([200, 200, 400, 401, 403, 408, 429, 503])


@st.composite
def bodies_with_marker(draw: st.DrawFn) -> tuple[bytes, str]:
    marker = draw(markers)
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=200))
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + marker.encode() + raw[at:], marker
    obj = draw(reply_objects)
    where = draw(st.sampled_from(["note", "error_description", "access_token", "message", "error"]))
    if where == "access_token" and draw(st.booleans()):
        obj["access_token"] = f"{marker} {draw(st.text(max_size=5))}"  # never a valid token
    else:
        obj[where] = marker
    return json.dumps(obj).encode(), marker


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(status=statuses, header_map=header_maps, body_and_marker=bodies_with_marker())
def test_parse_token_reply_returns_plausible_token_or_endpoint_error(
    status: int, header_map: dict[str, str], body_and_marker: tuple[bytes, str]
) -> None:
    raw, marker = body_and_marker
    failure: TokenEndpointError | None = None
    try:
        token, token_type, expires_in = wire.parse_token_reply(
            status, CaseInsensitiveDict(header_map), raw
        )
    except TokenEndpointError as exc:
        failure = exc
    if failure is not None:
        assert marker not in str(failure)
        assert marker not in repr(failure)
        assert failure.status == status
        assert failure.retry_after is None or 0 <= failure.retry_after <= 86400
        return
    assert status == 200
    assert isinstance(token, str)
    assert token
    assert token.strip() == token
    assert " " not in token
    assert token.isprintable()
    assert token_type == "Bearer"
    assert type(expires_in) is int
    assert expires_in >= 0  # 0: a reused token about to die (Doorkeeper), see wire


@settings(max_examples=100, deadline=None, database=None)
@given(status=statuses, obj=reply_objects)
def test_parse_token_reply_on_json_objects_never_leaks_other_exceptions(
    status: int, obj: dict[str, Any]
) -> None:
    raw = json.dumps(obj).encode()
    try:
        result = wire.parse_token_reply(status, CaseInsensitiveDict(), raw)
    except TokenEndpointError:
        return
    assert result[0] == obj["access_token"]
    assert result[2] == obj["expires_in"]


@settings(max_examples=100, deadline=None, database=None)
@given(value=st.text(alphabet=string.printable, max_size=40) | st.none())
def test_parse_retry_after_returns_none_or_bounded_seconds(value: str | None) -> None:
    seconds = wire.parse_retry_after(value)
    assert seconds is None or 0.0 <= seconds <= 86400.0


# -- the retry policy, with tenacity and a patched sleep -------------------------------------


class Flaky:
    """A callable that raises the given errors in turn, then returns ``"token"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "token"


def retrying(sleeps: list[float], *, max_attempts: int = 4, deadline: float = 5) -> Retrying:
    record: Callable[[float], None] = sleeps.append
    return Retrying(sleep=record, **policy(max_attempts=max_attempts, deadline=deadline))


def unavailable(retry_after: float | None = None) -> TokenEndpointUnavailableError:
    return TokenEndpointUnavailableError("503", status=503, retry_after=retry_after)


def test_retry_succeeds_on_third_attempt_after_two_unavailable() -> None:
    sleeps: list[float] = []
    fn = Flaky(unavailable(), unavailable())
    assert retrying(sleeps)(fn) == "token"
    assert fn.calls == 3
    assert len(sleeps) == 2
    assert all(0 < s <= 2.3 for s in sleeps)


def test_invalid_token_response_is_retried() -> None:
    sleeps: list[float] = []
    fn = Flaky(InvalidTokenResponseError("garbage", status=200))
    assert retrying(sleeps)(fn) == "token"
    assert fn.calls == 2


@pytest.mark.parametrize(
    "error",
    [
        InvalidCredentialsError("401", status=401, error="invalid_client"),
        TokenRequestRejectedError("400", status=400, error="invalid_request"),
        TokenEndpointError("404", status=404),
    ],
)
def test_permanent_errors_are_not_retried(error: TokenEndpointError) -> None:
    sleeps: list[float] = []
    fn = Flaky(error, error, error)
    with pytest.raises(type(error)) as info:
        retrying(sleeps)(fn)
    assert info.value is error
    assert fn.calls == 1
    assert sleeps == []


def test_attempts_are_bounded_and_the_last_error_is_reraised() -> None:
    sleeps: list[float] = []
    errors = [unavailable() for _ in range(10)]
    fn = Flaky(*errors)
    with pytest.raises(TokenEndpointUnavailableError) as info:
        retrying(sleeps, max_attempts=4)(fn)
    assert fn.calls == 4
    assert info.value is errors[3]
    assert len(sleeps) == 3


def test_retry_after_beyond_deadline_stops_at_once() -> None:
    sleeps: list[float] = []
    fn = Flaky(unavailable(retry_after=10))
    with pytest.raises(TokenEndpointUnavailableError):
        retrying(sleeps, deadline=5)(fn)
    assert fn.calls == 1
    assert sleeps == []


def test_retry_after_longer_than_backoff_wins() -> None:
    sleeps: list[float] = []
    fn = Flaky(unavailable(retry_after=3))
    assert retrying(sleeps, deadline=5)(fn) == "token"
    assert sleeps == [3.0]


def test_zero_retry_after_keeps_the_exponential_backoff() -> None:
    sleeps: list[float] = []
    fn = Flaky(unavailable(retry_after=0), unavailable(retry_after=0), unavailable(retry_after=0))
    assert retrying(sleeps, deadline=5)(fn) == "token"
    # wait_exponential(multiplier=0.2) + jitter in [0, 0.3]: 0.2.., 0.4.., 0.8..
    for sleep, floor in zip(sleeps, (0.2, 0.4, 0.8), strict=True):
        assert floor <= sleep <= floor + 0.3


def test_expires_in_zero_is_a_reply_not_garbage() -> None:
    """Doorkeeper's reuse_access_token answers a token about to die with ``expires_in: 0``
    (its remaining lifetime, rounded): a reply the flow judges, not a malformed one."""
    reply = body(**good(expires_in=0))
    assert wire.parse_token_reply(200, {}, reply)[2] == 0


def test_invalid_token_reuse_is_retried_and_named() -> None:
    reply = json.dumps({"error": "invalid_token_reuse", "error_description": "x"}).encode()
    error = wire.error_for_status(400, {}, reply)
    assert isinstance(error, TokenEndpointUnavailableError)
    assert error.error == "invalid_token_reuse"
    assert "invalid_token_reuse" in str(error)


def test_an_unknown_oauth_code_is_kept_but_not_echoed_in_the_message() -> None:
    reply = json.dumps({"error": "slow_down_please", "error_description": "echo"}).encode()
    error = wire.error_for_status(400, {}, reply)
    assert error.error == "slow_down_please"
    assert "slow_down_please" not in str(error) and "echo" not in str(error)
    garbage = json.dumps({"error": "Secret-Value With Spaces"}).encode()
    assert wire.error_for_status(400, {}, garbage).error is None
