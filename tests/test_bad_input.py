"""Bad input never crashes a caller nor poisons the cache; bad configuration fails at once.

Two sources of input the library does not control:

- whatever sits under the namespace's keys in Redis (another program, an operator's typo, a
  half-migrated deployment): strings, numbers, hashes, lists, sets, with or without expiry;
- whatever the token endpoint (or a proxy in front of it) answers: any status, headers, body.

Hypothesis throws both at ``get()`` through a real redis-server, the real fake K2 server, and a
tiny HTTP server started here that answers exactly what the current example says. The property
is the caller's contract: a token the endpoint really issued, or a :class:`K2TokenError`; never
another exception, never a value in Redis that the next reader cannot use, never a token that
did not come from a valid reply, and never the secret or a whole token in a log or an error.

One Redis, one fake K2 and one reply server serve every example (module fixtures; each example
flushes the database), so the examples cost milliseconds, not process starts.
"""

from __future__ import annotations

import json
import math
import re
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_shared_token import ConfigurationError, K2TokenError, SharedTokenProvider
from k2_shared_token._redis.codec import decode
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis, free_port
from tests.conftest import CLIENT_ID, CLIENT_SECRET, provider_kwargs
from tests.faultkit import (
    KeyEvents,
    assert_no_leak,
    capture_logs,
    maybe_bytes,
    stored_bytes,
    warnings_with,
)
from tests.strategies import json_values

