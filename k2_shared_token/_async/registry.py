"""Many K2 applications in one process on one Redis client: :class:`AsyncProviderRegistry`.

A multi-tenant service (a client id per merchant, or sandbox and production side by side) needs
one provider per (base URL, client id). The registry makes one Redis client and hands it to
every provider it builds, so the whole process shares one pool; what it checks and how it finds
a provider is :class:`.._registry.RegistryBase`'s, shared by both sides.
"""

from __future__ import annotations

from .._registry import RegistryBase
from .provider import AsyncSharedTokenProvider


class AsyncProviderRegistry(RegistryBase[AsyncSharedTokenProvider]):
    """Providers for many (base URL, client id) pairs on one Redis client.

    ``registry = AsyncProviderRegistry(redis="redis://...", refresh_ahead=..., ...)``, then
    ``registry.get_token(client_id, client_secret)`` or ``registry.provider(...)``. Safe to
    share between threads and tasks; build it once per process (before a fork is fine).
    """

    _asyncio = True  # sync: True -> False

    def _provider_class(self) -> type[AsyncSharedTokenProvider]:
        return AsyncSharedTokenProvider

    async def get_token(
        self, client_id: str, client_secret: str | None = None, *, base_url: str | None = None
    ) -> str:
        """A valid token of (``base_url``, ``client_id``): ``provider(...).get_token()``."""
        return await self.provider(client_id, client_secret, base_url=base_url).get_token()

    async def remove(self, client_id: str, *, base_url: str | None = None) -> bool:
        """Close and forget one provider (a removed tenant, a rotated secret); the shared token
        stays in Redis. True if there was one."""
        provider = self._pop(client_id, base_url)
        if provider is not None:
            await provider.aclose()
        return provider is not None

    async def aclose(self) -> None:
        """Close every provider, then the Redis client if the registry made it. Idempotent."""
        providers = self._take_all()
        if providers is None:
            return
        for provider in providers:
            await provider.aclose()
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> AsyncProviderRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
