"""The provider against a real redis-server and the fake K2 server."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests
from redis.crc import key_slot

from k2_shared_token import (
    SANDBOX_URL,
    AccessToken,
    ConfigurationError,
    InvalidCredentialsError,
    InvalidTokenResponseError,
    SharedTokenProvider,
    TokenEndpointError,
    TokenUnavailableError,
)
from k2_shared_token._core.tokens import IssuedToken
from k2_shared_token._redis.codec import RELEASED, decode
from k2_shared_token.testing.fake_k2 import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    FakeK2Server,
    Fault,
)
from tests.both_ways import close_users_http_client, users_http_client
from tests.conftest import CLIENT_SECRET, command_calls, provider_kwargs, wait_until

Make = Callable[..., SharedTokenProvider]


def test_cold_get_exchanges_once_and_shares_through_redis(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    first, second = make_provider(), make_provider()
    token = first.get_token()
    assert second.get_token() == token
    assert fake_k2.exchanges == 1
    assert fake_k2.is_valid(token)
    stored = decode(redis_client.get(first.keys.token))
    assert stored.value == token


def test_redis_ttl_is_the_remaining_lifetime(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    fake_k2.expires_in = 1800
    provider = make_provider()
    token = provider.get()
    ttl = redis_client.pttl(provider.keys.token) / 1000
    assert 1799 <= ttl <= 1800
    assert abs(token.seconds_left() - ttl) <= 1


def test_reused_token_with_shrinking_expires_in_keeps_its_real_ttl(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    fake_k2.token_mode = "reuse"
    fake_k2.expires_in = 3600
    first = make_provider(key_prefix="a").get_token()  # the server's live token: 3600 s
    # The server clock moves on: reuse replies now carry the *remaining* lifetime.
    redis_client.flushall()
    fake_k2_reply = fake_k2.issued[-1]
    provider = make_provider(key_prefix="b")
    token = provider.get()
    assert token.value == first
    left = fake_k2_reply.expires_in - (time.monotonic() - fake_k2_reply.issued_at)
    ttl = redis_client.pttl(provider.keys.token) / 1000
    assert abs(ttl - left) <= 1
    assert fake_k2.issued[-1].reused


def test_warm_worker_answers_from_memory_without_redis(
    make_provider: Make, redis_client: redis.Redis
) -> None:
    provider = make_provider()
    token = provider.get_token()
    # The lock holder subscribes after its exchange, then re-checks its copy once (off the
    # callers' path: an announcement may have come before): let that settle first.
    wait_until(lambda: provider.stats()["backplane"] == 1, 5, "the subscription")
    assert provider.get_token() == token
    assert provider.wait_for_refresh(5)
    before = command_calls(redis_client, "evalsha") + command_calls(redis_client, "eval")
    for _ in range(10_000):
        assert provider.get_token() == token
    after = command_calls(redis_client, "evalsha") + command_calls(redis_client, "eval")
    assert after == before


class CountingConnection(redis.Connection):
    """Counts writes to the socket: each is one round trip (a command or a pipeline)."""

    sends = 0

    def send_packed_command(self, command: object, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)


@pytest.mark.sync_only("counts sends on a blocking redis-py connection class")
@pytest.mark.parametrize("client_kind", ["plain pool (pipelined read)", "cluster-style (script)"])
def test_without_local_cache_every_call_is_one_redis_round_trip(
    make_provider: Make, redis_server, redis_client: redis.Redis, client_kind: str
) -> None:
    client = redis.Redis(
        connection_pool=redis.ConnectionPool.from_url(
            redis_server.url, connection_class=CountingConnection
        )
    )
    provider = make_provider(local_cache=False, redis=client)
    if client_kind.startswith("cluster"):
        provider._store._pipelined = None  # what a client without a plain pool gets
    provider.get_token()
    sends = CountingConnection.sends
    before = redis_client.info("stats")["total_commands_processed"]
    for _ in range(100):
        provider.get_token()
    after = redis_client.info("stats")["total_commands_processed"]
    assert CountingConnection.sends - sends == 100
    # GET and two PTTL per call, run directly or inside the script (+1 EVALSHA), and our INFO.
    per_call = 3 if client_kind.startswith("plain") else 4
    assert after - before == 100 * per_call + 1
    client.close()


def test_invalidate_is_compare_and_delete(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = make_provider()
    old = provider.get_token()
    assert provider.invalidate(old) is True
    new = provider.get_token()
    assert new != old
    # A late report of the old token must not delete the new one.
    assert provider.invalidate(old) is False
    assert decode(redis_client.get(provider.keys.token)).value == new
    assert provider.get_token() == new
    assert fake_k2.exchanges == 2


def test_invalidate_drops_the_local_copy_at_once(make_provider: Make) -> None:
    a, b = make_provider(), make_provider()
    token = a.get_token()
    assert b.get_token() == token  # b now holds it in memory
    b.invalidate(AccessToken(token, "Bearer", 0))
    assert b.get_token() != token


def test_two_client_ids_never_share_a_token(redis_server, fake_k2: FakeK2Server) -> None:
    fake_k2_clients = {"client-one": "secret-one", "client-two": "secret-two"}
    with FakeK2Server(clients=fake_k2_clients) as server:
        common = {"base_url": server.base_url, "redis": redis_server.url}
        with (
            SharedTokenProvider(client_id="client-one", client_secret="secret-one", **common) as a,
            SharedTokenProvider(client_id="client-two", client_secret="secret-two", **common) as b,
        ):
            assert a.namespace != b.namespace
            assert a.get_token() != b.get_token()
            assert server.exchanges == 2


def test_two_base_urls_never_share_a_token(redis_server) -> None:
    with FakeK2Server() as one, FakeK2Server() as two:
        common = {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "redis": redis_server.url,
        }
        with (
            SharedTokenProvider(base_url=one.base_url, **common) as a,
            SharedTokenProvider(base_url=two.base_url, **common) as b,
        ):
            ta, tb = a.get_token(), b.get_token()
            assert ta != tb
            assert one.is_valid(ta) and not one.is_valid(tb)
            assert two.is_valid(tb) and not two.is_valid(ta)


def test_keys_share_one_cluster_hash_slot(make_provider: Make) -> None:
    keys = make_provider().keys
    slots = {key_slot(k.encode()) for k in (keys.token, keys.lock, keys.fence)}
    assert len(slots) == 1
    assert f"{{{make_provider().namespace}}}" in keys.token


def test_invalid_credentials_raise_after_exactly_one_request(
    redis_server, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = SharedTokenProvider(
        client_id="unknown-client",
        client_secret="wrong",
        base_url=fake_k2.base_url,
        redis=redis_server.url,
    )
    with pytest.raises(InvalidCredentialsError):
        provider.get_token()
    assert fake_k2.token_requests == 1
    assert redis_client.get(provider.keys.token) is None
    assert redis_client.get(provider.keys.lock) is None  # the lock was given back
    provider.close()


def test_503_503_200_succeeds_on_the_third_request(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    fake_k2.inject(Fault.status(503), Fault.status(503))
    assert make_provider().get_token()
    assert fake_k2.token_requests == 3
    assert fake_k2.exchanges == 1


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"access_token": "abc", "token_type": "Bearer", "expires_in": 36',
        b'{"access_token": 12345, "token_type": "Bearer", "expires_in": 3600}',
        b'{"access_token": "abc", "token_type": "mac", "expires_in": 3600}',
        b'{"access_token": "abc", "token_type": "Bearer", "expires_in": "3600"}',
        b'["not", "an", "object"]',
    ],
)
def test_garbage_bodies_raise_and_cache_nothing(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis, body: bytes
) -> None:
    fake_k2.inject(*[Fault.garbage(body)] * 2)
    provider = make_provider(max_attempts=2)
    with pytest.raises(InvalidTokenResponseError) as info:
        provider.get_token()
    assert isinstance(info.value, TokenEndpointError)
    assert body.decode() not in str(info.value)
    assert redis_client.keys(f"{provider.settings.key_prefix}:*token") == []


def test_refresh_ahead_one_exchange_while_callers_keep_the_current_token(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    fake_k2.expires_in = 600
    workers = [make_provider(refresh_ahead=120, min_validity=10) for _ in range(4)]
    old = workers[0].get_token()
    for w in workers:
        assert w.get_token() == old
    # Move the shared token into the refresh window: 100 s left < refresh_ahead.
    redis_client.pexpire(workers[0].keys.token, 100_000)
    for w in workers:
        w._local.held = None  # as if their local copies had reached local_max_age
    fake_k2.pause_tokens()
    try:
        # The refresh is stuck inside K2; every caller must still get the old token at once.
        for _ in range(50):
            for w in workers:
                assert w.get_token() == old
        assert fake_k2.wait_for_token_requests(2, timeout=5)
    finally:
        fake_k2.resume_tokens()
    for w in workers:
        assert w.wait_for_refresh(5)
    assert fake_k2.exchanges == 2
    new = decode(redis_client.get(workers[0].keys.token)).value
    assert new != old
    assert {w.get_token() for w in workers} == {new}


def test_failed_early_refresh_keeps_serving_the_current_token(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis, all_logs
) -> None:
    provider = make_provider(refresh_ahead=120, min_validity=10, local_cache=False, max_attempts=1)
    old = provider.get_token()
    redis_client.pexpire(provider.keys.token, 100_000)
    fake_k2.inject(Fault.status(400))
    assert provider.get_token() == old
    assert provider.wait_for_refresh(5)
    assert provider.get_token() == old
    assert any("early refresh failed" in r.getMessage() for r in all_logs.records)


def test_token_below_min_validity_is_never_handed_out(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = make_provider(refresh_ahead=120, min_validity=30, local_cache=False)
    old = provider.get_token()
    redis_client.pexpire(provider.keys.token, 20_000)  # 20 s left < min_validity
    assert provider.get_token() != old
    assert fake_k2.exchanges == 2


@pytest.mark.parametrize("local_cache", [True, False])
def test_corrupt_value_is_a_miss_and_is_overwritten(
    make_provider: Make, redis_client: redis.Redis, all_logs, local_cache: bool
) -> None:
    provider = make_provider(local_cache=local_cache)
    redis_client.set(provider.keys.token, b"not ours", px=600_000)
    token = provider.get_token()
    assert decode(redis_client.get(provider.keys.token)).value == token
    assert any("unreadable" in r.getMessage() for r in all_logs.records)


@pytest.mark.parametrize("local_cache", [True, False])
def test_value_of_another_redis_type_is_a_miss_and_is_overwritten(
    make_provider: Make, redis_client: redis.Redis, local_cache: bool
) -> None:
    provider = make_provider(local_cache=local_cache)
    redis_client.hset(provider.keys.token, "field", "value")
    token = provider.get_token()
    assert decode(redis_client.get(provider.keys.token)).value == token


def test_auth_recovers_from_a_revoked_token_with_one_retry(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    provider = make_provider()
    session = requests.Session()
    session.auth = provider.auth()
    assert session.get(f"{fake_k2.base_url}/api/v1/ping", timeout=5).status_code == 200
    fake_k2.revoke_token(provider.get_token())
    reply = session.get(f"{fake_k2.base_url}/api/v1/ping", timeout=5)
    assert reply.status_code == 200
    assert [r.status_code for r in reply.history] == [401]
    assert fake_k2.exchanges == 2
    session.close()


def test_auth_retries_only_once(make_provider: Make) -> None:
    """An API that rejects every token: one retry, then the 401 is the caller's to see."""
    seen: list[str] = []

    class AlwaysUnauthorized(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers["Authorization"])
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), AlwaysUnauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        provider = make_provider()
        with requests.Session() as session:
            session.auth = provider.auth()
            reply = session.get(f"http://127.0.0.1:{server.server_port}/api", timeout=5)
        assert reply.status_code == 401
        assert [r.status_code for r in reply.history] == [401]
        assert len(seen) == 2 and seen[0] != seen[1]  # the retry carried a new token
    finally:
        server.shutdown()
        server.server_close()