UNREADABLE = "unreadable token value"
# Bounded: 40 examples each, and while a bug is open only the first one found is shrunk (each
# is also pinned by a named test below), so a failing run stays within the suite's budget.
FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def shared_client(shared_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(shared_redis.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def shared_k2() -> Iterator[FakeK2Server]:
    with FakeK2Server(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        yield server


# -- 4a. foreign data under our keys --------------------------------------------------------


@dataclass(frozen=True)
class Foreign:
    """A value someone else left under one of our keys: its Redis type, bytes and expiry."""

    kind: str  # string, hash, list, set
    data: bytes
    ttl_ms: int | None

    def plant(self, client: redis.Redis, key: str) -> None:
        if self.kind == "string":
            client.set(key, self.data)
        elif self.kind == "hash":
            client.hset(key, "field", self.data)
        elif self.kind == "list":
            client.rpush(key, self.data)
        else:
            client.sadd(key, self.data)
        if self.ttl_ms is not None:
            client.pexpire(key, self.ttl_ms)


def _encoded(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda v: v if isinstance(v, bytes) else str(v).encode("utf-8"))


_hex32 = st.from_regex(r"\A[0-9a-f]{32}\Z")
_digits = st.text("0123456789", min_size=1, max_size=25) | st.just("9" * 4400)
_any_bytes = _encoded(st.binary(max_size=60) | st.integers() | st.text(max_size=30))
# Shapes close to ours, so the scripts' pattern checks are exercised, not just skipped.
_token_lookalike = st.builds(
    lambda fence, dig, payload: f"{fence}:{dig}:{payload}".encode(),
    st.integers(-(10**20), 10**20),
    _hex32,
    json_values.map(json.dumps),
)
_lock_lookalike = st.builds(
    lambda host, pid, since: f"{host}:{pid}:{since}:0123456789abcdef".encode(),
    st.text(string.ascii_letters, max_size=8),
    _digits,
    st.text("0123456789", max_size=400),
)
_holdoff_lookalike = _encoded(st.from_regex(r"\A[A-Za-z0-9_]{1,16}:[0-9a-f]{0,8}\Z"))


def _foreign(data: st.SearchStrategy[bytes], ttl: st.SearchStrategy[int | None]) -> Any:
    kinds = st.sampled_from(["string", "string", "string", "hash", "list", "set"])
    return st.none() | st.builds(Foreign, kinds, data, ttl)


_ttl = st.none() | st.integers(1, 600_000)
# A planted token lives long enough to be read: an expired value is simply gone, not foreign.
_token_ttl = st.none() | st.integers(5_000, 600_000)

layouts = st.fixed_dictionaries(
    {
        "token": _foreign(_any_bytes | _token_lookalike, _token_ttl),
        "lock": _foreign(_any_bytes | _lock_lookalike, _ttl),
        "fence": _foreign(_any_bytes | _encoded(st.integers()) | _encoded(_digits), _ttl),
        "backoff": _foreign(_any_bytes | _holdoff_lookalike, _ttl),
        "failures": _foreign(_any_bytes | _encoded(_digits), _ttl),
    }
)


def readable(raw: bytes | None) -> str | None:
    """The token in a stored value, or None if the next reader could not use the value."""
    try:
        return decode(raw).value if raw is not None else None
    except ValueError:
        return None


def key_state(client: redis.Redis, key: str) -> tuple[bytes, bytes | None]:
    """The key's type and, for a string, its bytes."""
    kind = client.type(key)
    assert isinstance(kind, bytes)
    return kind, maybe_bytes(client, key) if kind == b"string" else None


@FUZZ
@given(layout=layouts, local_cache=st.booleans())
def test_foreign_data_under_our_keys_never_crashes_get_nor_poisons_the_cache(
    shared_redis: EmbeddedRedis,
    shared_client: redis.Redis,
    shared_k2: FakeK2Server,
    layout: dict[str, Foreign | None],
    local_cache: bool,
) -> None:
    shared_client.flushdb()
    provider = SharedTokenProvider(
        **provider_kwargs(
            shared_redis.url,
            shared_k2.base_url,
            local_cache=local_cache,
            lock_lease=2,
            wait_timeout=0.1,  # a foreign lock with a TTL is waited for: keep that short
            max_attempts=1,
        )
    )
    keys = provider.keys
    names = {
        "token": keys.token,
        "lock": keys.lock,
        "fence": keys.fence,
        "backoff": keys.backoff,
        "failures": keys.failures,
    }
    try:
        for field, foreign in layout.items():
            if foreign is not None:
                foreign.plant(shared_client, names[field])
        planted = key_state(shared_client, keys.token)
        error: K2TokenError | None = None
        token = None
        with capture_logs() as logs:
            try:
                token = provider.get()
            except K2TokenError as exc:  # anything else fails the test
                error = exc
            try:
                provider._store.status()  # what `k2-token status` shows an operator
            except K2TokenError as exc:
                error = error or exc
    finally:
        provider.close()

    kind, raw = key_state(shared_client, keys.token)
    if token is not None:
        assert shared_k2.is_valid(token.value)
        assert readable(raw) == token.value, "the published value cannot be read back"
    elif (kind, raw) != planted and kind != b"none":
        assert readable(raw) is not None, "get() failed and left an unreadable value"
    if layout["token"] is not None:
        assert warnings_with(logs.records, UNREADABLE), "foreign token value overwritten silently"
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=[token.value] if token is not None else [],
        logs=logs.records,
        errors=[error],
        client=shared_client,
    )


# The property above, reduced to the single inputs it found. Each is one bug, named.


@pytest.fixture
def fresh_db(shared_client: redis.Redis) -> redis.Redis:
    shared_client.flushdb()
    return shared_client


@pytest.fixture
def provider(shared_redis: EmbeddedRedis, shared_k2: FakeK2Server) -> Iterator[Any]:
    made = SharedTokenProvider(
        **provider_kwargs(shared_redis.url, shared_k2.base_url, wait_timeout=0.5, max_attempts=1)
    )
    yield made
    made.close()


def test_a_negative_fence_does_not_make_the_published_token_unreadable(
    fresh_db: redis.Redis, provider: SharedTokenProvider, shared_k2: FakeK2Server
) -> None:
    """The fence is INCRed by the lock script; a negative one left by someone else is INCRed
    into the value's ``<fence>:`` prefix, which ``codec.decode`` (``\\d{1,19}``) and the
    scripts (``^%d+:``) then refuse: every other worker reads a miss and exchanges."""
    fresh_db.set(provider.keys.fence, -5)
    token = provider.get_token()
    assert readable(maybe_bytes(fresh_db, provider.keys.token)) == token, (
        "published, but unreadable"
    )


@pytest.mark.parametrize("fence", [2**53, 2**63 - 2])
def test_a_fence_beyond_what_lua_counts_exactly_does_not_refuse_every_publish(
    fresh_db: redis.Redis, provider: SharedTokenProvider, fence: int
) -> None:
    """Lua's numbers are doubles: INCRed past 2^53 the fence the script hands out no longer
    equals the one stored, and the publish's check ("a newer lock holder exists") refuses
    every write. Found by the fuzz test above."""
    fresh_db.set(provider.keys.fence, fence)
    token = provider.get_token()
    assert readable(maybe_bytes(fresh_db, provider.keys.token)) == token


def test_a_foreign_holdoff_without_expiry_does_not_block_the_namespace_for_good(
    fresh_db: redis.Redis, provider: SharedTokenProvider, shared_k2: FakeK2Server
) -> None:
    """Our hold-offs always expire; one without a TTL is not ours, as the lock script already
    concludes for a lock without one. Honouring it means no worker ever exchanges again."""
    fresh_db.set(provider.keys.backoff, b"unavailable:")
    assert shared_k2.is_valid(provider.get_token())


def test_a_failure_streak_too_long_for_int_is_not_a_crash(
    fresh_db: redis.Redis, provider: SharedTokenProvider, shared_k2: FakeK2Server
) -> None:
    """``int()`` refuses strings over 4300 digits with ValueError: the streak parser lets it
    through ``get()`` as a raw exception."""
    fresh_db.set(provider.keys.failures, b"9" * 4400)
    try:
        token = provider.get_token()
    except K2TokenError:
        return
    assert shared_k2.is_valid(token)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lock", b"host:1:" + b"9" * 400 + b":0123456789abcdef"),
        ("lock", b"host:" + b"9" * 4400 + b":1:0123456789abcdef"),
        ("fence", b"9" * 4400),
        ("failures", b"9" * 4400),
    ],
)
def test_status_reads_foreign_values_without_crashing(
    fresh_db: redis.Redis, provider: SharedTokenProvider, field: str, value: bytes
) -> None:
    key = getattr(provider.keys, field)
    fresh_db.set(key, value, px=600_000)
    fresh_db.set(provider.keys.backoff, b"unavailable:", px=600_000)
    status = provider._store.status()
    assert status["namespace"] == provider.namespace


