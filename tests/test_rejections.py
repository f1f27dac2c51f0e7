"""What a 401 says about the server, on both providers: a foreign revocation is named, and
processes in fallback against a server that revokes the previous token do not start a war."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from k2_shared_token import SharedTokenProvider
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
    statuses = [_ping(p, fake_k2) for _ in range(10) for p in (a, b)]
    print(
        f"\n[fallback war] 20 calls: {statuses.count(401)} ended on a 401, "
        f"{fake_k2.exchanges} exchanges"
    )
    # Each process replaced its own rejected token once, then waits out its pause: the calls
    # in between end on a 401 rather than each revoking the other's token again.
    assert fake_k2.exchanges <= 4
    assert statuses.count(200) >= 1
    wars = [r for r in all_logs.records if "revoke each other" in r.getMessage()]
    assert 1 <= len(wars) <= 2  # once per process