def test_32_threads_single_flight_one_lock_attempt(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = make_provider()
    barrier = threading.Barrier(32)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            tokens.append(provider.get_token())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(tokens) == 32 and len(set(tokens)) == 1
    assert fake_k2.exchanges == 1
    # One SET for the lock, one for the token: only one thread went to the lock.
    assert command_calls(redis_client, "set") == 2


def test_secret_never_reaches_redis_logs_or_reprs(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis, all_logs
) -> None:
    provider = make_provider()
    token = provider.get()
    fake_k2.inject(Fault.status(503))
    provider.invalidate(token)
    provider.get()
    for key in redis_client.scan_iter():
        assert CLIENT_SECRET.encode() not in key
        assert provider.settings.client_id.encode() not in key
        if redis_client.type(key) == b"string":
            assert CLIENT_SECRET.encode() not in redis_client.get(key)
    texts = [r.getMessage() for r in all_logs.records] + [
        repr(provider),
        str(provider),
        repr(token),
        str(token),
        repr(provider.settings),
        repr(provider.auth()),
    ]
    for text in texts:
        assert CLIENT_SECRET not in text
        assert token.value not in text


def test_waiter_gives_up_after_wait_timeout_while_another_worker_holds_the_lock(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = make_provider(wait_timeout=0.5, lock_lease=5)
    redis_client.set(provider.keys.lock, b"another-worker", px=5_000)
    with pytest.raises(TokenUnavailableError):
        provider.get_token()
    assert fake_k2.token_requests == 0
    assert redis_client.get(provider.keys.lock) == b"another-worker"  # not ours to release


def test_waiters_are_told_when_the_holder_fails_and_do_not_ask_again(
    redis_server, fake_k2: FakeK2Server
) -> None:
    """invalid_client seen by the lock holder reaches a waiting worker without a 2nd request."""
    kwargs = provider_kwargs(redis_server.url, fake_k2.base_url, client_secret="wrong")
    holder, waiter = SharedTokenProvider(**kwargs), SharedTokenProvider(**kwargs)
    fake_k2.pause_tokens()
    errors: list[BaseException] = []

    def ask(p: SharedTokenProvider) -> None:
        try:
            p.get_token()
        except BaseException as exc:
            errors.append(exc)

    first = threading.Thread(target=ask, args=(holder,))
    first.start()
    assert fake_k2.wait_for_token_requests(1, timeout=5)  # the holder is inside K2
    second = threading.Thread(target=ask, args=(waiter,))
    second.start()
    # The waiter is subscribed once its re-read happened; give it the announcement.
    client = redis.Redis.from_url(redis_server.url)
    wait_until(
        lambda: bool(client.pubsub_numsub(waiter.keys.channel)[0][1]), 5, "the waiter to subscribe"
    )
    fake_k2.resume_tokens()
    first.join(10)
    second.join(10)
    assert len(errors) == 2
    assert all(isinstance(e, InvalidCredentialsError) for e in errors)
    assert fake_k2.token_requests == 1
    holder.close()
    waiter.close()
    client.close()


def test_from_env_reads_the_documented_variables(redis_server, fake_k2: FakeK2Server) -> None:
    env = {
        "K2_CLIENT_ID": DEFAULT_CLIENT_ID,
        "K2_CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
        "K2_BASE_URL": fake_k2.base_url,
        "REDIS_URL": redis_server.url,
    }
    with SharedTokenProvider.from_env(env) as provider:
        assert fake_k2.is_valid(provider.get_token())
    with pytest.raises(ConfigurationError, match="K2_CLIENT_SECRET"):
        SharedTokenProvider.from_env({"K2_CLIENT_ID": "x"})
    with SharedTokenProvider.from_env({}, client_id="a", client_secret="b") as defaults:
        assert defaults.settings.base_url == SANDBOX_URL
    tuned = {**env, "K2_REFRESH_AHEAD": "120", "K2_MIN_VALIDITY": "10", "K2_LOCK_LEASE": "8",
             "K2_WAIT_TIMEOUT": "9", "K2_KEY_PREFIX": "pay"}  # fmt: skip
    with SharedTokenProvider.from_env(tuned) as provider:
        s = provider.settings
        assert (s.refresh_ahead, s.min_validity, s.lock_lease, s.wait_timeout) == (120, 10, 8, 9)
        assert provider.keys.token.startswith("pay:{")
    with pytest.raises(ConfigurationError, match="K2_LOCK_LEASE"):
        SharedTokenProvider.from_env({**env, "K2_LOCK_LEASE": "soon"})


@pytest.mark.sync_only("os.fork() with an event loop thread running is not supported by asyncio")
def test_a_provider_built_before_fork_works_in_the_child(make_provider: Make) -> None:
    provider = make_provider()
    token = provider.get_token()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: inherited copy still valid, and a fresh exchange path works
        try:
            ok = provider.get_token() == token
            # The child's first call re-reads the copy off its path and subscribes anew.
            ok = ok and provider.wait_for_refresh(5)
            wait_until(lambda: provider.stats()["backplane"] == 1, 5, "the child's subscription")
            provider.invalidate(token)
            ok = ok and provider.get_token() != token
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)


def test_a_redis_restart_loses_the_token_and_the_scripts_and_the_next_call_recovers(
    make_provider: Make, redis_server, fake_k2: FakeK2Server
) -> None:
    provider = make_provider(local_cache=False)
    first = provider.get_token()
    redis_server.restart()  # no persistence: token, fence and script cache are gone
    second = provider.get_token()  # NOSCRIPT is answered by sending the script again
    assert second != first
    assert fake_k2.exchanges == 2
    assert provider.get_token() == second


@pytest.mark.sync_only("os.fork() with an event loop thread running is not supported by asyncio")
def test_a_child_forked_mid_refresh_inherits_no_lock_and_no_pending_refresh(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = make_provider(refresh_ahead=120, min_validity=10)
    old = provider.get_token()
    redis_client.pexpire(provider.keys.token, 100_000)  # into the refresh window
    provider._local.held = None  # as if the local copy had reached local_max_age
    fake_k2.pause_tokens()
    try:
        assert provider.get_token() == old  # stale but usable: served, refresh in background
        assert fake_k2.wait_for_token_requests(2, timeout=5)  # the refresh is inside K2 now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no refresh pending, no flight in progress, nothing blocks
            try:
                fresh_state = not provider._refresher._pending
                served = provider.get_token() == old
                os.write(write, b"1" if fresh_state and served else b"0")
            finally:
                os._exit(0)
        os.close(write)
        ready, _, _ = select.select([read], [], [], 10)
        assert ready, "the child blocked on state inherited from the parent"
        assert os.read(read, 1) == b"1"
        os.close(read)
        os.waitpid(pid, 0)
    finally:
        fake_k2.resume_tokens()
    assert provider.wait_for_refresh(5)
    assert provider.get_token() != old


@pytest.mark.parametrize("status", [307, 308])
def test_a_redirect_from_k2_is_never_followed_even_by_a_users_client(
    fake_k2: FakeK2Server, make_provider: Make, side: str, status: int
) -> None:
    """A 307 or 308 re-posts the form wherever it points: the client secret would go to
    another host (for revoke, the token too). Neither side follows one, even through a user's
    client that follows redirects (requests' default; httpx's when asked)."""
    with FakeK2Server() as elsewhere:
        session = users_http_client(side, follow_redirects=True)
        location = {"Location": f"{elsewhere.base_url}/oauth/token"}
        fake_k2.inject(Fault.status(status, headers=location))
        provider = make_provider(session=session, max_attempts=1)
        try:
            with pytest.raises(TokenEndpointError) as caught:
                provider.get_token()
        finally:
            provider.close()
            close_users_http_client(provider, session)
        assert elsewhere.token_requests == 0
        assert fake_k2.token_requests == 1
        assert CLIENT_SECRET not in str(caught.value)


def test_a_token_dead_by_the_time_it_is_published_gives_the_lock_back_announced(
    make_provider: Make, redis_client: redis.Redis
) -> None:
    """The store's backstop for a token that died between the flow's check and the write:
    nothing is shared, the lock is released and that is announced (no lease sat out)."""
    provider = make_provider()
    pubsub = redis_client.pubsub()
    pubsub.subscribe(provider.keys.channel)
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        lock = provider._store.try_lock(0)
        assert lock.acquired
        dead = IssuedToken("t" * 40, "Bearer", 1, time.monotonic() - 2, time.time() - 2, 2.0)
        assert provider._store.publish(lock, dead).ttl_ms <= 0
        assert not redis_client.exists(provider.keys.lock, provider.keys.token)
        assert pubsub.get_message(timeout=5)["data"] == RELEASED.encode()
    finally:
        pubsub.close()