def test_a_fence_with_a_foreign_expiry_does_not_void_the_publish(
    fresh_db: redis.Redis, provider: SharedTokenProvider, shared_k2: FakeK2Server
) -> None:
    """INCR keeps a key's TTL. Our fence never expires, but one planted with a TTL that runs
    out while the holder is inside K2 makes the publish's fence check fail: the token is kept
    local and not shared, and the foreign token value stays. (Hypothesis found this one.)"""
    keys = provider.keys
    fresh_db.set(keys.token, b"some other program's value", px=600_000)
    events = KeyEvents(fresh_db, keys.fence)
    fresh_db.set(keys.fence, 7, px=300)
    before = shared_k2.token_requests
    tokens: list[str] = []
    shared_k2.pause_tokens()
    try:
        worker = threading.Thread(target=lambda: tokens.append(provider.get_token()))
        worker.start()
        assert shared_k2.wait_for_token_requests(before + 1)  # the holder is inside K2
        if fresh_db.pttl(keys.fence) != -1:  # still foreign-timed: let it run out now
            events.until(b"expired")
    finally:
        events.close()
        shared_k2.resume_tokens()
    worker.join(10)
    assert tokens, "get() did not return"
    assert readable(maybe_bytes(fresh_db, keys.token)) == tokens[0], "the token was not shared"


def test_a_foreign_token_value_without_expiry_is_logged_before_it_is_overwritten(
    fresh_db: redis.Redis, provider: SharedTokenProvider
) -> None:
    """Every other unreadable value is reported; one without a TTL is overwritten silently,
    which hides a second program writing under our key from the operator."""
    fresh_db.set(provider.keys.token, b"some other program's value")
    with capture_logs() as logs:
        token = provider.get_token()
    assert decode(stored_bytes(fresh_db, provider.keys.token)).value == token
    assert warnings_with(logs.records, UNREADABLE)


# -- 4b. arbitrary token-endpoint replies ---------------------------------------------------


