"""What a 401 says about the server, on both providers: a foreign revocation is named, and
processes in fallback against a server that revokes the previous token do not start a war."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
import requests

from k2_shared_token import SharedTokenProvider, TokenUnavailableError
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis

Make = Callable[..., SharedTokenProvider]


def _ping(provider: SharedTokenProvider, fake: FakeK2Server) -> int:
    session = requests.Session()
    session.auth = provider.auth()
    try:
        return session.get(fake.base_url + "/api/ping").status_code
    finally:
        session.close()


def test_a_shared_token_revoked_by_someone_else_is_named_and_replaced(
    make_provider: Make, fake_k2: FakeK2Server, all_logs: pytest.LogCaptureFixture
) -> None:
    provider = make_provider()
    token = provider.get_token()
    fake_k2.revoke_token(token)  # another deployment with the same client id, say
    assert _ping(provider, fake_k2) == 200  # the one retry, with a new token
    warnings = [r.getMessage() for r in all_logs.records if "another deployment" in r.getMessage()]
    assert len(warnings) == 1 and provider.namespace in warnings[0]
    assert token not in all_logs.text
    assert fake_k2.exchanges == 2


def test_our_own_rotation_is_not_taken_for_a_foreign_revocation(
    make_provider: Make, fake_k2: FakeK2Server, all_logs: pytest.LogCaptureFixture
) -> None:
    provider = make_provider()
    token = provider.get_token()
    provider.invalidate(token)  # this fleet dropped it (a revoke(), an operator)
    assert _ping(provider, fake_k2) == 200
    assert "another deployment" not in all_logs.text


def test_processes_in_fallback_against_revoke_previous_do_not_start_a_war(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_server: EmbeddedRedis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    fake_k2.token_mode = "revoke_previous"
    a, b = (make_provider(redis_cooldown=60, redis_timeout=0.25) for _ in range(2))
    redis_server.stop()  # both carry on without Redis, each with its own token
    a.get_token()
    b.get_token()  # ... which revokes a's
    outcomes: list[object] = []
    for _ in range(10):
        for p in (a, b):
            try:
                outcomes.append(_ping(p, fake_k2))
            except TokenUnavailableError:
                outcomes.append("unavailable")
    print(
        f"\n[fallback war] 20 calls: {outcomes.count(401)} ended on a 401, "
        f"{outcomes.count('unavailable')} refused without a request, {fake_k2.exchanges} exchanges"
    )
    # Each process replaced its own rejected token once at once, then waits out its pause:
    # callers are refused meanwhile rather than each process revoking the other's token again.
    assert fake_k2.exchanges <= 4
    assert outcomes.count(200) >= 1
    assert outcomes.count(401) <= fake_k2.exchanges
    wars = [r for r in all_logs.records if "revoke each other" in r.getMessage()]
    assert 1 <= len(wars) <= 2  # once per process


def test_a_replaced_token_rejected_teaches_revoke_and_exchanges_are_then_announced(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    fake_k2.token_mode = "revoke_previous"
    fake_k2.expires_in = 600
    a = make_provider(refresh_ahead=120, min_validity=10)
    b = make_provider(refresh_ahead=120, min_validity=10, backplane=False)  # keeps its copy
    old = a.get_token()
    assert b.get_token() == old
    redis_client.pexpire(a.keys.token, 100_000)  # into the refresh window
    a._local.held = None
    assert a.get_token() == old
    assert a.wait_for_refresh(5)  # a exchanged: K2 revoked the old token
    assert _ping(b, fake_k2) == 200  # b's copy is refused, reported, replaced by the shared one
    assert redis_client.get(a.keys.server) == b"revoke"
    listener = redis_client.pubsub()
    listener.subscribe(a.keys.channel)
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    a.invalidate(a.get_token())  # the next exchange begins with an announcement
    a.get_token()
    kinds = [listener.get_message(timeout=2) for _ in range(3)]
    listener.close()
    assert [m["data"][:1] for m in kinds if m] == [b"D", b"X", b"T"]
