"""The fake K2 server, tested over real HTTP on loopback.

Other tests trust this server to behave like Doorkeeper-backed K2, so its wire details are
pinned here: check order, exact error bodies and headers, token modes, faults and the gate.
"""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from k2_shared_token.testing import fake_k2 as fake_server
from k2_shared_token.testing.fake_k2 import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    FakeK2Server,
    Fault,
)

ID = DEFAULT_CLIENT_ID
SECRET = DEFAULT_CLIENT_SECRET
GOOD = {"grant_type": "client_credentials", "client_id": ID, "client_secret": SECRET}
TIMEOUT = 5.0
INVALID_CLIENT_DESC = (
    "Client authentication failed due to unknown client, no client authentication included, "
    "or unsupported authentication method."
)
ISO_EAT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+03:00$")


@pytest.fixture
def server() -> Iterator[FakeK2Server]:
    with FakeK2Server() as srv:
        yield srv


@pytest.fixture
def make_server() -> Iterator[Callable[..., FakeK2Server]]:
    made: list[FakeK2Server] = []

    def make(**kwargs: Any) -> FakeK2Server:
        srv = FakeK2Server(**kwargs).start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


class OffsetClock:
    """A monotonic clock that :meth:`advance` moves forward: the server's tokens lapse on it
    without the test sleeping out their lifetime."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def post_token(srv: FakeK2Server, data: Any = None, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", TIMEOUT)
    body = GOOD if data is None and "json" not in kwargs else data
    return requests.post(f"{srv.base_url}/oauth/token", data=body, **kwargs)


def new_token(srv: FakeK2Server, client_id: str = ID, secret: str = SECRET) -> str:
    data = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    reply = post_token(srv, data)
    assert reply.status_code == 200, reply.text
    token = reply.json()["access_token"]
    assert isinstance(token, str)
    return token


def ping(srv: FakeK2Server, token: str | None, method: str = "GET") -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.request(method, f"{srv.base_url}/api/v1/ping", headers=headers, timeout=TIMEOUT)


def token_info(srv: FakeK2Server, token: str) -> requests.Response:
    return requests.get(
        f"{srv.base_url}/oauth/token/info",
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )


def introspect(srv: FakeK2Server, token: str, secret: str = SECRET) -> requests.Response:
    body = {"client_id": ID, "client_secret": secret, "token": token}
    return requests.post(f"{srv.base_url}/oauth/introspect", json=body, timeout=TIMEOUT)


def assert_oauth_error(reply: requests.Response, status: int, error: str, desc: str) -> None:
    assert reply.status_code == status
    assert reply.json() == {"error": error, "error_description": desc}
    assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
    assert reply.headers["Cache-Control"] == "no-store, no-cache"
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="Doorkeeper"')
    assert f'error="{error}"' in challenge


# --------------------------------------------------------------------- token endpoint


def test_success_with_form_body_and_integer_created_at(server: FakeK2Server) -> None:
    before = int(time.time())
    reply = post_token(server)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
    assert reply.headers["Cache-Control"] == "no-store, no-cache"
    assert reply.headers["Pragma"] == "no-cache"
    body = reply.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "created_at"}
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", body["access_token"])
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert isinstance(body["created_at"], int)
    assert before <= body["created_at"] <= int(time.time())
    assert server.is_valid(body["access_token"])
    assert server.exchanges == 1
    [record] = server.issued
    assert record.token == body["access_token"]
    assert (record.expires_in, record.reused) == (3600, False)
    assert body["access_token"] not in repr(record)


def test_success_with_json_body_and_iso_created_at(
    make_server: Callable[..., FakeK2Server],
) -> None:
    srv = make_server(created_at="iso", expires_in=120)
    reply = post_token(srv, json=GOOD)
    assert reply.status_code == 200
    body = reply.json()
    assert body["expires_in"] == 120
    assert ISO_EAT.match(body["created_at"])
    created = datetime.fromisoformat(body["created_at"])
    assert created.utcoffset() == timedelta(hours=3)
    assert abs(created.timestamp() - time.time()) < 5


def test_http_basic_client_auth_is_accepted_and_takes_precedence(server: FakeK2Server) -> None:
    grant = {"grant_type": "client_credentials"}
    assert post_token(server, grant, auth=(ID, SECRET)).status_code == 200
    # Doorkeeper reads Basic credentials first, so wrong ones fail even with good params.
    reply = post_token(server, GOOD, auth=(ID, "wrong"))
    assert_oauth_error(reply, 401, "invalid_client", INVALID_CLIENT_DESC)


@pytest.mark.parametrize(
    ("data", "error", "desc"),
    [
        (
            {"client_id": "nobody", "client_secret": "bad"},
            "invalid_request",
            "Missing required parameter: grant_type.",
        ),
        (
            {"grant_type": " ", "client_id": "nobody"},
            "invalid_request",
            "Missing required parameter: grant_type.",
        ),
        (
            {"grant_type": "password", "client_id": "nobody", "client_secret": "bad"},
            "unsupported_grant_type",
            "The authorization grant type is not supported by the authorization server.",
        ),
    ],
)
def test_grant_type_is_checked_before_the_client(
    server: FakeK2Server, data: dict[str, str], error: str, desc: str
) -> None:
    assert_oauth_error(post_token(server, data), 400, error, desc)
    assert server.exchanges == 0


@pytest.mark.parametrize(
    "data",
    [
        {"grant_type": "client_credentials", "client_id": ID, "client_secret": "wrong"},
        {"grant_type": "client_credentials", "client_id": "unknown", "client_secret": SECRET},
        {"grant_type": "client_credentials", "client_id": ID},
        {"grant_type": "client_credentials"},
    ],
)
def test_bad_client_gets_invalid_client(server: FakeK2Server, data: dict[str, str]) -> None:
    assert_oauth_error(post_token(server, data), 401, "invalid_client", INVALID_CLIENT_DESC)
    assert (server.token_requests, server.exchanges) == (1, 0)


def test_legacy_mode_answers_every_oauth_error_with_401(
    make_server: Callable[..., FakeK2Server],
) -> None:
    srv = make_server(legacy_errors=True)
    missing = post_token(srv, {"client_id": ID, "client_secret": SECRET})
    assert_oauth_error(missing, 401, "invalid_request", "Missing required parameter: grant_type.")
    unsupported = post_token(srv, {**GOOD, "grant_type": "password"})
    assert unsupported.status_code == 401
    assert unsupported.json()["error"] == "unsupported_grant_type"
    assert post_token(srv, {**GOOD, "client_secret": "x"}).status_code == 401
    assert post_token(srv).status_code == 200
    srv.legacy_errors = False
    assert post_token(srv, {"client_id": ID}).status_code == 400


def test_malformed_json_body_is_a_400(server: FakeK2Server) -> None:
    reply = requests.post(
        f"{server.base_url}/oauth/token",
        data=b'{"grant_type": ',
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_request"
    assert server.token_requests == 1


def test_keep_alive_framing_survives_errors_and_404s(server: FakeK2Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        requests_to_send = [
            ("POST", "/oauth/token", urlencode({"client_id": ID}), 400),
            ("POST", "/oauth/token", urlencode(GOOD), 200),
            ("GET", "/no/such/route", "", 404),
            ("POST", "/oauth/token", urlencode(GOOD), 200),
        ]
        first_socket = None
        for method, path, body, status in requests_to_send:
            conn.request(method, path, body=body, headers=form)
            reply = conn.getresponse()
            data = reply.read()
            assert reply.status == status
            assert reply.getheader("Content-Length") == str(len(data))
            assert not reply.will_close
            first_socket = first_socket or conn.sock
            assert conn.sock is first_socket
    finally:
        conn.close()


# --------------------------------------------------------------------- token modes


def test_new_mode_issues_fresh_tokens_and_keeps_old_ones_valid(server: FakeK2Server) -> None:
    first, second = new_token(server), new_token(server)
    assert first != second
    assert ping(server, first).status_code == 200
    assert ping(server, second).status_code == 200


def test_reuse_mode_repeats_the_live_token_then_issues_after_expiry(
    make_server: Callable[..., FakeK2Server],
) -> None:
    other_id, other_secret = "second-client", "second-secret"
    clients = {ID: SECRET, other_id: other_secret}
    clock = OffsetClock()
    srv = make_server(token_mode="reuse", expires_in=2, clients=clients, clock=clock)
    first = post_token(srv).json()
    again = post_token(srv).json()
    assert again["access_token"] == first["access_token"]
    assert first["expires_in"] == 2
    assert again["expires_in"] == 2  # the remaining lifetime, rounded as Doorkeeper does
    assert again["created_at"] == first["created_at"]
    assert new_token(srv, other_id, other_secret) != first["access_token"]
    assert [r.reused for r in srv.issued] == [False, True, False]

    # Move the server's clock past the token's end.
    record = srv.issued[0]
    assert srv.is_valid(first["access_token"])
    clock.advance(record.issued_at + record.expires_in - clock() + 0.001)
    assert not srv.is_valid(first["access_token"])
    third = post_token(srv).json()
    assert third["access_token"] != first["access_token"]
    assert third["expires_in"] == 2
    assert srv.issued[-1].reused is False
    assert srv.exchanges == 4


def test_revoke_previous_mode_kills_the_clients_older_tokens(
    make_server: Callable[..., FakeK2Server],
) -> None:
    other_id, other_secret = "second-client", "second-secret"
    srv = make_server(token_mode="revoke_previous", clients={ID: SECRET, other_id: other_secret})
    old = new_token(srv)
    others = new_token(srv, other_id, other_secret)
    current = new_token(srv)
    stale = ping(srv, old)
    assert stale.status_code == 401
    assert stale.json() == {"error_code": 401, "error_message": "InvalidAccessToken"}
    assert ping(srv, current).status_code == 200
    assert ping(srv, others).status_code == 200
    assert token_info(srv, old).json()["error_description"] == "The access token was revoked"


def test_zero_lifetime_tokens_are_born_expired(make_server: Callable[..., FakeK2Server]) -> None:
    srv = make_server(expires_in=0)
    reply = post_token(srv).json()
    token = reply["access_token"]
    assert reply["expires_in"] == 0
    assert not srv.is_valid(token)
    expired = ping(srv, token)
    assert expired.status_code == 401
    assert expired.json() == {"error_code": 401, "error_message": "ExpiredAccessToken"}
    info = token_info(srv, token)
    assert info.status_code == 401
    assert info.json()["error_description"] == "The access token expired"
    assert introspect(srv, token).json() == {"active": False}


# --------------------------------------------------------------------- other endpoints


def test_revoke_endpoint(make_server: Callable[..., FakeK2Server]) -> None:
    srv = make_server(clients={ID: SECRET, "other": "other-secret"})
    url = f"{srv.base_url}/oauth/revoke"
    token = new_token(srv)
    forbidden = {
        "error": "unauthorized_client",
        "error_description": "You are not authorized to revoke this token",
    }

    bad_client = requests.post(
        url, data={"client_id": ID, "client_secret": "x", "token": token}, timeout=TIMEOUT
    )
    assert (bad_client.status_code, bad_client.json()) == (403, forbidden)
    someone_else = requests.post(
        url,
        data={"client_id": "other", "client_secret": "other-secret", "token": token},
        timeout=TIMEOUT,
    )
    assert (someone_else.status_code, someone_else.json()) == (403, forbidden)
    assert srv.is_valid(token)

    ok = requests.post(
        url, data={"client_id": ID, "client_secret": SECRET, "token": token}, timeout=TIMEOUT
    )
    assert (ok.status_code, ok.json()) == (200, {})
    assert not srv.is_valid(token)
    assert ping(srv, token).status_code == 401
    for repeat in (token, "never-issued"):
        again = requests.post(
            url, json={"client_id": ID, "client_secret": SECRET, "token": repeat}, timeout=TIMEOUT
        )
        assert (again.status_code, again.json()) == (200, {})


def test_introspect(make_server: Callable[..., FakeK2Server]) -> None:
    srv = make_server(clients={ID: SECRET, "other": "other-secret"})
    token = new_token(srv)
    body = introspect(srv, token).json()
    assert set(body) == {"active", "scope", "client_id", "token_type", "exp", "iat"}
    assert (body["active"], body["scope"], body["client_id"], body["token_type"]) == (
        True,
        "",
        ID,
        "Bearer",
    )
    assert ISO_EAT.match(body["iat"])
    assert ISO_EAT.match(body["exp"])
    iat, exp = datetime.fromisoformat(body["iat"]), datetime.fromisoformat(body["exp"])
    assert exp - iat == timedelta(seconds=3600)
    assert abs(iat.timestamp() - time.time()) < 5

    assert introspect(srv, "never-issued").json() == {"active": False}
    bad_client = introspect(srv, token, secret="x")
    assert_oauth_error(bad_client, 401, "invalid_client", INVALID_CLIENT_DESC)
    theirs = new_token(srv, "other", "other-secret")
    assert introspect(srv, theirs).json() == {"active": False}
    srv.revoke_token(token)
    reply = introspect(srv, token)
    assert (reply.status_code, reply.json()) == (200, {"active": False})


def test_token_info(server: FakeK2Server) -> None:
    token = new_token(server)
    reply = token_info(server, token)
    assert reply.status_code == 200
    body = reply.json()
    assert body["resource_owner_id"] is None
    assert body["scope"] == []
    assert body["application"] == {"uid": ID}
    assert 3590 <= body["expires_in"] <= 3600
    assert isinstance(body["created_at"], int)
    assert abs(body["created_at"] - time.time()) < 5

    unknown = token_info(server, "never-issued")
    assert_oauth_error(unknown, 401, "invalid_token", "The access token is invalid")
    assert server.revoke_token(token)
    revoked = token_info(server, token)
    assert_oauth_error(revoked, 401, "invalid_token", "The access token was revoked")


def test_introspection_times_as_doorkeeper_integers(
    make_server: Callable[..., FakeK2Server],
) -> None:
    srv = make_server(introspection_times="int", expires_in=120)
    token = new_token(srv)
    body = introspect(srv, token).json()
    assert isinstance(body["exp"], int)
    assert isinstance(body["iat"], int)
    assert body["exp"] - body["iat"] == 120
    assert abs(body["iat"] - time.time()) < 5
    srv.introspection_times = "iso"
    assert ISO_EAT.match(introspect(srv, token).json()["exp"])
    with pytest.raises(ValueError, match="introspection_times"):
        srv.introspection_times = "rfc822"


def test_token_info_rounds_like_doorkeeper_and_reads_every_token_place(
    make_server: Callable[..., FakeK2Server],
) -> None:
    clock = OffsetClock()
    srv = make_server(expires_in=2, clock=clock)
    token = new_token(srv)
    assert token_info(srv, token).json()["expires_in"] in (1, 2)
    # Under 0.4 s left (on the server's clock): Doorkeeper rounds to 0 while the token works.
    clock.advance(srv.issued[-1].issued_at + 1.6 - clock())
    assert srv.is_valid(token)
    assert token_info(srv, token).json()["expires_in"] == 0
    srv.expires_in = 60
    token = new_token(srv)
    url = f"{srv.base_url}/oauth/token/info"
    for param in ("access_token", "bearer_token"):
        reply = requests.get(url, params={param: token}, timeout=TIMEOUT)
        assert reply.status_code == 200
        assert reply.json()["application"] == {"uid": ID}


def test_add_client_registers_a_second_application(server: FakeK2Server) -> None:
    server.add_client("second-client", "second-secret")
    theirs = new_token(server, "second-client", "second-secret")
    assert introspect(server, theirs).json() == {"active": False}  # not ours to see


def test_protected_api_and_its_counters(server: FakeK2Server) -> None:
    token = new_token(server)
    ok = ping(server, token)
    assert (ok.status_code, ok.json()) == (200, {"ok": True, "path": "/api/v1/ping"})
    posted = requests.post(
        f"{server.base_url}/api/v2/payments?x=1",
        headers={"Authorization": f"Bearer {token}"},
        json={"amount": 1},
        timeout=TIMEOUT,
    )
    assert posted.json() == {"ok": True, "path": "/api/v2/payments"}
    for bad in (None, "never-issued"):
        reply = ping(server, bad)
        assert reply.status_code == 401
        assert reply.json() == {"error_code": 401, "error_message": "InvalidAccessToken"}
    assert (server.api_requests, server.api_unauthorized) == (4, 2)


def test_unknown_routes_are_json_404s(server: FakeK2Server) -> None:
    for method, path in (("GET", "/nope"), ("GET", "/oauth/token"), ("DELETE", "/api/v1/x")):
        reply = requests.request(method, server.base_url + path, timeout=TIMEOUT)
        assert reply.status_code == 404
        assert reply.json()["error"] == "not_found"


# --------------------------------------------------------------------- faults


def test_status_faults_with_retry_after(server: FakeK2Server) -> None:
    http_date = "Wed, 21 Oct 2015 07:28:00 GMT"
    server.inject(
        Fault.status(429, retry_after=7),
        Fault.status(503),
        Fault.status(429, retry_after=http_date),
        Fault.status(502, body=b"<html>Bad Gateway</html>", headers={"Content-Type": "text/html"}),
    )
    limited = post_token(server)
    assert limited.status_code == 429
    assert limited.json() == {"error": "rate_limited"}
    assert limited.headers["Retry-After"] == "7"
    unavailable = post_token(server)
    assert unavailable.status_code == 503
    assert unavailable.json()["error"] == "server_error"
    assert "Retry-After" not in unavailable.headers
    assert post_token(server).headers["Retry-After"] == http_date
    gateway = post_token(server)
    assert gateway.status_code == 502
    assert gateway.headers["Content-Type"] == "text/html"
    assert gateway.content == b"<html>Bad Gateway</html>"
    assert post_token(server).status_code == 200
    assert (server.token_requests, server.exchanges, server.pending_faults) == (5, 1, 0)


def test_garbage_faults(server: FakeK2Server) -> None:
    page = b"<html><body>502 Bad Gateway</body></html>"
    server.inject(
        Fault.garbage(page),
        Fault.garbage(b'{"access_token": "abc', content_type="application/json"),
        Fault.garbage(b'{"access_token": 12, "expires_in": "soon"}', status=200),
    )
    html = post_token(server)
    assert (html.status_code, html.content) == (200, page)
    assert html.headers["Content-Type"] == "text/html"
    with pytest.raises(requests.JSONDecodeError):
        post_token(server).json()
    assert post_token(server).json() == {"access_token": 12, "expires_in": "soon"}
    assert post_token(server).json()["token_type"] == "Bearer"
    assert server.exchanges == 1


def test_slow_fault_times_the_client_out_and_stop_is_prompt(server: FakeK2Server) -> None:
    server.inject(Fault.slow(30))
    with pytest.raises(requests.ReadTimeout):
        post_token(server, timeout=(TIMEOUT, 0.15))
    assert post_token(server).status_code == 200  # the fault was used up
    assert (server.token_requests, server.exchanges) == (2, 1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    server.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        post_token(server)


def test_disconnect_fault_closes_without_a_reply(server: FakeK2Server) -> None:
    server.inject(Fault.disconnect())
    with pytest.raises(requests.ConnectionError):
        post_token(server)
    assert post_token(server).status_code == 200


def test_faults_are_consumed_in_fifo_order(server: FakeK2Server) -> None:
    server.inject(
        Fault.status(500),
        Fault.disconnect(),
        Fault.garbage(b"oops", content_type="text/plain"),
        Fault.status(429, retry_after="junk"),
    )
    assert server.pending_faults == 4
    assert post_token(server).status_code == 500
    with pytest.raises(requests.ConnectionError):
        post_token(server)
    assert post_token(server).content == b"oops"
    assert post_token(server).headers["Retry-After"] == "junk"
    assert post_token(server).status_code == 200
    assert server.pending_faults == 0


def test_latency_delays_token_replies(server: FakeK2Server) -> None:
    server.latency = 0.1
    started = time.monotonic()
    assert post_token(server).status_code == 200
    assert time.monotonic() - started >= 0.1


def test_fault_and_setting_validation() -> None:
    with pytest.raises(ValueError, match="status code"):
        Fault.status(99)
    with pytest.raises(ValueError, match="seconds"):
        Fault.slow(-1)
    with pytest.raises(ValueError, match="binds only"):
        FakeK2Server(host="0.0.0.0")
    with pytest.raises(ValueError, match="token_mode"):
        FakeK2Server(token_mode="sometimes")
    with pytest.raises(ValueError, match="created_at"):
        FakeK2Server(created_at="rfc822")
    srv = FakeK2Server()
    with pytest.raises(ValueError, match="expires_in"):
        srv.expires_in = -1
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.base_url


# --------------------------------------------------------------------- gate and counters


def test_pause_holds_requests_until_resumed(server: FakeK2Server) -> None:
    replies: list[requests.Response] = []
    done = threading.Event()

    def fetch() -> None:
        replies.append(post_token(server))
        done.set()

    server.pause_tokens()
    worker = threading.Thread(target=fetch)
    worker.start()
    try:
        assert server.wait_for_token_requests(1, timeout=TIMEOUT)
        assert not server.wait_for_token_requests(2, timeout=0.01)
        assert not done.wait(0.1)  # held at the gate, not merely slow
        assert server.exchanges == 0
    finally:
        server.resume_tokens()
    assert done.wait(TIMEOUT)
    worker.join(TIMEOUT)
    assert replies[0].status_code == 200
    assert server.exchanges == 1


def test_stop_releases_a_held_request(server: FakeK2Server) -> None:
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            post_token(server)
        except requests.RequestException as exc:
            outcome.append(exc)

    server.pause_tokens()
    worker = threading.Thread(target=fetch)
    worker.start()
    assert server.wait_for_token_requests(1, timeout=TIMEOUT)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    worker.join(TIMEOUT)
    assert len(outcome) == 1
    assert isinstance(outcome[0], requests.ConnectionError)
    assert not server.wait_for_token_requests(2, timeout=TIMEOUT)  # returns at once when stopped


def test_sixty_four_simultaneous_requests_are_all_held_then_served(
    server: FakeK2Server,
) -> None:
    replies: list[requests.Response] = []
    lock = threading.Lock()

    def fetch() -> None:
        reply = post_token(server)
        with lock:
            replies.append(reply)

    server.pause_tokens()
    workers = [threading.Thread(target=fetch) for _ in range(64)]
    for worker in workers:
        worker.start()
    try:
        assert server.wait_for_token_requests(64, timeout=TIMEOUT)
        assert server.exchanges == 0
    finally:
        server.resume_tokens()
    for worker in workers:
        worker.join(TIMEOUT)
    assert [r.status_code for r in replies] == [200] * 64
    assert len({r.json()["access_token"] for r in replies}) == 64
    assert server.exchanges == 64


def test_peak_in_flight_counts_the_most_served_at_once(server: FakeK2Server) -> None:
    """The tenants benchmark reads this to check the bound on concurrent exchanges: held at the
    gate, three requests are in flight together; served one after another, only one is; a
    reset starts the peak again from what is still in flight."""
    assert server.peak_in_flight == 0
    post_token(server)
    post_token(server)
    assert server.peak_in_flight == 1
    server.pause_tokens()
    workers = [threading.Thread(target=post_token, args=(server,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        assert server.wait_for_token_requests(5, timeout=TIMEOUT)
        assert server.peak_in_flight == 3
        server.reset_counters()
        assert server.peak_in_flight == 3  # the three held requests are still in flight
    finally:
        server.resume_tokens()
    for worker in workers:
        worker.join(TIMEOUT)
    assert server.exchanges == 3
    server.reset_counters()
    assert server.peak_in_flight == 0
    post_token(server)
    assert server.peak_in_flight == 1


def test_stop_does_not_wait_for_idle_keep_alive_clients(server: FakeK2Server) -> None:
    with requests.Session() as session:
        reply = session.post(f"{server.base_url}/oauth/token", data=GOOD, timeout=TIMEOUT)
        assert reply.status_code == 200
        started = time.monotonic()
        server.stop()  # the session still holds its pooled connection open
        assert time.monotonic() - started < 1.0


def test_counters_and_reset(server: FakeK2Server) -> None:
    server.inject(Fault.status(500))
    post_token(server)
    post_token(server, {**GOOD, "client_secret": "x"})
    token = new_token(server)
    ping(server, token)
    ping(server, None)
    assert (server.token_requests, server.exchanges, len(server.issued)) == (3, 1, 1)
    assert (server.api_requests, server.api_unauthorized) == (2, 1)
    server.reset_counters()
    assert (server.token_requests, server.exchanges, server.issued) == (0, 0, [])
    assert (server.api_requests, server.api_unauthorized) == (0, 0)
    assert server.is_valid(token)


def test_start_twice_is_an_error(server: FakeK2Server) -> None:
    with pytest.raises(RuntimeError, match="twice"):
        server.start()


def test_ipv6_loopback() -> None:
    try:
        srv = FakeK2Server(host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with srv:
        assert srv.base_url == f"http://[::1]:{srv.port}"
        assert post_token(srv).status_code == 200


# --------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.Popen[str]:
    script = Path(fake_server.__file__)
    return subprocess.Popen(
        [sys.executable, str(script), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_serves_until_sigterm_and_shows_only_the_default_secret() -> None:
    proc = run_cli("--expires-in", "60")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(
            r"fake K2 server listening on (http://127\.0\.0\.1:\d+) \(client_id=(.+)\)\n", line
        )
        assert match, line
        assert match.group(2) == ID
        reply = requests.post(f"{match.group(1)}/oauth/token", data=GOOD, timeout=TIMEOUT)
        assert reply.json()["expires_in"] == 60
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert SECRET in err


def test_cli_never_prints_a_custom_secret() -> None:
    custom = "my-very-private-secret"
    proc = run_cli("--client-id", "me", "--client-secret", custom, "--token-mode", "reuse")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.endswith("(client_id=me)\n")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert custom not in line + out + err
