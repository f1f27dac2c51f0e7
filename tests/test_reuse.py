"""A server that hands back the live token (Doorkeeper's ``reuse_access_token``), on both
providers, against the fake K2 (which rounds ``expires_in`` as Doorkeeper does and answers 0
for a token about to die). The real Doorkeeper figures come from ``tests/test_doorkeeper.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
import requests

from k2_shared_token import SharedTokenProvider
from k2_shared_token.testing.fake_k2 import FakeK2Server

Make = Callable[..., SharedTokenProvider]


def test_reuse_is_learned_once_and_no_call_goes_out_with_an_expired_token(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis, all_logs: Any
) -> None:
    fake_k2.token_mode = "reuse"
    fake_k2.expires_in = 3
    provider = make_provider(refresh_ahead=1.5, min_validity=0.5, lock_lease=3, wait_timeout=5)
    session = requests.Session()
    session.auth = provider.auth()
    lifetimes = 3
    deadline = time.monotonic() + lifetimes * 3 + 1.5
    statuses: list[int] = []
    while time.monotonic() < deadline:
        statuses.append(session.get(fake_k2.base_url + "/api/ping").status_code)
    tokens = {r.token for r in fake_k2.issued}
    requests_per_token = fake_k2.token_requests / len(tokens)
    print(
        f"\n[reuse] {len(statuses)} API calls, {statuses.count(401)} final 401s, "
        f"{fake_k2.api_unauthorized} sent with a dead token; {fake_k2.token_requests} token "
        f"requests for {len(tokens)} tokens ({requests_per_token:.2f} per token)"
    )
    assert fake_k2.api_unauthorized == 0
    assert set(statuses) == {200}
    assert redis_client.get(provider.keys.server) == b"reuse"
    assert requests_per_token <= 2.0
    assert not [r for r in all_logs.records if "malformed" in r.getMessage()]
