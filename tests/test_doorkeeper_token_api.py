"""The token API (revoke, introspect, token info) against a real Doorkeeper 5.5, on both
providers: Doorkeeper's own replies (integer ``exp``/``iat``, 403 on a refused revoke, 401 from
token info for a dead token) parse as the contract says. ``make test-doorkeeper`` runs it."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta, timezone

import pytest

from k2_shared_token import (
    Introspection,
    InvalidCredentialsError,
    InvalidTokenError,
    SharedTokenProvider,
    TokenRequestRejectedError,
)
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.doorkeeper.server import DoorkeeperServer

pytest_plugins = ("tests.doorkeeper.fixtures",)
pytestmark = pytest.mark.doorkeeper

Make = Callable[..., SharedTokenProvider]


def test_revoke_introspect_and_token_info_against_doorkeeper(
    doorkeeper: Callable[..., DoorkeeperServer], make_provider: Make
) -> None:
    dk = doorkeeper(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    provider = make_provider(base_url=dk.base_url)
    token = provider.get_token()

    seen = provider.introspect()
    assert (seen.active, seen.client_id, seen.token_type, seen.scope) == (
        True, CLIENT_ID, "Bearer", ""
    )  # fmt: skip
    assert seen.exp is not None
    assert seen.iat is not None
    assert isinstance(seen.raw["exp"], int)  # stock Doorkeeper: integers, read as UTC
    assert seen.exp.tzinfo == timezone.utc
    assert seen.exp - seen.iat == timedelta(seconds=3600)
    assert abs(seen.iat.timestamp() - time.time()) < 10

    info = provider.token_info()
    assert info.application_uid == CLIENT_ID
    assert info.expires_in is not None
    assert 3590 <= info.expires_in <= 3600
    assert info.created_at == seen.iat

    wrong = make_provider(base_url=dk.base_url, client_secret="not-the-secret")
    with pytest.raises(TokenRequestRejectedError) as refused:
        wrong.revoke(token)
    assert (refused.value.status, refused.value.error) == (403, "unauthorized_client")
    with pytest.raises(InvalidCredentialsError):
        wrong.introspect(token)
    assert dk.ping(token).status == 200  # the refused revoke left it alone

    before = dk.counts()["token_issued"]
    assert provider.revoke() is True
    assert dk.ping(token).status == 401
    assert provider.introspect(token) == Introspection(active=False)
    with pytest.raises(InvalidTokenError):
        provider.token_info(token)
    assert provider.revoke("never-issued") is False  # Doorkeeper: 200 {} for an unknown token
    new = provider.get_token()
    assert new != token
    assert dk.ping(new).status == 200
    assert dk.counts()["token_issued"] == before + 1
