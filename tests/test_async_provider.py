"""The asyncio provider: same flows, same keys, so async and threaded workers share one token.

Each test runs its own event loop with ``asyncio.run`` against a real redis-server and the fake
K2 server; concurrency is real tasks gathered at once, ordered by the fake server's gates.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from k2_shared_token import AsyncSharedTokenProvider, SharedTokenProvider
from k2_shared_token._core.errors import InvalidCredentialsError, SharedCacheError
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import provider_kwargs


def kwargs(redis_server: EmbeddedRedis, fake_k2: FakeK2Server, **extra: Any) -> dict[str, Any]:
    return provider_kwargs(redis_server.url, fake_k2.base_url, **extra)


def test_many_tasks_one_exchange_and_a_sync_worker_shares_it(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    fake_k2.latency = 0.05

    async def main() -> list[str]:
        async with AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2)) as provider:
            return list(await asyncio.gather(*(provider.get_token() for _ in range(200))))

    tokens = asyncio.run(main())
    assert len(set(tokens)) == 1
    assert fake_k2.exchanges == 1
    with SharedTokenProvider(**kwargs(redis_server, fake_k2)) as sync_provider:
        assert sync_provider.get_token() == tokens[0]
    assert fake_k2.exchanges == 1


def test_async_worker_reads_the_token_a_sync_worker_wrote(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    with SharedTokenProvider(**kwargs(redis_server, fake_k2)) as sync_provider:
        token = sync_provider.get_token()

    async def main() -> str:
        async with AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2)) as provider:
            return await provider.get_token()

    assert asyncio.run(main()) == token
    assert fake_k2.exchanges == 1


def test_async_waiter_is_woken_by_a_sync_holder(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    """The sync worker holds the lock inside K2; the async one waits on the same channel."""
    fake_k2.pause_tokens()
    sync_provider = SharedTokenProvider(**kwargs(redis_server, fake_k2))
    try:

        async def main() -> tuple[str, str]:
            async with AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2)) as provider:
                holder = asyncio.create_task(asyncio.to_thread(sync_provider.get_token))
                await asyncio.to_thread(fake_k2.wait_for_token_requests, 1, 10)
                waiter = asyncio.create_task(provider.get_token())
                fake_k2.resume_tokens()
                return await holder, await waiter

        held, waited = asyncio.run(main())
    finally:
        fake_k2.resume_tokens()
        sync_provider.close()
    assert held == waited
    assert fake_k2.token_requests == 1


def test_httpx_auth_recovers_from_a_revoked_token_with_one_retry(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2)) as provider:
            token = await provider.get_token()
            fake_k2.revoke_token(token)
            async with httpx.AsyncClient(auth=provider.httpx_auth()) as http:
                response = await http.get(fake_k2.base_url + "/api/v1/ping")
            return response.status_code, len(response.history)

    status, retries = asyncio.run(main())
    assert (status, retries) == (200, 1)
    assert fake_k2.exchanges == 2


def test_sync_httpx_auth_recovers_the_same_way(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    with SharedTokenProvider(**kwargs(redis_server, fake_k2)) as provider:
        fake_k2.revoke_token(provider.get_token())
        with httpx.Client(auth=provider.httpx_auth()) as http:
            response = http.get(fake_k2.base_url + "/api/v1/ping")
    assert response.status_code == 200
    assert len(response.history) == 1


def test_async_invalid_credentials_raise_and_hold_the_fleet_off(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    bad = kwargs(redis_server, fake_k2, client_secret="wrong-secret")

    async def main() -> None:
        async with AsyncSharedTokenProvider(**bad) as provider:
            with pytest.raises(InvalidCredentialsError):
                await provider.get_token()
        async with AsyncSharedTokenProvider(**bad) as provider:
            with pytest.raises(InvalidCredentialsError):
                await provider.get_token()

    asyncio.run(main())
    assert fake_k2.token_requests == 1


def test_async_falls_back_to_a_local_token_when_redis_is_down(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    redis_server.kill()

    async def main(**extra: Any) -> str:
        async with AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2, **extra)) as provider:
            first = await provider.get_token()
            assert await provider.get_token() == first
            assert provider.stats()["redis_error"] == 1
            return first

    assert asyncio.run(main(redis_timeout=0.2))
    assert fake_k2.exchanges == 1
    with pytest.raises(SharedCacheError):
        asyncio.run(main(redis_timeout=0.2, on_redis_error="raise"))


def test_async_invalidate_is_compare_and_delete(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    async def main() -> tuple[bool, bool, str, str]:
        async with AsyncSharedTokenProvider(**kwargs(redis_server, fake_k2)) as provider:
            old = await provider.get_token()
            first = await provider.invalidate(old)
            new = await provider.get_token()
            second = await provider.invalidate(old)
            return first, second, old, new

    first, second, old, new = asyncio.run(main())
    assert (first, second) == (True, False)
    assert old != new
