"""The provider a worker builds once and asks before every K2 call.

Data flows one way: the caller asks :meth:`SharedTokenProvider.get`; the per-process copy (L1)
answers while it is usable; when it is stale (refresh window, or older than ``local_max_age``)
a background thread refreshes or re-reads it while callers keep the current token; when this
process has nothing usable, the in-process single flight lets one thread run the
:func:`flow.obtain` core against Redis (the lock attempt reads the token too) and, on a miss,
the exchange client.

Hot path: one attribute read, one ``time.monotonic()`` comparison and a counter, no lock, no
Redis. How stale that copy may be is bounded by ``local_max_age`` (default 60 s) and by the
refresh window; a 401 seen through :meth:`auth` or an :meth:`invalidate` drops it at once.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import requests

from ._background import BackgroundRefresh
from ._core import flow, metrics
from ._core.errors import K2TokenError, SharedCacheError
from ._core.tokens import AccessToken, Held, Snapshot
from ._k2.exchange import ExchangeClient
from ._provider_core import DEFAULT_REDIS_URL, ProviderCore
from ._redis.clients import redis_client
from ._redis.store import RedisStore
from ._singleflight import SingleFlight
from .contrib.requests_auth import K2BearerAuth

if TYPE_CHECKING:
    from .contrib.httpx_auth import K2HttpxAuth

__all__ = ["DEFAULT_REDIS_URL", "SharedTokenProvider", "redis_client"]

T = TypeVar("T")

_live: weakref.WeakSet[SharedTokenProvider] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for provider in list(_live):
        provider._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SharedTokenProvider(ProviderCore):
    """One K2 access token, shared by every process that uses the same Redis and credentials.

    Build one per process (or one before fork: children reset what must not be shared) and call
    :meth:`get_token` before each K2 request, or use :meth:`auth` with a requests session. The
    keyword arguments are :class:`.ProviderCore`'s (the README lists them).
    """

    def _connect(self, client: Any, session: Any) -> None:
        self._store = RedisStore(client, self._ops)
        self._exchange = ExchangeClient(self.settings, session)
        self._flight: SingleFlight[Held] = SingleFlight()
        self._background = BackgroundRefresh(
            self._refresh_job, f"k2-token-refresh-{self.namespace}"
        )
        _live.add(self)

    # -- the hot path ------------------------------------------------------------------------

    def get(self) -> AccessToken:
        """A token with at least ``min_validity`` seconds left (or, right after an exchange,
        whatever lifetime K2 granted)."""
        return self._local_token() or self._get_slow()

    def _kick(self) -> None:
        self._background.kick()

    def get_token(self) -> str:
        return self.get().value

    # -- the slow path -----------------------------------------------------------------------

    def _get_slow(self) -> AccessToken:
        s = self.settings
        if s.local_cache:
            # Nothing usable in this process: one thread asks Redis (its lock attempt reads the
            # token too) and the others wait for it. In a cold fleet that is one connection and
            # one round trip per process, not one per thread.
            held = self._flight.run(lambda: self._obtain(None), s.wait_timeout + s.lock_lease)
        else:
            snap = self._shared_read()
            shared = self._windows.hold(snap) if snap is not None else None
            if shared is not None and shared.is_usable(time.monotonic()):
                self._metrics.record(metrics.SHARED_HIT)
                held = shared
            else:
                held = self._flight.run(lambda: self._obtain(snap), s.wait_timeout + s.lock_lease)
        if not held.is_fresh(time.monotonic()):
            self._background.kick()
        return held.token

    def _shared_read(self) -> Snapshot | None:
        """The L1-less read; in fallback mode a failing Redis reads as a miss."""
        try:
            return self._redis(self._store.read) if self._shared_allowed() else None
        except SharedCacheError as exc:
            self._fallback_or_raise(exc)
            return None

    def _obtain(self, seen: Snapshot | None) -> Held:
        held = self._still_held()
        if held is not None:
            return held
        generation = self._generation
        missed = False

        def do(effect: flow.Effect[Any]) -> Any:
            # The first wait or exchange makes this a miss; without one, the lock attempt found
            # a usable token in Redis: a shared hit.
            nonlocal missed
            if not missed and isinstance(effect, (flow.Wait, flow.Exchange)):
                missed = True
                self._metrics.record(metrics.MISS)
            return self._do(effect)

        snap = flow.drive(self._obtain_flow(seen), do)
        return self._obtained(snap, generation, missed)

    def _refresh_job(self) -> float | None:
        """Background: refresh or re-confirm the token; returns a pause before the next one."""
        held, generation = self._held, self._generation
        lifetime = held.lifetime if held is not None else None
        try:
            snap = flow.drive(self._refresh_flow(), self._do)
        except K2TokenError as exc:
            return self._refresh_failed(exc, lifetime)
        return self._refreshed(snap, generation, lifetime)

    def _redis(self, call: Callable[[], T]) -> T:
        """One Redis call, behind the circuit breaker."""
        try:
            result = call()
        except SharedCacheError as exc:
            self._redis_failed(exc)
            raise
        self._redis_ok()
        return result

    def _do(self, effect: flow.Effect[Any]) -> Any:
        """Perform one effect of the core with blocking I/O."""
        started = time.monotonic()
        via_redis, call = self._io(effect)
        try:
            result = self._redis(call) if via_redis else call()
        except K2TokenError:
            self._effect_failed(effect, started)
            raise
        self._after_effect(effect, result, started)
        return result

    # -- invalidation and auth ---------------------------------------------------------------

    def invalidate(self, token: str | AccessToken) -> bool:
        """Forget ``token`` here and, if it is still the shared one, in Redis.

        Compare-and-delete: a hundred workers reporting the same dead token cause one refresh,
        and a worker reporting an old token never deletes the new one. True if Redis held it.
        With Redis unavailable (fallback mode) only the local copy is dropped.
        """
        value = token.value if isinstance(token, AccessToken) else token
        self._forget(value)
        try:
            deleted = self._shared_allowed() and self._redis(lambda: self._store.invalidate(value))
        except SharedCacheError as exc:
            self._fallback_or_raise(exc)
            deleted = False
        return self._invalidated(value, deleted)

    def auth(self) -> requests.auth.AuthBase:
        """A requests auth that sends ``Authorization: Bearer ...`` and, on a 401, invalidates
        the token and retries the request once with a fresh one."""
        return K2BearerAuth(self)

    def httpx_auth(self) -> K2HttpxAuth:
        """The same for an ``httpx.Client`` (needs httpx, the ``asyncio`` extra)."""
        from .contrib.httpx_auth import K2HttpxAuth  # noqa: PLC0415 - httpx is optional

        return K2HttpxAuth(self)

    # -- lifecycle ---------------------------------------------------------------------------

    def _reset_after_fork(self) -> None:
        self._local_hits = 0
        self._metrics.reset_after_fork()
        self._flight = SingleFlight()
        self._background.reset_after_fork()
        self._exchange.reset_after_fork()

    def close(self) -> None:
        """Wait briefly for a running background refresh, then close what we opened."""
        self._background.join(1.0)
        self._background.close()
        self._exchange.close()
        if self._owns_redis:
            self._store.client.close()
        _live.discard(self)

    def __enter__(self) -> SharedTokenProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