FUZZ_SECRET = "hunter2-fuzz-secret-0042"  # short: a 40-character excerpt would show it whole


@dataclass(frozen=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class _ReplyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    reply = Reply(500, (), b"")
    requests = 0


class _ReplyHandler(BaseHTTPRequestHandler):
    """Answers every POST with the server's current reply, byte for byte. HTTP/1.0: the
    connection closes after each reply, so a wrong Content-Length cannot desync the next one."""

    protocol_version = "HTTP/1.0"
    server: _ReplyHTTPServer

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length") or "0"
        self.rfile.read(int(length))
        reply = self.server.reply
        self.server.requests += 1
        self.send_response_only(reply.status)  # no Server or Date: every header is the example's
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def reply_server() -> Iterator[_ReplyHTTPServer]:
    server = _ReplyHTTPServer(("127.0.0.1", 0), _ReplyHandler)
    thread = threading.Thread(target=server.serve_forever, name="reply-server", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


_TOKEN_CHARS = string.ascii_letters + string.digits + "-._~+/"
_bearer = st.text(_TOKEN_CHARS, min_size=20, max_size=80)
valid_bodies = st.fixed_dictionaries(
    {
        "access_token": _bearer,
        "token_type": st.sampled_from(["Bearer", "bearer", "BEARER"]),
        "expires_in": st.integers(60, 10 * 366 * 86400),
    },
    optional={
        "created_at": st.integers(0, 2**40) | st.just("2021-05-14T10:20:30.123+03:00"),
        "scope": st.text(max_size=10),
    },
)
_token_like_bodies = st.fixed_dictionaries(
    {},
    optional={
        "access_token": _bearer | json_values | st.just(FUZZ_SECRET),
        "token_type": st.sampled_from(["Bearer", "mac", ""]) | json_values,
        "expires_in": st.sampled_from([3600, 3600.0, 3600.5, 0, -1, 2**63])
        | st.floats()
        | json_values,
        "created_at": json_values,
        "error": st.sampled_from(["invalid_client", "invalid_request", "server_error"])
        | st.just(FUZZ_SECRET)
        | json_values,
        "error_description": st.just(FUZZ_SECRET) | st.text(max_size=20),
    },
)
_bodies = (
    st.binary(max_size=200)
    | json_values.map(json.dumps).map(str.encode)
    | _token_like_bodies.map(json.dumps).map(str.encode)
    | valid_bodies.map(json.dumps).map(str.encode)
)
_header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
_headers = st.lists(
    st.one_of(
        st.tuples(
            st.just("Retry-After"),
            st.integers(-5, 10**12).map(str)
            | st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT"])
            | _header_text,
        ),
        st.tuples(
            st.just("Content-Type"),
            st.sampled_from(["application/json", "text/html; charset=utf-8"])
            | _header_text
            | st.just(FUZZ_SECRET),
        ),
        st.tuples(
            st.just("Content-Encoding"),
            st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "x-unknown"]),
        ),
        st.tuples(st.just("Transfer-Encoding"), st.just("chunked")),
        st.tuples(st.just("Content-Length"), st.integers(-1, 400).map(str) | _header_text),
        st.tuples(
            st.sampled_from(["WWW-Authenticate", "Location", "X-Echo", "Cache-Control"]),
            _header_text | st.just(FUZZ_SECRET),
        ),
    ),
    max_size=4,
)
_statuses = st.sampled_from([200, 200, 201, 204, 302, 304, 400, 401, 403, 408, 429, 500, 503])
replies = st.builds(Reply, _statuses | st.integers(200, 599), _headers.map(tuple), _bodies)


