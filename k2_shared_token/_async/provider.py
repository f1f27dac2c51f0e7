"""The provider: written once, for asyncio; the blocking provider is generated from this file.

Data flows one way: the caller asks :meth:`AsyncSharedTokenProvider.get`; the per-process copy
(:class:`.._core.local_copy.LocalCopy`) answers while it is usable; when it is stale (refresh
window, or older than ``local_max_age``) the refresher refreshes or re-reads it off the
callers' path while they keep the current token; when this process has nothing usable, the
in-process single flight lets one caller run the :func:`.._core.flow.obtain` core against Redis
(the lock attempt reads the token too) and, on a miss, the exchange client.

Hot path: one attribute read, one ``time.monotonic()`` comparison and a counter, no lock, no
Redis. How stale that copy may be is bounded by ``local_max_age`` and by the refresh window; a
401 seen through the auths or an :meth:`invalidate` drops it at once.

The decisions are the core's (:mod:`.._core`); this class wires the parts and performs the
core's effects (:meth:`_drive`), including when a caller is cancelled or interrupted: the
shared work runs apart from any one caller (:mod:`.._concurrency`), and a flow stopped mid-way
gives its lock back, or publishes the token it already has, before the interruption goes on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _concurrency
from .._concurrency import AsyncFlight, AsyncRefresher, AsyncTimer
from .._core import flow, metrics
from .._core.backoff import (
    BackoffPolicy,
    LocalFailures,
    LocalRevocations,
    credentials_fingerprint,
)
from .._core.errors import (
    ClosedMidFlowError,
    ConfigurationError,
    InvalidTokenError,
    K2TokenError,
    SharedCacheError,
)
from .._core.gate import RedisGate
from .._core.instruments import Instruments
from .._core.local_copy import LocalCopy
from .._core.metrics import Hook, Metrics
from .._core.settings import DEFAULT_REDIS_URL, SANDBOX_URL, Settings, options_from_env
from .._core.tokens import AccessToken, Held, Snapshot, fingerprint_of
from .._core.windows import Windows
from .._extras import AsyncProviderExtras
from .._k2.token_api import Introspection, TokenInfo, check_token
from .._k2.transport import AsyncTransport
from .._redis import codec, crypto
from .._redis.clients import connect
from .._redis.commands import Namespace
from .._redis.layout import Keys
from .._scheduler import AsyncScheduler, weakly
from .backplane import AsyncBackplane, backplane_for
from .exchange import AsyncExchangeClient
from .store import AsyncRedisStore
from .token_api import AsyncTokenApiClient

if TYPE_CHECKING:
    from .httpx_auth import AsyncK2HttpxAuth

log = logging.getLogger("k2_shared_token")

T = TypeVar("T")
P = TypeVar("P", bound="AsyncSharedTokenProvider")

# What the compare-and-delete found (see _redis.layout.INVALIDATE).
DELETED, REPLACED, DELETED_MID_EXCHANGE = 1, 2, 3


class AsyncSharedTokenProvider(AsyncProviderExtras):
    """One K2 access token, shared by every process that uses the same Redis and credentials.

    Build one per process (building it before a fork is fine: children reset what must not be
    shared) and ask it for a token before each K2 request, or use its auths. The settings are
    keyword arguments (the README's configuration table lists them); ``redis`` is a URL or a
    client of this side's redis-py family; ``session`` is this side's HTTP client for the
    exchange (yours to close), made by the provider when left out.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        base_url: str = SANDBOX_URL,
        redis: str | Any = DEFAULT_REDIS_URL,
        session: Any = None,
        hooks: Iterable[Hook] = (),
        **options: Any,
    ) -> None:
        self.settings = s = Settings.build(
            client_id=client_id, client_secret=client_secret, base_url=base_url, **options
        )  # every other setting is a Settings field: the README's table lists them
        asyncio_client = True  # sync: True -> False
        client, self._owns_redis = connect(redis, s.redis_timeout, asyncio=asyncio_client)
        keys = Keys.for_namespace(s.key_prefix, s.namespace)
        encryption_keys = list(s.encryption_keys)
        self._ops = Namespace(
            keys,
            s.namespace,
            s.lock_lease,
            credentials=credentials_fingerprint(s.client_id, s.client_secret),
            cipher=crypto.TokenCipher(encryption_keys, keys.token) if encryption_keys else None,
        )
        self._windows = Windows(s.refresh_ahead, s.min_validity, s.local_max_age)
        self._backoff = BackoffPolicy(
            s.failure_backoff, s.failure_backoff_max, s.invalid_client_holdoff
        )
        self._metrics = Metrics(s.namespace, hooks)
        self._gate = RedisGate(
            s.namespace, s.redis_cooldown, fallback=s.fallback, counts=self._metrics
        )
        self._instruments = Instruments(s.namespace, self._metrics, self._gate)
        self._local = LocalCopy(
            self._windows,
            keep_shared=s.local_cache,
            recheck_unshared=s.redis_cooldown,
            idle=s.local_idle,
        )
        # Touched by the fallback's exchanges: the callers' single flight, and a refresh job
        # that may overlap it (still exchanging when the copy runs out). Plain values, no lock:
        # an overlap at worst loses a count of the failure streak.
        self._local_failures = LocalFailures() if s.fallback else None
        self._revocations = LocalRevocations()
        self._learned_revoke = False
        self._store = AsyncRedisStore(client, self._ops)
        self._exchange = AsyncExchangeClient(s, AsyncTransport(session, s.base_url))
        self._token_api = AsyncTokenApiClient(s, self._exchange.transport)
        self._flight: AsyncFlight[Held] = AsyncFlight()
        self._refresher = AsyncRefresher(
            self._refresh_job, self._refresh_crashed, f"k2-token-refresh-{s.namespace}"
        )
        self._local.kick = self._refresher.kick
        self._local.watch = self._watch_idle
        self._backplane: AsyncBackplane | None = None
        self._kept: Any = None  # the cold path's wait subscription, for the backplane
        self._closed = False
        _concurrency.reset_in_children(self)

    @classmethod
    def from_env(cls: type[P], environ: Mapping[str, str] | None = None, **overrides: Any) -> P:
        """Build from the ``K2_*`` environment (every setting has its variable; the README
        lists them); keyword arguments override it."""
        env = os.environ if environ is None else environ
        return cls(**options_from_env(env, overrides))

    def __repr__(self) -> str:
        s = self.settings
        return f"{type(self).__name__}(namespace={s.namespace!r}, base_url={s.base_url!r})"

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    @property
    def keys(self) -> Keys:
        return self._ops.keys

    # -- the hot path ------------------------------------------------------------------------

    async def get(self) -> AccessToken:
        """A token with at least ``min_validity`` seconds left (or, right after an exchange,
        whatever lifetime K2 granted)."""
        return self._local.token() or await self._get_slow()

    async def get_token(self) -> str:
        return (await self.get()).value

    # -- the slow path -----------------------------------------------------------------------

    async def _get_slow(self) -> AccessToken:
        self._check_open()
        s = self.settings
        # Cold (nothing held): joined after the flow. During an outage: once Redis answers
        # again, so a partitioned port is not dialled inside the breaker's cooldown.
        cold = self._local.held is None and s.local_cache
        if self._backplane is None and s.backplane and not cold and not self._gate.is_open:
            self._join_backplane()
        seen: Snapshot | None = None
        if not s.local_cache:
            seen = await self._shared_read()
            shared = self._windows.hold(seen) if seen is not None else None
            if shared is not None and shared.is_usable(time.monotonic()):
                self._metrics.record(metrics.SHARED_HIT)
                return self._handed_out(shared)
        # Nothing usable in this process: one caller asks Redis (its lock attempt reads the
        # token too) and the others wait for it. In a cold fleet that is one connection and
        # one round trip per process, not one per thread or task.
        held = await self._flight.run(lambda: self._obtain(seen), s.wait_timeout + s.lock_lease)
        return self._handed_out(held)

    def _handed_out(self, held: Held) -> AccessToken:
        if not held.is_fresh(time.monotonic()):
            self._refresher.kick()
        return held.token

    async def _shared_read(self) -> Snapshot | None:
        """The L1-less read; in fallback mode a failing Redis reads as a miss."""
        try:
            if not self._gate.allowed():
                return None
            result: Snapshot | None = await self._redis(self._store.read)
        except SharedCacheError as exc:
            self._gate.fallback_or_raise(exc)
            return None
        return result

    async def _obtain(self, seen: Snapshot | None) -> Held:
        held = self._local.still_held()
        if held is not None:
            return held
        generation = self._local.generation
        if seen is None and self._local.held is not None:
            seen = self._local.held.source  # the grant before: see flow._exchange_and_publish
        obtain = flow.obtain(
            self._windows,
            seen,
            time.monotonic() + self.settings.wait_timeout,
            time.monotonic,
            backoff=self._backoff,
            local=self._local_failures,
            shared=self._gate.allowed(),
        )
        try:
            snap, missed = await self._drive(obtain, caller=True)
        finally:
            await self._join_after_obtaining()
        if not missed:
            self._metrics.record(metrics.SHARED_HIT)
        return self._local.adopt(snap, generation)

    async def _refresh_job(self) -> float | None:
        """Refresh or re-confirm the token off the callers' path; returns a pause before the
        next refresh may run, or None."""
        if self._closed:
            return None  # kicked just before close(): nothing to refresh for
        if self._backplane is None and self.settings.backplane and not self._gate.is_open:
            self._join_backplane()  # a forked child's first refresh (its copy stays warm)
        held, generation = self._local.held, self._local.generation
        previous = held.source if held is not None else None
        lifetime = held.lifetime if held is not None else None
        refresh = flow.refresh(
            self._windows,
            previous,
            time.monotonic,
            backoff=self._backoff,
            local=self._local_failures,
            shared=self._gate.allowed(),
            held_fresh=held is not None and held.is_fresh(time.monotonic()),
        )
        try:
            snap, _ = await self._drive(refresh, caller=False)
        except K2TokenError as exc:
            return self._instruments.refresh_failed(exc, self._windows.retry_interval(lifetime))
        if snap is None:
            # Nothing newer (the winner announced nothing, or Redis is skipped and our copy is
            # still fresh): look again after a short pause rather than at every call; during a
            # Redis outage, no later than the breaker's next probe, so sharing resumes promptly.
            pause = self._windows.retry_interval(lifetime)
            return min(pause, self.settings.redis_cooldown) if self._gate.is_open else pause
        self._local.adopt(snap, generation)
        return None

    def _watch_idle(self) -> None:
        AsyncScheduler.here().call_later(self.settings.local_idle, weakly(self._idle_check))

    def _idle_check(self) -> None:
        if self._local.idle_check() and not self._closed:
            self._watch_idle()

    def _refresh_crashed(self, exc: BaseException) -> float:
        held = self._local.held
        pause = self._windows.retry_interval(held.lifetime if held is not None else None)
        return self._instruments.refresh_crashed(exc, pause)

    # -- the fleet backplane -----------------------------------------------------------------

    def _join_backplane(self, subscription: Any = None) -> bool:
        """Listen to the namespace's announcements (on first use: the asyncio side needs its
        running loop); True if it listens on ``subscription`` (a wait's, still open)."""
        backplane = backplane_for(self._store.client)
        if backplane is None:
            return False
        self._backplane = backplane
        channel, recheck = self.keys.channel, self._local.recheck_now
        return backplane.join(channel, id(self), self._announced, recheck, subscription)

    def _keep_subscription(self, pubsub: Any) -> bool:
        """Offered by a wait that ends subscribed: a cold process keeps it for its backplane,
        which then listens without a connection and a SUBSCRIBE of its own in the stampede."""
        if self._backplane is not None or not self.settings.backplane or self._kept is not None:
            return False
        self._kept = pubsub
        return True

    async def _join_after_obtaining(self) -> None:
        """The cold path joins the backplane once its flow is done, with the subscription
        its wait kept, if any. A process that exchanged or found the token subscribes anew,
        after its flow: subscribing while it exchanged would take the lock attempt's idle
        connection, and its publish would then wait for a new one. Its copy is re-checked
        once subscribed (an announcement may have come before)."""
        kept, self._kept = self._kept, None
        taken = False
        joining = self.settings.backplane and not self._closed and not self._gate.is_open
        if self._backplane is None and joining:
            taken = self._join_backplane(kept)
        if kept is not None and not taken:
            await self._store.close_subscription(kept)
        if self._closed and self._backplane is not None:
            await self._backplane.leave(self.keys.channel, id(self))  # close() ran meanwhile

    def _announced(self, raw: bytes) -> None:
        """A token was written, invalidated or revoked somewhere in the fleet."""
        ann = self._ops.announcement(raw)
        if ann is None:
            return
        # Redis delivered it: it answers again, whatever the breaker last saw. Without this a
        # process still in its cooldown would meet the fleet's next token (or a drop of the
        # current one) with an exchange of its own instead of the shared path.
        self._gate.answered()
        if ann.replacing:
            self._local.suspend()
        elif ann.dropped is not None:
            held = self._local.held
            if held is not None and codec.digest(held.token.value) == ann.dropped:
                self._local.forget(held.token.value)
        elif ann.stored is not None and ann.ttl_ms > 0 and self._local.held is not None:
            # Only a copy this process holds follows the fleet: one dropped as idle stays
            # dropped until a call asks for it (memory bounded by the tenants in use).
            snap = Snapshot(ann.stored, ann.ttl_ms, time.monotonic(), time.time())
            self._local.adopt(snap, self._local.generation)

    # -- performing the core's effects -------------------------------------------------------

    async def _drive(self, steps: flow.Flow[T], *, caller: bool) -> tuple[T, bool]:
        """Run a flow of the core: perform each effect, send back its result or throw its
        error. Returns the flow's result and whether it waited or exchanged (a miss).

        Anything but a :class:`K2TokenError` (a cancellation, ``KeyboardInterrupt``, a gevent
        ``Timeout``, a bug) closes the flow, as does any error once the provider is closed;
        what it holds in Redis is settled first (:class:`.._core.flow.LockGuard`), so the fleet
        never sits out a lease for it.
        """
        guard = flow.LockGuard()
        missed = False
        result: Any = None
        error: K2TokenError | None = None
        while True:
            done, value = flow.advance(steps, result, error)
            if done:
                return value, missed
            effect: flow.Effect[Any] = value
            if caller and not missed and isinstance(effect, (flow.Wait, flow.Exchange)):
                missed = True
                self._metrics.record(metrics.MISS)
            try:
                result, error = await self._do(effect, caller=caller), None
            except ClosedMidFlowError as exc:
                # Closed mid-flow: settled as an interruption, not told to the fleet as a
                # failure that would fail the callers waiting in other processes.
                steps.close()
                await self._settle(guard.pending(), exc, effect)
                raise
            except K2TokenError as exc:
                result, error = None, exc
                guard.failed(effect)
            except BaseException as exc:
                steps.close()
                await self._settle(guard.pending(), exc, effect)
                raise
            else:
                guard.saw(effect, result)

    async def _settle(
        self, pending: flow.Effect[Any] | None, exc: BaseException, effect: flow.Effect[Any]
    ) -> None:
        if pending is None:
            if isinstance(effect, flow.TryLock) and not isinstance(exc, ClosedMidFlowError):
                # Interrupted inside the lock attempt, perhaps after the script took the lock
                # (a refused one was never sent).
                await self._store.release_orphans()
            return
        publish = isinstance(pending, flow.Publish)
        settled = "published its token" if publish else "released its lock"
        try:
            await self._do(pending)
        except Exception as failure:
            settled = f"could not settle its lock ({type(failure).__name__}); its lease frees it"
        self._instruments.interrupted(settled, exc)

    async def _do(self, effect: flow.Effect[Any], *, caller: bool = False) -> Any:
        """Perform one effect, with its metrics and logs."""
        if self._closed and not isinstance(effect, (flow.Publish, flow.Release)):
            raise ClosedMidFlowError(f"{type(self).__name__} is closed")
        started = time.monotonic()
        try:
            result = await self._perform(effect, caller)
        except K2TokenError as exc:
            self._instruments.failed(effect, started, exc)
            raise
        self._instruments.performed(effect, result, started)
        return result

    async def _perform(self, effect: flow.Effect[Any], caller: bool) -> Any:
        store = self._store
        match effect:
            case flow.Exchange():
                return await self._exchange.fetch()
            case flow.TryLock(min_ttl_ms=min_ttl_ms):
                return await self._redis(store.try_lock, min_ttl_ms)
            case flow.Publish(lock=lock, issued=issued, reuse=reuse, keep=keep):
                return await self._redis(store.publish, lock, issued, reuse, keep)
            case flow.Pause(seconds=seconds):
                return await AsyncTimer.sleep(seconds)
            case flow.Release(lock=lock, error_code=code, holdoff_ms=ms, credentials=creds):
                return await self._redis(store.release, lock, code, ms, creds)
            case flow.Wait(timeout=timeout, min_ttl_ms=min_ttl_ms, replacing=replacing):
                # Only a caller's flow hands its subscription on (_join_after_obtaining).
                offer = self._keep_subscription if caller else None
                return await self._redis(store.wait, timeout, min_ttl_ms, replacing, offer)
        raise TypeError(f"unknown effect {effect!r}")  # pragma: no cover

    async def _redis(self, method: Any, *args: Any) -> Any:
        """One Redis call, behind the circuit breaker."""
        try:
            result = await method(*args)
        except SharedCacheError as exc:
            self._gate.failed(exc)
            raise
        self._gate.answered()
        return result

    # -- invalidation and auth ---------------------------------------------------------------

    async def invalidate(self, token: str | AccessToken) -> bool:
        """Forget ``token`` here and, if it is still the shared one, in Redis.

        Compare-and-delete: a hundred workers reporting the same dead token cause one refresh,
        and a worker reporting an old token never deletes the new one. True if Redis held it.
        With Redis unavailable (fallback mode) only the local copy is dropped.
        """
        value = token.value if isinstance(token, AccessToken) else token
        return await self._invalidate(value) in (DELETED, DELETED_MID_EXCHANGE)

    async def _invalidate(self, value: str) -> int:
        self._local.forget(value)
        try:
            outcome = int(
                self._gate.allowed() and await self._redis(self._store.invalidate, value)
            )
        except SharedCacheError as exc:
            self._gate.fallback_or_raise(exc)
            outcome = 0
        self._instruments.invalidated(value, outcome in (DELETED, DELETED_MID_EXCHANGE))
        return outcome

    async def report_rejected(self, token: str | AccessToken) -> bool:
        """K2 answered 401 to a request sent with ``token``: drop it as :meth:`invalidate`
        does, and read what the rejection says about the server (the auths call this).

        * The shared token, rejected while still fresh (before any process of this fleet had
          reason to replace it) and not revoked by it: another deployment shares the client
          id. Logged as a warning.
        * This process's own token, exchanged while Redis is down: replaced at once the first
          time, then only after a doubling pause (:class:`.._core.backoff.LocalRevocations`),
          so processes in fallback against a server that revokes the previous token do not
          revoke each other at the request rate.
        """
        value = token.value if isinstance(token, AccessToken) else token
        held = self._local.held
        now = time.monotonic()
        mine = held is not None and held.token.value == value
        # Still fresh: no process of this fleet had reason to replace it yet.
        fresh = held is not None and mine and held.is_fresh(now)
        left = held.source.expires_at - now if held is not None and mine else 0.0
        if mine and held is not None and held.source.stored.fence == 0:
            pause = self._revocations.rejected(now)
            if pause and self._local_failures is not None:
                self._instruments.revocation_war(self._revocations, pause)
                self._local_failures.revoked(now + pause)
        else:
            self._revocations.reset()
        outcome = await self._invalidate(value)
        if outcome == DELETED and fresh:
            self._instruments.foreign_revocation(value, left)
        elif outcome in (REPLACED, DELETED_MID_EXCHANGE) and not self._learned_revoke:
            # Rejected while, or after, a newer token was issued: that exchange revoked it (a
            # replaced token is otherwise valid until it expires, and no caller gets one that
            # close to its expiry). Tell the fleet, so its lock holders announce their next
            # exchanges and every process stops sending the old token meanwhile.
            self._learned_revoke = True
            await self._learn("revoke")
        return outcome in (DELETED, DELETED_MID_EXCHANGE)

    async def _learn(self, trait: str) -> None:
        try:
            await self._redis(self._store.learn, trait)
        except SharedCacheError as exc:
            self._gate.fallback_or_raise(exc)

    # -- the rest of K2's token API: revoke, introspect, token info -------------------------

    async def _token_value(self, token: str | AccessToken | None) -> str:
        self._check_open()
        if token is None:
            return (await self.get()).value
        return check_token(token.value if isinstance(token, AccessToken) else token)

    async def revoke(self, token: str | AccessToken | None = None) -> bool:
        """Revoke ``token`` at K2 (``POST /oauth/revoke``; by default the current shared
        token), then :meth:`invalidate` it: compare-and-delete in Redis and drop this
        process's copy, so the next call gets a new token with one exchange fleet-wide.

        True if it was the shared token in Redis. K2 answers 200 for an unknown or already
        revoked token too; it refuses (:class:`TokenRequestRejectedError`, 403
        ``unauthorized_client``) wrong credentials or another client's token, and then
        nothing is invalidated.
        """
        value = await self._token_value(token)
        await self._token_api.revoke(value)
        try:
            return await self.invalidate(value)
        except SharedCacheError:
            log.warning(
                "namespace %s: token %s was revoked at K2 but Redis failed, so the shared copy "
                "was not dropped; other processes drop it at their first 401",
                self.namespace,
                fingerprint_of(value),
            )
            raise

    async def introspect(self, token: str | AccessToken | None = None) -> Introspection:
        """What K2 says about ``token`` (``POST /oauth/introspect``; by default the current
        shared token): ``active``, ``scope``, ``client_id``, ``token_type``, and ``exp`` and
        ``iat`` as aware datetimes. A dead or foreign token is ``active=False``."""
        return await self._token_api.introspect(await self._token_value(token))

    async def token_info(self, token: str | AccessToken | None = None) -> TokenInfo:
        """``GET /oauth/token/info`` with the current shared token as the bearer (or
        ``token``): remaining ``expires_in``, ``scope``, ``application_uid``, ``created_at``.

        With the shared token, a 401 ``invalid_token`` is handled as the auths handle one:
        the token is invalidated and the call made once more with the current one. With an
        explicit ``token`` it raises :class:`InvalidTokenError`.
        """
        if token is not None:
            return await self._token_api.token_info(await self._token_value(token))
        current = await self._token_value(None)
        try:
            return await self._token_api.token_info(current)
        except InvalidTokenError:
            await self.invalidate(current)
            return await self._token_api.token_info(await self._token_value(None))

    def httpx_auth(self) -> AsyncK2HttpxAuth:
        """An ``httpx.Auth`` that sends ``Authorization: Bearer ...`` and, on a 401, invalidates
        the token and retries the request once with a fresh one (needs httpx)."""
        from .httpx_auth import AsyncK2HttpxAuth  # noqa: PLC0415 - httpx is optional

        return AsyncK2HttpxAuth(self)

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """This process's counters (see :mod:`.._core.metrics`) and time sums
        (``<event>_seconds``)."""
        out: dict[str, float] = {metrics.LOCAL_HIT: self._local.hits}
        out["backplane"] = float(self._backplane is not None and self._backplane.connected)
        out.update(self._metrics.counts())
        out.update({f"{name}_seconds": t for name, t in self._metrics.seconds().items()})
        return out

    def seconds_left(self) -> float | None:
        """Seconds until the token this process holds expires (0 once it has), or None when it
        holds none (before the first call, after an invalidation, or with ``local_cache`` off
        while Redis has the token). Reads the local copy only: no I/O, no refresh."""
        return self._local.seconds_left()

    def add_hook(self, hook: Hook) -> None:
        """Also call ``hook`` with every event from now on (as ``hooks=`` at construction)."""
        self._metrics.add_hook(hook)

    def remove_hook(self, hook: Hook) -> None:
        """Stop calling ``hook`` (added here or at construction); a no-op if it is unknown."""
        self._metrics.remove_hook(hook)

    async def status(self) -> dict[str, Any]:
        """The namespace's shared state in Redis, for operators; never the token itself."""
        return await self._store.status()

    async def wait_for_refresh(self, timeout: float | None = None) -> bool:
        """Wait until no early refresh is running (tests, orderly shutdown). True if idle."""
        return await self._refresher.join(timeout)

    # -- lifecycle ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError(f"{type(self).__name__} is closed")

    def _reset_after_fork(self) -> None:
        self._local.reset_after_fork()
        self._metrics.reset_after_fork()
        self._flight = AsyncFlight()
        self._backplane = None
        self._kept = None  # a parent's wait subscription: its socket is the parent's
        self._refresher = self._refresher.after_fork()
        self._local.kick = self._refresher.kick
        # The child inherits no subscription: its next call re-reads the copy (off the callers'
        # path), and that refresh subscribes anew.
        self._local.recheck_now()
        self._exchange.transport.reset_after_fork()

    async def aclose(self) -> None:
        """Stop for good: later calls raise :class:`ConfigurationError`. A running refresh is
        stopped (its lock settled) before the clients this provider made are closed, so
        nothing reopens them."""
        if self._closed:
            return
        self._closed = True
        self._local.drop()
        if self._backplane is not None:
            await self._backplane.leave(self.keys.channel, id(self))
        await self._refresher.aclose()
        await self._exchange.transport.aclose()
        if self._owns_redis:
            await self._store.client.aclose()
        _concurrency.forget_in_children(self)

    async def __aenter__(self) -> AsyncSharedTokenProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
