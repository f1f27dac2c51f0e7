"""The provider for asyncio workers (FastAPI, aiohttp): same semantics, same Redis layout.

:class:`AsyncSharedTokenProvider` takes the same keyword arguments as
:class:`.SharedTokenProvider` and runs the same flows (:mod:`.flow`) with the same decisions
(:mod:`.provider_core`) against the same keys and Lua scripts (:mod:`.commands`), so asyncio and
threaded processes of one deployment share one token, one lock and one hold-off. I/O goes
through ``redis.asyncio`` and httpx (the ``asyncio`` extra); the hot path is the same attribute
read and clock comparison, awaited without suspending.

    provider = AsyncSharedTokenProvider.from_env()
    async with httpx.AsyncClient(auth=provider.httpx_auth()) as http:
        await http.get(...)
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from ._background import AsyncBackgroundRefresh
from ._core import flow, metrics
from ._core.errors import K2TokenError, SharedCacheError
from ._core.tokens import AccessToken, Held, Snapshot
from ._k2.async_exchange import AsyncExchangeClient
from ._provider_core import ProviderCore
from ._redis.async_store import AsyncRedisStore
from ._singleflight import AsyncSingleFlight
from .contrib.httpx_auth import K2HttpxAuth

T = TypeVar("T")


class AsyncSharedTokenProvider(ProviderCore):
    """One K2 access token shared through Redis, for asyncio code. Build it once per process
    (inside or outside a running loop; connections open on first use) and ``await`` its
    methods. ``session``, if given, is an ``httpx.AsyncClient`` for the exchange."""

    _asyncio = True

    def _connect(self, client: Any, session: Any) -> None:
        self._store = AsyncRedisStore(client, self._ops)
        self._exchange = AsyncExchangeClient(self.settings, session)
        self._flight: AsyncSingleFlight[Held] = AsyncSingleFlight()
        self._background = AsyncBackgroundRefresh(self._refresh_job)

    # -- the hot path ------------------------------------------------------------------------

    async def get(self) -> AccessToken:
        """A token with at least ``min_validity`` seconds left."""
        return self._local_token() or await self._get_slow()

    async def get_token(self) -> str:
        return (await self.get()).value

    def _kick(self) -> None:
        self._background.kick()

    # -- the slow path -----------------------------------------------------------------------

    async def _get_slow(self) -> AccessToken:
        s = self.settings
        seen: Snapshot | None = None
        if not s.local_cache:
            seen = await self._shared_read()
            shared = self._windows.hold(seen) if seen is not None else None
            if shared is not None and shared.is_usable(time.monotonic()):
                self._metrics.record(metrics.SHARED_HIT)
                return shared.token
        held = await self._flight.run(lambda: self._obtain(seen), s.wait_timeout + s.lock_lease)
        if not held.is_fresh(time.monotonic()):
            self._kick()
        return held.token

    async def _shared_read(self) -> Snapshot | None:
        try:
            return await self._redis(self._store.read()) if self._shared_allowed() else None
        except SharedCacheError as exc:
            self._fallback_or_raise(exc)
            return None

    async def _obtain(self, seen: Snapshot | None) -> Held:
        held = self._still_held()
        if held is not None:
            return held
        generation = self._generation
        missed = False

        async def do(effect: flow.Effect[Any]) -> Any:
            nonlocal missed
            if not missed and isinstance(effect, (flow.Wait, flow.Exchange)):
                missed = True
                self._metrics.record(metrics.MISS)
            return await self._do(effect)

        snap = await flow.adrive(self._obtain_flow(seen), do)
        return self._obtained(snap, generation, missed)

    async def _refresh_job(self) -> float | None:
        held, generation = self._held, self._generation
        lifetime = held.lifetime if held is not None else None
        try:
            snap = await flow.adrive(self._refresh_flow(), self._do)
        except K2TokenError as exc:
            return self._refresh_failed(exc, lifetime)
        return self._refreshed(snap, generation, lifetime)

    async def _redis(self, pending: Any) -> Any:
        """Await one Redis call (a coroutine), behind the circuit breaker."""
        try:
            result = await pending
        except SharedCacheError as exc:
            self._redis_failed(exc)
            raise
        self._redis_ok()
        return result

    async def _do(self, effect: flow.Effect[Any]) -> Any:
        """Perform one effect of the core with awaited I/O."""
        started = time.monotonic()
        via_redis, call = self._io(effect)
        try:
            result = await (self._redis(call()) if via_redis else call())
        except K2TokenError:
            self._effect_failed(effect, started)
            raise
        self._after_effect(effect, result, started)
        return result

    # -- invalidation and auth ---------------------------------------------------------------

    async def invalidate(self, token: str | AccessToken) -> bool:
        """Forget ``token`` here and, if it is still the shared one, in Redis (compare and
        delete, as :meth:`.SharedTokenProvider.invalidate`)."""
        value = token.value if isinstance(token, AccessToken) else token
        self._forget(value)
        try:
            allowed = self._shared_allowed()
            deleted = bool(allowed and await self._redis(self._store.invalidate(value)))
        except SharedCacheError as exc:
            self._fallback_or_raise(exc)
            deleted = False
        return self._invalidated(value, deleted)

    def httpx_auth(self) -> K2HttpxAuth:
        """An ``httpx.Auth`` sending ``Authorization: Bearer ...`` that, on a 401, invalidates
        the token and retries the request once with a fresh one."""
        return K2HttpxAuth(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._background.aclose()
        await self._exchange.aclose()
        if self._owns_redis:
            await self._store.client.aclose()

    async def __aenter__(self) -> AsyncSharedTokenProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