def claimed_token(reply: Reply) -> str | None:
    """The token a reply could legitimately have delivered: a 200 whose body is a JSON object
    with a string access_token, a Bearer type and a positive expires_in. A necessary condition
    (the library checks more), written independently of the library's parser."""
    if reply.status != 200:
        return None
    try:
        data = json.loads(reply.body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    token, kind, expires = data.get("access_token"), data.get("token_type"), data.get("expires_in")
    if not isinstance(token, str) or not isinstance(kind, str) or kind.lower() != "bearer":
        return None
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        return None
    return token if math.isfinite(expires) and expires > 0 else None


def reply_provider(shared_redis: EmbeddedRedis, server: _ReplyHTTPServer) -> SharedTokenProvider:
    return SharedTokenProvider(
        client_id="fuzz-client",
        client_secret=FUZZ_SECRET,
        base_url=f"http://127.0.0.1:{server.server_port}",
        redis=shared_redis.url,
        max_attempts=1,  # one request per example: retries would only repeat the same reply
        read_timeout=2,
        lock_lease=5,
        wait_timeout=2,
    )


@FUZZ
@given(reply=replies)
def test_any_token_endpoint_reply_gives_a_token_or_a_package_error(
    shared_redis: EmbeddedRedis,
    shared_client: redis.Redis,
    reply_server: _ReplyHTTPServer,
    reply: Reply,
) -> None:
    shared_client.flushdb()
    reply_server.reply = reply
    provider = reply_provider(shared_redis, reply_server)
    token = None
    error: K2TokenError | None = None
    try:
        with capture_logs() as logs:
            try:
                token = provider.get()
            except K2TokenError as exc:  # anything else fails the test
                error = exc
    finally:
        provider.close()
    claimed = claimed_token(reply)
    raw = maybe_bytes(shared_client, provider.keys.token)
    if raw is not None:
        assert claimed is not None, "Redis holds a token from an invalid reply"
        assert decode(raw).value == claimed
    if token is not None:
        assert token.value == claimed
        assert raw is not None
    else:
        assert raw is None
    tokens = [claimed] if claimed else []
    try:
        sent = json.loads(reply.body).get("access_token")
    except (ValueError, RecursionError, AttributeError):
        sent = None
    if isinstance(sent, str) and re.fullmatch(r"[A-Za-z0-9\-._~+/]{20,}=*", sent):
        tokens.append(sent)  # not even a rejected token may be echoed
    assert_no_leak(
        secret=FUZZ_SECRET, tokens=tokens, logs=logs.records, errors=[error], client=shared_client
    )


@settings(max_examples=30, deadline=None, database=None)
@given(body=valid_bodies)
def test_every_valid_token_reply_is_served_and_shared_as_sent(
    shared_redis: EmbeddedRedis,
    shared_client: redis.Redis,
    reply_server: _ReplyHTTPServer,
    body: dict[str, Any],
) -> None:
    """The other half of the oracle: a reply that is valid is never refused."""
    shared_client.flushdb()
    reply_server.reply = Reply(
        200, (("Content-Type", "application/json"),), json.dumps(body).encode()
    )
    provider = reply_provider(shared_redis, reply_server)
    try:
        token = provider.get()
    finally:
        provider.close()
    assert token.value == body["access_token"]
    assert decode(stored_bytes(shared_client, provider.keys.token)).value == token.value
    assert 0 < shared_client.pttl(provider.keys.token) <= body["expires_in"] * 1000


def test_a_content_type_echoing_the_secret_is_not_repeated_in_errors(
    shared_redis: EmbeddedRedis, shared_client: redis.Redis, reply_server: _ReplyHTTPServer
) -> None:
    """The wire module never quotes the body, because a reply may echo the credentials; the
    Content-Type header is as much the server's text, yet its first 40 characters go into the
    error message (and the log line) of a 200 with a non-JSON body."""
    shared_client.flushdb()
    reply_server.reply = Reply(200, (("Content-Type", FUZZ_SECRET),), b"<html>oops</html>")
    provider = reply_provider(shared_redis, reply_server)
    try:
        with capture_logs() as logs, pytest.raises(K2TokenError) as info:
            provider.get()
    finally:
        provider.close()
    assert_no_leak(secret=FUZZ_SECRET, logs=logs.records, errors=[info.value])


# -- 6. configuration fails fast ----------------------------------------------------------------
# tests/test_settings.py covers credentials, base URLs, the refresh windows, the exchange
# deadline, max_attempts and the key prefix on Settings.build; here: what it does not (the
# Redis knobs, the hold-off knobs, the redis argument), through the provider's constructor.


def _closed_port_kwargs(**overrides: Any) -> dict[str, Any]:
    """Valid settings pointing at ports nobody serves: construction must not need either."""
    port = free_port()
    kwargs = provider_kwargs(f"redis://127.0.0.1:{port}/0", f"http://127.0.0.1:{port}")
    kwargs.update(overrides)
    return kwargs


def test_construction_touches_neither_redis_nor_k2() -> None:
    """So a configuration error is the only thing construction can report, and fast."""
    with SharedTokenProvider(**_closed_port_kwargs()) as provider:
        assert provider.stats()["redis_error"] == 0


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"on_redis_error": "ignore"}, "on_redis_error"),
        ({"on_redis_error": "RAISE"}, "on_redis_error"),
        ({"on_redis_error": None}, "on_redis_error"),
        ({"failure_backoff": 10, "failure_backoff_max": 5}, "failure_backoff_max"),
        ({"failure_backoff": 0}, "failure_backoff"),
        ({"failure_backoff": -1}, "failure_backoff"),
        ({"failure_backoff_max": math.inf}, "failure_backoff_max"),
        ({"failure_backoff_max": math.nan}, "failure_backoff_max"),
        ({"invalid_client_holdoff": -1}, "invalid_client_holdoff"),
        ({"invalid_client_holdoff": "60"}, "invalid_client_holdoff"),
        ({"redis_timeout": 0}, "redis_timeout"),
        ({"redis_timeout": -0.5}, "redis_timeout"),
        ({"redis_timeout": True}, "redis_timeout"),
        ({"redis_cooldown": 0}, "redis_cooldown"),
        ({"redis_cooldown": math.nan}, "redis_cooldown"),
        ({"redis": ""}, "redis"),
        ({"redis": "   "}, "redis"),
        ({"redis": None}, "redis"),
        ({"redis": 6379}, "redis"),
        ({"redis": "ftp://127.0.0.1/0"}, "redis URL"),
        ({"redis": "redis://127.0.0.1:notaport/0"}, "redis URL"),
        # Settings errors surface through the provider unchanged.
        ({"client_secret": ""}, "client_secret"),
        ({"refresh_ahead": 30, "min_validity": 30}, "min_validity"),
        ({"base_url": "http://k2.example.com"}, "http://"),
    ],
)
def test_bad_configuration_raises_configuration_error_at_construction(
    overrides: dict[str, Any], names: str
) -> None:
    with pytest.raises(ConfigurationError, match=names) as info:
        SharedTokenProvider(**_closed_port_kwargs(**overrides))
    assert_no_leak(secret=CLIENT_SECRET, errors=[info.value])


