"""Encryption of the cached token at rest (``encryption_keys``), against a real Redis.

What matters is less secrecy than authenticity: with encryption on, whoever can write to Redis
but has no key can neither read the fleet's token nor plant one of their own, and a value moved
between namespaces does not open.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

import pytest
import redis

from k2_shared_token import ConfigurationError, SharedTokenProvider
from k2_shared_token._redis import crypto
from k2_shared_token._redis.codec import decode, encode
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import CLIENT_ID, CLIENT_SECRET, provider_kwargs
from tests.faultkit import assert_no_leak, redis_contents, stored_bytes, warnings_with

Make = Callable[..., SharedTokenProvider]
UNREADABLE = "unreadable token value"


def issued_tokens(fake_k2: FakeK2Server) -> list[str]:
    return [record.token for record in fake_k2.issued]


def stored(client: redis.Redis, provider: SharedTokenProvider) -> bytes:
    return stored_bytes(client, provider.keys.token)


def test_the_value_in_redis_does_not_contain_the_token(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    provider = make_provider(encryption_keys=[crypto.new_key()])
    token = provider.get_token()
    raw = stored(redis_client, provider)
    assert token.encode() not in raw
    payload = raw.split(b":", 2)[2]
    assert payload.startswith(b"~")  # sealed; the fence and digest stay readable for Lua
    with pytest.raises(ValueError, match="no encryption key"):
        decode(raw)  # a reader without the key cannot use it
    assert not [blob for blob in redis_contents(redis_client) if token.encode() in blob]
    assert_no_leak(secret=CLIENT_SECRET, tokens=[token], client=redis_client)


def test_two_workers_with_the_same_key_share_one_token(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    key = crypto.new_key()
    first, second = make_provider(encryption_keys=[key]), make_provider(encryption_keys=[key])
    assert first.get_token() == second.get_token()
    assert fake_k2.exchanges == 1


def test_a_worker_with_another_key_reads_a_miss_then_overwrites(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    owner = make_provider(encryption_keys=[crypto.new_key()])
    stranger_key = crypto.new_key()
    stranger = make_provider(encryption_keys=[stranger_key])
    theirs = owner.get_token()
    mine = stranger.get_token()
    assert mine != theirs
    assert fake_k2.exchanges == 2
    assert warnings_with(all_logs.records, UNREADABLE)
    # Overwritten with a value the stranger's fleet can open.
    assert make_provider(encryption_keys=[stranger_key]).get_token() == mine
    assert fake_k2.exchanges == 2
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=issued_tokens(fake_k2),
        logs=all_logs.records,
        client=redis_client,
    )


def test_key_rotation_needs_no_flag_day(
    make_provider: Make, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    """Deploy the new key second, then first, then drop the old one: no step orphans the cache."""
    k1, k2 = crypto.new_key(), crypto.new_key()
    old = make_provider(encryption_keys=[k1])
    rotating = make_provider(encryption_keys=[k2, k1])
    first = old.get_token()
    assert rotating.get_token() == first  # opens the old key's value: no exchange
    assert fake_k2.exchanges == 1

    assert rotating.invalidate(first) is True
    second = rotating.get_token()  # written under the new key
    assert fake_k2.exchanges == 2
    assert make_provider(encryption_keys=[k2]).get_token() == second
    assert make_provider(encryption_keys=[k1, k2]).get_token() == second
    assert fake_k2.exchanges == 2
    assert second.encode() not in stored(redis_client, rotating)


def test_a_plaintext_value_is_refused_so_nobody_can_plant_a_token(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    plain = make_provider()
    plain_token = plain.get_token()
    encrypted = make_provider(encryption_keys=[crypto.new_key()])
    own = encrypted.get_token()
    assert own != plain_token
    assert warnings_with(all_logs.records, UNREADABLE)

    # Someone with write access to Redis plants a well-formed plaintext value of their own.
    planted = "planted-by-someone-without-the-key-0123456789"
    redis_client.set(encrypted.keys.token, encode(planted, "Bearer", 3600, 99), px=3_600_000)
    victim = make_provider(encryption_keys=[crypto.new_key()], local_cache=False)
    for _ in range(3):
        assert victim.get_token() != planted
    assert fake_k2.is_valid(victim.get_token())
    assert_no_leak(
        secret=CLIENT_SECRET,
        tokens=[*issued_tokens(fake_k2), planted],
        logs=all_logs.records,
        client=redis_client,
    )


def test_a_sealed_value_copied_to_another_namespace_does_not_open(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, all_logs: pytest.LogCaptureFixture
) -> None:
    """The associated data binds a value to its namespace's key: a token of application A
    copied under application B's key must not become B's token, even with a shared key."""
    key = crypto.new_key()
    clients = {"client-a": "secret-a-123456789", "client-b": "secret-b-123456789"}
    with FakeK2Server(clients=clients) as server:
        common: dict[str, Any] = {
            "base_url": server.base_url,
            "redis": redis_server.url,
            "encryption_keys": [key],
        }
        with (
            SharedTokenProvider(
                client_id="client-a", client_secret=clients["client-a"], **common
            ) as a,
            SharedTokenProvider(
                client_id="client-b", client_secret=clients["client-b"], **common
            ) as b,
        ):
            assert a.namespace != b.namespace
            token_a = a.get_token()
            raw = stored(redis_client, a)
            redis_client.set(b.keys.token, raw, px=3_600_000)
            token_b = b.get_token()
            assert token_b != token_a
            assert server.exchanges == 2
            assert any(
                "fails authentication" in m for m in warnings_with(all_logs.records, UNREADABLE)
            )
            assert stored(redis_client, b) != raw  # overwritten with b's own


def test_a_tampered_sealed_value_reads_as_a_miss(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    key = crypto.new_key()
    writer = make_provider(encryption_keys=[key])
    original = writer.get_token()
    raw = bytearray(stored(redis_client, writer))
    # One base64 digit of the tag, clear of the last digits (whose low bits may be padding).
    raw[-6] = ord("A") if raw[-6] != ord("A") else ord("B")
    redis_client.set(writer.keys.token, bytes(raw), px=3_600_000)
    reader = make_provider(encryption_keys=[key])
    assert reader.get_token() != original
    assert warnings_with(all_logs.records, UNREADABLE)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([""], id="empty"),
        pytest.param(["not-a-key"], id="short text"),
        pytest.param([base64.urlsafe_b64encode(os.urandom(16)).decode()], id="16 bytes"),
        pytest.param([base64.urlsafe_b64encode(os.urandom(33)).decode()], id="33 bytes"),
        pytest.param([os.urandom(31)], id="31 raw bytes"),
        pytest.param(["\u00e9" * 43], id="not ascii"),
        pytest.param([crypto.new_key(), "oops"], id="one good, one bad"),
        pytest.param(crypto.new_key(), id="a string, not a list of keys"),
        pytest.param([None], id="None (an unset environment variable)"),
        pytest.param([12345], id="a number"),
    ],
)
def test_bad_encryption_keys_fail_at_construction(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, bad: object
) -> None:
    with pytest.raises(ConfigurationError) as info:
        SharedTokenProvider(
            **provider_kwargs(redis_server.url, fake_k2.base_url, encryption_keys=bad)
        )
    message = str(info.value)
    assert "key" in message
    material = bad if isinstance(bad, list) else [bad]
    for item in material:
        if isinstance(item, str) and len(item) > 8:
            assert item not in message  # key material is never echoed
    assert fake_k2.token_requests == 0


def test_raw_32_byte_keys_are_accepted(make_provider: Make, fake_k2: FakeK2Server) -> None:
    key = os.urandom(32)
    first = make_provider(encryption_keys=[key])
    second = make_provider(encryption_keys=[base64.urlsafe_b64encode(key).decode()])
    assert first.get_token() == second.get_token()  # the same key in either form
    assert fake_k2.exchanges == 1


def test_from_env_reads_k2_token_encryption_keys(
    make_provider: Make,
    redis_server: EmbeddedRedis,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
) -> None:
    k1, k2 = crypto.new_key(), crypto.new_key()
    env = {
        "K2_CLIENT_ID": CLIENT_ID,
        "K2_CLIENT_SECRET": CLIENT_SECRET,
        "K2_BASE_URL": fake_k2.base_url,
        "K2_REDIS_URL": redis_server.url,
        crypto.ENV_KEYS: f" {k2} , {k1} ",
    }
    old = make_provider(encryption_keys=[k1])
    token = old.get_token()
    with SharedTokenProvider.from_env(env) as rotated:
        assert rotated.get_token() == token  # decrypts with the second key
        assert rotated.invalidate(token)
        new = rotated.get_token()
    assert new.encode() not in stored(redis_client, old)
    assert make_provider(encryption_keys=[k2]).get_token() == new  # encrypted with the first
    with pytest.raises(ConfigurationError):
        SharedTokenProvider.from_env({**env, crypto.ENV_KEYS: "short,keys"})


def test_no_key_material_in_logs_or_reprs(
    make_provider: Make, fake_k2: FakeK2Server, all_logs: pytest.LogCaptureFixture
) -> None:
    key = crypto.new_key()
    provider = make_provider(encryption_keys=[key])
    provider.get_token()
    for text in (all_logs.text, repr(provider), str(provider)):
        assert key not in text
