"""ProviderRegistry: many (base URL, client id) pairs in one process, on one Redis client.

What matters to a multi-tenant service: a pair always maps to one provider and one namespace,
no tenant or environment ever gets another's token, the whole registry uses one connection
pool, and a mistake (the same pair with another secret) fails loudly without echoing a secret.
Against a real redis-server and fake K2 servers that know several clients; tokens are checked
at the fake server by introspection, which answers "active" only to the client it issued to.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from k2_shared_token import AsyncProviderRegistry, ProviderRegistry
from k2_shared_token._core.errors import ConfigurationError
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_until

CLIENTS = {
    "tenant-a-client-id": "tenant-a-secret-not-for-logs-1",
    "tenant-b-client-id": "tenant-b-secret-not-for-logs-2",
    "tenant-c-client-id": "tenant-c-secret-not-for-logs-3",
}


@pytest.fixture
def sandbox() -> Iterator[FakeK2Server]:
    with FakeK2Server(clients=CLIENTS) as server:
        yield server


@pytest.fixture
def production() -> Iterator[FakeK2Server]:
    """A second K2 with the same client ids and secrets: only the base URL tells them apart."""
    with FakeK2Server(clients=CLIENTS) as server:
        yield server


@pytest.fixture
def registry(redis_server: EmbeddedRedis, sandbox: FakeK2Server) -> Iterator[ProviderRegistry]:
    with ProviderRegistry(redis=redis_server.url, base_url=sandbox.base_url) as made:
        yield made


def active_for(server: FakeK2Server, client_id: str, token: str) -> bool:
    """Whether ``server`` says ``token`` is live and was issued to ``client_id``."""
    reply = requests.post(
        server.base_url + "/oauth/introspect",
        data={"client_id": client_id, "client_secret": CLIENTS[client_id], "token": token},
        timeout=10,
    )
    reply.raise_for_status()
    return bool(reply.json()["active"])


def test_the_same_pair_returns_the_same_provider(
    registry: ProviderRegistry, sandbox: FakeK2Server
) -> None:
    client_id, secret = next(iter(CLIENTS.items()))
    first = registry.provider(client_id, secret, base_url=sandbox.base_url)
    # Another spelling of the same URL, the default URL, and no secret once registered.
    assert registry.provider(client_id, secret, base_url=sandbox.base_url.upper() + "/") is first
    assert registry.provider(client_id, secret) is first
    assert registry.provider(client_id) is first
    assert len(registry) == 1
    assert registry.get_token(client_id) == registry.get_token(client_id, secret)
    assert sandbox.exchanges == 1


def test_tenants_and_environments_never_share_a_token(
    redis_server: EmbeddedRedis,
    registry: ProviderRegistry,
    sandbox: FakeK2Server,
    production: FakeK2Server,
) -> None:
    servers = (sandbox, production)
    tokens: dict[tuple[int, str], str] = {}
    namespaces = set()
    for where, server in enumerate(servers):
        for client_id, secret in CLIENTS.items():
            provider = registry.provider(client_id, secret, base_url=server.base_url)
            namespaces.add(provider.namespace)
            tokens[where, client_id] = provider.get_token()
    assert len(namespaces) == len(tokens) == 6
    assert len(set(tokens.values())) == 6
    assert sandbox.exchanges == production.exchanges == len(CLIENTS)
    for (where, owner), token in tokens.items():
        for other_where, server in enumerate(servers):
            for client_id in CLIENTS:
                mine = (other_where, client_id) == (where, owner)
                assert active_for(server, client_id, token) is mine, (where, owner)

    # Another process's registry on the same Redis finds each pair's own token, no exchange.
    with ProviderRegistry(redis=redis_server.url, base_url=sandbox.base_url) as other:
        for (where, client_id), token in tokens.items():
            base_url = servers[where].base_url
            assert other.get_token(client_id, CLIENTS[client_id], base_url=base_url) == token
    assert sandbox.exchanges == production.exchanges == len(CLIENTS)


def test_every_provider_uses_the_registry_client_and_one_connection(
    registry: ProviderRegistry, redis_client: redis.Redis
) -> None:
    providers = [registry.provider(cid, secret) for cid, secret in CLIENTS.items()]
    for provider in providers:
        assert provider._store.client is registry.client
        provider.get_token()
    own = redis_client.client_id()
    wait_until(
        lambda: len(redis_client.pubsub_channels()) == len(providers), 5, "the subscriptions"
    )
    others = [c for c in redis_client.client_list() if int(c["id"]) != own]
    # Three namespaces warmed one after another: one pooled connection for commands, and one
    # subscription (the fleet backplane) for all three namespaces' channels.
    assert sorted(int(c["sub"]) for c in others) == [0, len(providers)]


def test_the_same_pair_with_another_secret_is_refused_without_echoing_either(
    registry: ProviderRegistry, all_logs: pytest.LogCaptureFixture
) -> None:
    client_id, secret = next(iter(CLIENTS.items()))
    provider = registry.provider(client_id, secret)
    wrong = "a-different-secret-that-must-not-leak"
    with pytest.raises(ConfigurationError) as caught:
        registry.provider(client_id, wrong)
    with pytest.raises(ConfigurationError):
        registry.get_token(client_id, wrong)
    shown = f"{caught.value} {caught.value!r}"
    assert provider.namespace in shown
    assert secret not in shown
    assert wrong not in shown
    assert secret not in all_logs.text
    assert wrong not in all_logs.text
    assert registry.provider(client_id, secret) is provider  # the registered one is untouched


def test_a_pair_seen_for_the_first_time_needs_its_secret(registry: ProviderRegistry) -> None:
    with pytest.raises(ConfigurationError, match="pass client_secret"):
        registry.provider("never-registered")
    assert len(registry) == 0


def test_remove_lets_a_rotated_secret_in_and_keeps_the_shared_token(
    registry: ProviderRegistry, sandbox: FakeK2Server
) -> None:
    client_id, secret = next(iter(CLIENTS.items()))
    old = registry.provider(client_id, secret)
    token = old.get_token()
    assert registry.remove(client_id)
    assert not registry.remove(client_id)
    rotated = registry.provider(client_id, "the-rotated-secret")
    assert rotated is not old
    assert rotated.namespace == old.namespace
    assert rotated.get_token() == token  # read from Redis: the secret is not in the namespace
    assert sandbox.exchanges == 1


def test_concurrent_first_calls_build_one_provider(registry: ProviderRegistry) -> None:
    client_id, secret = next(iter(CLIENTS.items()))
    start = threading.Barrier(16)
    got: list[Any] = []

    def ask() -> None:
        start.wait(10)
        got.append(registry.provider(client_id, secret))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(got) == 16
    assert len({id(p) for p in got}) == 1
    assert len(registry) == 1


def test_close_closes_the_providers_and_the_client_it_made(
    redis_server: EmbeddedRedis, sandbox: FakeK2Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[object] = []
    registry = ProviderRegistry(redis=redis_server.url, base_url=sandbox.base_url)
    for client_id, secret in CLIENTS.items():
        provider = registry.provider(client_id, secret)
        provider.get_token()
        monkeypatch.setattr(provider, "close", lambda p=provider: closed.append(p))
    monkeypatch.setattr(registry.client, "close", lambda: closed.append(registry.client))
    registry.close()
    registry.close()  # idempotent
    assert len(closed) == len(CLIENTS) + 1
    assert closed[-1] is registry.client  # after the providers that use it
    assert len(registry) == 0
    with pytest.raises(ConfigurationError, match="closed"):
        registry.provider(CLIENT_ID, CLIENT_SECRET)


def test_close_leaves_a_client_it_was_given_open(
    redis_client: redis.Redis, sandbox: FakeK2Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[object] = []
    monkeypatch.setattr(redis_client, "close", lambda: closed.append(redis_client))
    with ProviderRegistry(redis=redis_client, base_url=sandbox.base_url) as registry:
        provider = registry.provider(*next(iter(CLIENTS.items())))
        provider.get_token()
        assert provider._store.client is redis_client
    assert closed == []


def test_settings_are_checked_when_the_registry_is_built(redis_server: EmbeddedRedis) -> None:
    with pytest.raises(ConfigurationError, match="belong to provider"):
        ProviderRegistry(redis=redis_server.url, client_id="x")
    with pytest.raises(ConfigurationError, match="unknown provider setting"):
        ProviderRegistry(redis=redis_server.url, refresh_ahed=10)
    with pytest.raises(ConfigurationError, match="min_validity"):
        ProviderRegistry(redis=redis_server.url, refresh_ahead=5, min_validity=10)
    with pytest.raises(ConfigurationError, match="redis"):
        ProviderRegistry(redis=" ")


def test_async_registry_shares_its_client_and_the_tokens_of_sync_workers(
    redis_server: EmbeddedRedis, registry: ProviderRegistry, sandbox: FakeK2Server
) -> None:
    sync_tokens = {cid: registry.get_token(cid, secret) for cid, secret in CLIENTS.items()}

    async def main() -> tuple[dict[str, set[str]], bool]:
        async with AsyncProviderRegistry(
            redis=redis_server.url, base_url=sandbox.base_url
        ) as async_registry:
            seen = {
                cid: set(
                    await asyncio.gather(
                        *(async_registry.get_token(cid, secret) for _ in range(20))
                    )
                )
                for cid, secret in CLIENTS.items()
            }
            shared = all(
                async_registry.provider(cid)._store.client is async_registry.client
                for cid in CLIENTS
            )
        return seen, shared

    seen, shared = asyncio.run(main())
    assert shared
    assert seen == {cid: {token} for cid, token in sync_tokens.items()}
    assert sandbox.exchanges == len(CLIENTS)