def test_a_redis_password_is_not_echoed_by_a_url_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        SharedTokenProvider(**_closed_port_kwargs(redis="redis://app:hunter2pw@127.0.0.1:x/0"))
    assert "hunter2pw" not in str(info.value)


def test_zero_invalid_client_holdoff_is_allowed() -> None:
    """Zero turns the credentials hold-off off; it is a choice, not a mistake."""
    with SharedTokenProvider(**_closed_port_kwargs(invalid_client_holdoff=0)) as provider:
        assert provider.settings.invalid_client_holdoff == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("K2_ON_REDIS_ERROR", "ignore"),
        ("K2_REDIS_TIMEOUT", "soon"),
        ("K2_REDIS_TIMEOUT", "-1"),
        ("K2_INVALID_CLIENT_HOLDOFF", "a minute"),
        ("K2_INVALID_CLIENT_HOLDOFF", "-5"),
    ],
)
def test_from_env_refuses_bad_values_with_the_variable_name(variable: str, value: str) -> None:
    port = free_port()
    env = {
        "K2_CLIENT_ID": CLIENT_ID,
        "K2_CLIENT_SECRET": CLIENT_SECRET,
        "K2_BASE_URL": f"http://127.0.0.1:{port}",
        "K2_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        variable: value,
    }
    setting = variable.removeprefix("K2_").lower()
    with pytest.raises(ConfigurationError, match=f"{variable}|{setting}") as info:
        SharedTokenProvider.from_env(env)
    assert_no_leak(secret=CLIENT_SECRET, errors=[info.value])
