"""The official k2-connect SDK, fed by the shared token, against the fake K2 server."""

from __future__ import annotations

from collections.abc import Callable

import k2connect
import pytest
from k2connect.exceptions import K2Error
from k2connect.polling_service import PollingService

from k2_shared_token import SharedTokenProvider
from k2_shared_token.contrib.sdk import CurrentTokenService, SharedTokens
from k2_shared_token.testing.fake_k2 import FakeK2Server
from tests.conftest import CLIENT_ID, CLIENT_SECRET

Make = Callable[..., SharedTokenProvider]


def test_shared_tokens_is_a_drop_in_for_k2connect_tokens(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    k2connect.initialize(CLIENT_ID, CLIENT_SECRET, fake_k2.base_url + "/")
    sdk_reply = k2connect.Tokens.request_access_token()  # the SDK's own: a fresh exchange
    shared = SharedTokens(make_provider())
    reply = shared.request_access_token()
    assert set(sdk_reply) >= {"access_token", "token_type", "expires_in", "created_at"}
    assert set(reply) == set(sdk_reply)
    assert shared.get_access_token(reply) == reply["access_token"]
    assert 3590 <= shared.get_token_expiry_duration(reply) <= 3600
    before = fake_k2.exchanges
    for _ in range(20):  # the SDK would exchange 20 times; the shared cache not once more
        assert shared.request_access_token()["access_token"] == reply["access_token"]
    assert fake_k2.exchanges == before


def test_current_token_service_follows_rollovers_and_recovers_from_401(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    provider = make_provider()
    base = fake_k2.base_url + "/"
    k2connect.initialize(CLIENT_ID, CLIENT_SECRET, base)
    polling = CurrentTokenService(provider, k2connect.Polling)
    status_url = f"{base}api/v1/polling/7"
    assert polling.polling_request_status(status_url)["ok"] is True

    # K2 revokes the token: the SDK alone would fail every call from now on.
    old = provider.get_token()
    fake_k2.revoke_token(old)
    with pytest.raises(K2Error):
        PollingService(base_url=base, access_token=old).polling_request_status(status_url)
    assert polling.polling_request_status(status_url)["ok"] is True
    assert provider.get_token() != old
    assert fake_k2.api_unauthorized == 2  # the bare SDK call, and our one retried call


def test_current_token_service_does_not_hide_other_errors(make_provider: Make) -> None:
    def factory(access_token: str) -> object:
        class Service:
            def fail(self) -> None:
                raise K2Error({"error_code": 400, "error_content": "bad request"})

        return Service()

    service = CurrentTokenService(make_provider(), factory)
    with pytest.raises(K2Error):
        service.fail()
