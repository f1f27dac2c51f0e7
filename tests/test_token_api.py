"""K2's token API beyond the exchange: revoke, introspect, token info.

The parser against the contract's K2 shapes (the SDKs' captured bodies, k2-contract.md section
4) and Doorkeeper's integers; the providers of both sides, the CLI and the k2-connect adapter
against the fake K2 server and a real redis-server.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import k2connect
import pytest
import redis

from k2_shared_token import (
    ConfigurationError,
    Introspection,
    InvalidCredentialsError,
    InvalidTokenError,
    InvalidTokenResponseError,
    SharedTokenProvider,
    TokenEndpointUnavailableError,
    TokenInfo,
    TokenRequestRejectedError,
)
from k2_shared_token._cli.main import main
from k2_shared_token._core.tokens import fingerprint_of
from k2_shared_token._k2 import token_api
from k2_shared_token.contrib.sdk import SharedTokens
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis, free_port
from tests.conftest import CLIENT_ID, CLIENT_SECRET

Make = Callable[..., SharedTokenProvider]

EAT = timezone(timedelta(hours=3))
K2_UID = "_9fXMGROLmSegBhofF6z-qDKHH5L6FsbMn2MgG24Xnk"
# kopokopo/k2-connect-python:tests/data/access_token_introspect.json (contract section 4.2)
K2_INTROSPECT = {
    "active": True,
    "scope": "",
    "client_id": K2_UID,
    "token_type": "Bearer",
    "exp": "2021-04-07T10:31:01+03:00",
    "iat": "2021-04-07T09:31:01+03:00",
}
# kopokopo/k2-connect-python:tests/data/access_token_info.json (contract section 4.3)
K2_TOKEN_INFO = {
    "resource_owner_id": None,
    "scope": [],
    "expires_in": 3586,
    "application": {"uid": K2_UID},
    "created_at": 1617777061,
}
OTHER_ID, OTHER_SECRET = "FAKE-k2-second-application-for-tests-0002", "FAKE-second-secret-0002"
MARKER = "SECRET-MARKER-never-quoted"


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


JSON = {"content-type": "application/json; charset=utf-8"}


# -- the parser: K2's shapes, Doorkeeper's shapes ------------------------------------------


def test_k2_captured_introspection_parses_to_aware_datetimes() -> None:
    result = token_api.parse_introspection(200, JSON, body(K2_INTROSPECT))
    assert (result.active, result.scope, result.client_id, result.token_type) == (
        True,
        "",
        K2_UID,
        "Bearer",
    )
    assert result.iat is not None
    assert result.exp is not None
    assert result.iat.utcoffset() == timedelta(hours=3)  # K2's offset is kept
    assert result.iat.timestamp() == 1617777061  # = token info's created_at (section 4)
    assert result.exp - result.iat == timedelta(seconds=3600)
    assert result.raw == K2_INTROSPECT
    assert "raw" not in repr(result)


@pytest.mark.parametrize(
    ("epoch", "iso"),
    [
        (1617257436, "2021-04-01T09:10:36+03:00"),  # node SDK's tokens.js
        (1617777061, "2021-04-07T09:31:01+03:00"),  # python SDK
        (1617702760, "2021-04-06T12:52:40+03:00"),  # php SDK
    ],
)
def test_iso_and_integer_times_are_the_same_instant(epoch: int, iso: str) -> None:
    k2 = token_api.parse_introspection(200, JSON, body({**K2_INTROSPECT, "iat": iso}))
    doorkeeper = {**K2_INTROSPECT, "iat": epoch, "exp": epoch + 3600}
    stock = token_api.parse_introspection(200, JSON, body(doorkeeper))
    assert k2.iat == stock.iat == datetime.fromtimestamp(epoch, timezone.utc)
    assert stock.iat is not None
    assert stock.iat.tzinfo is not None
    assert stock.exp == datetime.fromtimestamp(epoch + 3600, timezone.utc)


@pytest.mark.parametrize(
    "value",
    ["2021-04-07T06:31:01Z", "2021-04-07T06:31:01.000Z", "2021-04-07T09:31:01.000+03:00",
     "1617777061", 1617777061, 1617777061.0],
)  # fmt: skip
def test_time_forms_rails_and_rfc_7662_use(value: object) -> None:
    when = token_api.parse_time(value)
    assert when is not None
    assert when.timestamp() == 1617777061


def test_inactive_introspection_parses() -> None:
    result = token_api.parse_introspection(200, JSON, b'{"active":false}')
    assert result == Introspection(active=False)
    assert (result.scope, result.client_id, result.exp, result.iat) == (None, None, None, None)


def test_k2_token_info_parses() -> None:
    info = token_api.parse_token_info(200, JSON, body(K2_TOKEN_INFO))
    assert info == TokenInfo(
        expires_in=3586,
        scope=(),
        application_uid=K2_UID,
        created_at=datetime(2021, 4, 7, 6, 31, 1, tzinfo=timezone.utc),
        resource_owner_id=None,
    )
    other = {"created_at": "2021-04-07T09:31:01+03:00", "scope": ["public", "write"]}
    iso = token_api.parse_token_info(200, JSON, body({**K2_TOKEN_INFO, **other, "expires_in": 0}))
    assert iso.created_at == info.created_at
    assert iso.scope == ("public", "write")
    assert iso.expires_in == 0  # Doorkeeper's last second


@pytest.mark.parametrize(
    ("what", "reply"),
    [
        ("no active", {"scope": ""}),
        ("active as a string", {**K2_INTROSPECT, "active": "true"}),
        ("naive exp", {**K2_INTROSPECT, "exp": "2021-04-07T10:31:01"}),
        ("junk exp", {**K2_INTROSPECT, "exp": MARKER}),
        ("bool iat", {**K2_INTROSPECT, "iat": True}),
        ("negative iat", {**K2_INTROSPECT, "iat": -5}),
        ("scope a number", {**K2_INTROSPECT, "scope": 7}),
        ("a list", [MARKER]),
    ],
)
def test_malformed_introspection_is_a_typed_error_that_quotes_nothing(
    what: str, reply: object
) -> None:
    with pytest.raises(InvalidTokenResponseError) as caught:
        token_api.parse_introspection(200, JSON, body(reply))
    assert MARKER not in str(caught.value)


@pytest.mark.parametrize(
    "reply",
    [
        {**K2_TOKEN_INFO, "expires_in": "3586"},
        {**K2_TOKEN_INFO, "expires_in": -1},
        {**K2_TOKEN_INFO, "scope": [MARKER, 1]},
        {**K2_TOKEN_INFO, "application": MARKER},
        {**K2_TOKEN_INFO, "created_at": MARKER},
        {**K2_TOKEN_INFO, "resource_owner_id": [MARKER]},
    ],
)
def test_malformed_token_info_is_a_typed_error(reply: object) -> None:
    with pytest.raises(InvalidTokenResponseError) as caught:
        token_api.parse_token_info(200, JSON, body(reply))
    assert MARKER not in str(caught.value)


def test_replies_that_are_not_json_or_too_big() -> None:
    with pytest.raises(InvalidTokenResponseError, match="not JSON"):
        token_api.parse_introspection(200, {}, b"<html>" + MARKER.encode())
    with pytest.raises(InvalidTokenResponseError, match="over"):
        token_api.parse_token_info(200, JSON, b" " * (token_api.MAX_BODY + 1))
    with pytest.raises(InvalidTokenResponseError):
        token_api.parse_revoke_reply(200, {}, b"<html>proxy</html>")


def test_revoke_success_and_error_replies() -> None:
    assert token_api.parse_revoke_reply(200, JSON, b"{}") is None
    assert token_api.parse_revoke_reply(200, {}, b"") is None
    description = "You are not authorized to revoke this token"
    forbidden = body({"error": "unauthorized_client", "error_description": description})
    with pytest.raises(TokenRequestRejectedError) as caught:
        token_api.parse_revoke_reply(403, JSON, forbidden)
    assert (caught.value.status, caught.value.error) == (403, "unauthorized_client")
    assert "revoke endpoint answered HTTP 403" in str(caught.value)
    with pytest.raises(TokenEndpointUnavailableError) as unavailable:
        token_api.parse_revoke_reply(503, {"retry-after": "7"}, b"")
    assert unavailable.value.retry_after == 7


def test_error_replies_of_introspect_and_token_info() -> None:
    bad_client = body({"error": "invalid_client", "error_description": MARKER})
    with pytest.raises(InvalidCredentialsError) as caught:
        token_api.parse_introspection(401, JSON, bad_client)
    assert MARKER not in str(caught.value)
    dead = body({"error": "invalid_token", "error_description": "The access token was revoked"})
    with pytest.raises(InvalidTokenError) as info:
        token_api.parse_token_info(401, JSON, dead)
    assert (info.value.status, info.value.error) == (401, "invalid_token")
    with pytest.raises(InvalidTokenError) as bare:
        token_api.parse_token_info(401, {}, b"")  # a bare 401 from token info: the token
    assert bare.value.error is None
    with pytest.raises(InvalidTokenError) as odd:  # a code we do not know: kept, not shown
        token_api.parse_token_info(401, {}, body({"error": "some_other_code"}))
    assert odd.value.error == "some_other_code"
    assert "some_other_code" not in str(odd.value)


def test_requests_carry_credentials_and_token_but_never_show_them() -> None:
    token = "tok-" + MARKER
    revoke = token_api.revoke_request("https://k2.example", CLIENT_ID, CLIENT_SECRET, token)
    assert (revoke.method, revoke.url) == ("POST", "https://k2.example/oauth/revoke")
    assert revoke.data == {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token": token}
    assert revoke.headers["Content-Type"] == "application/x-www-form-urlencoded"
    introspect = token_api.introspect_request("https://k2.example", CLIENT_ID, CLIENT_SECRET, token)
    assert introspect.url == "https://k2.example/oauth/introspect"
    info = token_api.token_info_request("https://k2.example", token)
    assert (info.method, info.data) == ("GET", None)
    assert info.url == "https://k2.example/oauth/token/info"
    assert info.headers["Authorization"] == f"Bearer {token}"
    for request in (revoke, introspect, info):
        assert MARKER not in repr(request)
        assert CLIENT_SECRET not in repr(request)


@pytest.mark.parametrize("token", ["", "two words", "x\r\nX-Injected: 1", "caf\u00e9"])
def test_unsendable_tokens_are_refused_before_sending(token: str) -> None:
    with pytest.raises(ConfigurationError):
        token_api.token_info_request("https://k2.example", token)


# -- the providers, both sides, against the fake K2 and a real Redis -----------------------


def test_revoke_drops_the_token_fleet_wide_and_the_next_get_exchanges_once(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    worker = make_provider()
    token = worker.get_token()
    other_process = make_provider(local_cache=False)  # reads Redis on every call
    assert other_process.get_token() == token
    assert fake_k2.exchanges == 1

    assert worker.revoke() is True  # it was the shared token
    assert not fake_k2.is_valid(token)  # revoked at K2
    assert not redis_client.exists(worker.keys.token)  # and gone from Redis

    new = worker.get_token()
    assert new != token
    assert fake_k2.exchanges == 2
    assert other_process.get_token() == new  # the fleet reads the new one
    assert make_provider().get_token() == new  # so does a fresh process
    assert fake_k2.exchanges == 2  # one exchange fleet-wide


def test_revoke_of_a_token_that_is_not_shared(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = make_provider()
    shared = provider.get_token()
    provider.invalidate(shared)
    first_new = provider.get_token()  # a second token; the first still valid at K2
    assert fake_k2.is_valid(shared)
    assert provider.revoke(shared) is False  # revoked at K2, but not the shared one
    assert not fake_k2.is_valid(shared)
    assert provider.get_token() == first_new
    assert redis_client.exists(provider.keys.token)
    assert provider.revoke("never-issued-token") is False  # K2 answers 200 {} for unknown


def test_revoking_another_clients_token_is_refused(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    fake_k2.add_client(OTHER_ID, OTHER_SECRET)
    theirs = make_provider(client_id=OTHER_ID, client_secret=OTHER_SECRET).get_token()
    ours = make_provider()
    token = ours.get_token()
    with pytest.raises(TokenRequestRejectedError) as caught:
        ours.revoke(theirs)
    assert (caught.value.status, caught.value.error) == (403, "unauthorized_client")
    assert theirs not in str(caught.value)
    assert fake_k2.is_valid(theirs)
    assert ours.get_token() == token  # nothing of ours was dropped
    assert redis_client.exists(ours.keys.token)


def test_revoke_with_a_wrong_secret_is_refused_and_the_secret_shown_nowhere(
    make_provider: Make, fake_k2: FakeK2Server, all_logs: pytest.LogCaptureFixture
) -> None:
    token = make_provider().get_token()
    wrong = make_provider(client_secret=MARKER)
    with pytest.raises(TokenRequestRejectedError) as caught:
        wrong.revoke(token)
    assert fake_k2.is_valid(token)
    for text in (str(caught.value), repr(caught.value), all_logs.text):
        assert MARKER not in text
        assert token not in text


def test_introspect_active_then_inactive(make_provider: Make, fake_k2: FakeK2Server) -> None:
    provider = make_provider()
    result = provider.introspect()
    assert (result.active, result.client_id, result.token_type) == (True, CLIENT_ID, "Bearer")
    assert result.exp is not None
    assert result.iat is not None
    assert result.exp.utcoffset() == timedelta(hours=3)  # the fake speaks K2's ISO strings
    assert result.exp - result.iat == timedelta(seconds=3600)
    assert abs(result.iat.timestamp() - time.time()) < 5
    token = provider.get_token()
    assert provider.introspect(token) == result
    provider.revoke()
    assert provider.introspect(token) == Introspection(active=False)
    assert provider.introspect("never-issued").active is False
    assert fake_k2.exchanges == 1  # introspecting the revoked token asked for no new one


def test_introspect_with_doorkeepers_integer_times(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    fake_k2.introspection_times = "int"
    result = make_provider().introspect()
    assert result.active
    assert result.exp is not None
    assert result.iat is not None
    assert result.exp.tzinfo == timezone.utc
    assert result.exp - result.iat == timedelta(seconds=3600)
    assert isinstance(result.raw["exp"], int)


def test_introspect_with_bad_credentials(make_provider: Make, fake_k2: FakeK2Server) -> None:
    token = make_provider().get_token()
    with pytest.raises(InvalidCredentialsError):
        make_provider(client_secret=MARKER).introspect(token)


def test_token_info(make_provider: Make, fake_k2: FakeK2Server) -> None:
    provider = make_provider()
    info = provider.token_info()
    assert info.expires_in is not None
    assert 3590 <= info.expires_in <= 3600
    assert (info.scope, info.application_uid, info.resource_owner_id) == ((), CLIENT_ID, None)
    assert info.created_at is not None
    assert info.created_at.tzinfo is not None
    assert abs(info.created_at.timestamp() - time.time()) < 5
    assert fake_k2.exchanges == 1


def test_token_info_recovers_once_from_a_token_k2_revoked(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    provider = make_provider()
    old = provider.get_token()
    fake_k2.revoke_token(old)  # revoked behind our back (another deployment, an operator)
    info = provider.token_info()  # 401: invalidated, one new exchange, asked again
    assert info.application_uid == CLIENT_ID
    assert provider.get_token() != old
    assert fake_k2.exchanges == 2
    with pytest.raises(InvalidTokenError):
        provider.token_info(old)  # an explicit token is not replaced


def test_token_api_uses_the_read_timeout_and_fails_typed(make_provider: Make) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # connections complete in the kernel; nothing ever answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        provider = make_provider(base_url=url, read_timeout=0.3, connect_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TokenEndpointUnavailableError, match="introspect request"):
            provider.introspect("some-token")
        assert time.monotonic() - started < 3
    finally:
        listener.close()
    refused = make_provider(base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TokenEndpointUnavailableError, match="revoke request"):
        refused.revoke("some-token")


def test_closed_provider_and_bad_tokens(make_provider: Make) -> None:
    provider = make_provider()
    with pytest.raises(ConfigurationError):
        provider.revoke("")
    provider.close()
    with pytest.raises(ConfigurationError, match="closed"):
        provider.introspect("some-token")


def test_no_secret_or_token_in_logs(
    make_provider: Make, fake_k2: FakeK2Server, all_logs: pytest.LogCaptureFixture
) -> None:
    provider = make_provider()
    token = provider.get_token()
    provider.introspect()
    provider.token_info()
    provider.revoke()
    with pytest.raises(InvalidTokenError):
        provider.token_info(token)
    assert f"token {fingerprint_of(token)} revoked at K2" in all_logs.text
    assert CLIENT_SECRET not in all_logs.text
    assert token not in all_logs.text


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def cli(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    flags = ["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET,
             "--base-url", fake_k2.base_url, "--redis-url", redis_server.url]  # fmt: skip

    def run(*argv: str, secret: str | None = None) -> tuple[int, str, str]:
        given = [*flags[:3], secret, *flags[4:]] if secret is not None else flags
        code = main([*argv, *given])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.sync_only("k2-token runs the blocking provider")
def test_cli_info_and_introspect(
    cli: Callable[..., tuple[int, str, str]], make_provider: Make, fake_k2: FakeK2Server
) -> None:
    token = make_provider().get_token()
    code, out, _ = cli("info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["token"] == fingerprint_of(token)
    assert info["application_uid"] == CLIENT_ID
    assert 3590 <= info["expires_in"] <= 3600
    assert datetime.fromisoformat(info["created_at"]).tzinfo is not None
    code, table, _ = cli("info")
    assert code == 0
    assert fingerprint_of(token) in table
    assert "expires in" in table

    code, out, _ = cli("introspect", "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["token"], result["active"], result["client_id"]) == (
        fingerprint_of(token), True, CLIENT_ID
    )  # fmt: skip
    exp, iat = datetime.fromisoformat(result["exp"]), datetime.fromisoformat(result["iat"])
    assert exp - iat == timedelta(seconds=3600)
    code, table, _ = cli("introspect")
    assert code == 0
    assert "active      yes" in table
    for text in (out, table):
        assert token not in text
    assert fake_k2.exchanges == 1


@pytest.mark.sync_only("k2-token runs the blocking provider")
def test_cli_revoke_then_introspect_the_revoked_token(
    cli: Callable[..., tuple[int, str, str]],
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
) -> None:
    provider = make_provider()
    token = provider.get_token()
    code, out, _ = cli("revoke", "--json")
    assert code == 0
    assert json.loads(out) == {
        "revoked": True, "token": fingerprint_of(token), "shared_token_dropped": True
    }  # fmt: skip
    assert not fake_k2.is_valid(token)
    assert not redis_client.exists(provider.keys.token)
    code, out, _ = cli("introspect", "--json", f"--token={token}")
    assert code == 0
    assert json.loads(out)["active"] is False
    code, out, _ = cli("introspect", f"--token={token}")
    assert "active  no" in out
    code, out, _ = cli("revoke", f"--token={token}")  # already revoked: K2 says 200 {}
    assert code == 0
    assert out.strip() == f"revoked {fingerprint_of(token)} (it was not the shared token)"
    assert token not in out


@pytest.mark.sync_only("k2-token runs the blocking provider")
def test_cli_exit_codes(
    cli: Callable[..., tuple[int, str, str]], make_provider: Make, fake_k2: FakeK2Server
) -> None:
    token = make_provider().get_token()
    code, _, refused = cli("revoke", f"--token={token}", secret=MARKER)
    assert code == 1  # 403 unauthorized_client: K2 refused
    assert "TokenRequestRejectedError" in refused
    code, _, rejected = cli("introspect", f"--token={token}", secret=MARKER)
    assert code == 4  # 401 invalid_client: credentials rejected
    assert "InvalidCredentialsError" in rejected
    code, _, empty = cli("revoke", "--token=")
    assert code == 2
    for text in (refused, rejected, empty):
        assert MARKER not in text
        assert token not in text
    assert fake_k2.is_valid(token)
    unreachable = ["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET,
                   "--base-url", fake_k2.base_url,
                   "--redis-url", f"redis://127.0.0.1:{free_port()}/0"]  # fmt: skip
    assert main(["info", *unreachable]) == 3


# -- the k2-connect SDK adapter ------------------------------------------------------------


def test_sdk_methods_match_the_sdk(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    k2connect.initialize(CLIENT_ID, CLIENT_SECRET, fake_k2.base_url + "/")
    sdk: Any = k2connect.Tokens
    provider = make_provider()
    shared = SharedTokens(provider)
    token = shared.get_access_token(shared.request_access_token())

    ours, theirs = shared.introspect_access_token(token), sdk.introspect_access_token(token)
    assert ours == theirs  # the same dict, K2's ISO strings included
    assert ours["active"] is True
    ours, theirs = shared.request_token_info(token), sdk.request_token_info(token)
    assert set(ours) == set(theirs) == set(K2_TOKEN_INFO)
    assert ours["application"] == theirs["application"] == {"uid": CLIENT_ID}
    ours["application"]["uid"] = "changed"  # a copy: nothing cached is mutated
    assert shared.request_token_info(token)["application"] == {"uid": CLIENT_ID}

    assert sdk.revoke_access_token("never-issued") == {}  # the SDK's own return shape
    assert shared.revoke_access_token(token) == {}
    assert not fake_k2.is_valid(token)
    assert not redis_client.exists(provider.keys.token)
    assert shared.introspect_access_token(token) == {"active": False}
    assert shared.get_access_token(shared.request_access_token()) != token
    assert fake_k2.exchanges == 2
