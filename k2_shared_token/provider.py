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

import inspect
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import redis as redis_lib
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import crypto, flow, metrics
from .access_token import AccessToken, fingerprint_of
from .auth import K2BearerAuth
from .background import BackgroundRefresh
from .backoff import BackoffPolicy, LocalFailures, credentials_fingerprint
from .breaker import Breaker
from .errors import ConfigurationError, K2TokenError, SharedCacheError
from .exchange import ExchangeClient
from .freshness import Held, Snapshot, Windows
from .metrics import Hook, Metrics
from .redis_layout import Keys
from .settings import SANDBOX_URL, Settings
from .singleflight import SingleFlight
from .store import RedisStore

log = logging.getLogger("k2_shared_token")

DEFAULT_REDIS_URL = "redis://localhost:6379/0"

T = TypeVar("T")

_live: weakref.WeakSet[SharedTokenProvider] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for provider in list(_live):
        provider._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def redis_client(url: str, timeout: float) -> Any:
    """A redis-py client with short timeouts, one immediate retry and a one-trip handshake.

    The retry survives a connection Redis dropped (a restart, an idle timeout); more retries
    with backoff, redis-py's default, would turn a partition into seconds of stall per call.
    RESP2 and no client-info commands: redis-py's default handshake (HELLO 3, a maintenance
    notification probe, two CLIENT SETINFO) costs four round trips per new connection, which a
    cold fleet opening hundreds of connections at once pays all together.
    """
    return redis_lib.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
        protocol=2,
        **_NO_CLIENT_INFO,
    )


# redis-py 8 takes driver_info=None to skip CLIENT SETINFO; older versions take lib_name=None.
_NO_CLIENT_INFO: dict[str, None] = (
    {"driver_info": None}
    if "driver_info"
    in inspect.signature(redis_lib.connection.AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


class SharedTokenProvider:
    """One K2 access token, shared by every process that uses the same Redis and credentials.

    Build one per process (or one before fork: children reset what must not be shared) and call
    :meth:`get_token` before each K2 request, or use :meth:`auth` with a requests session.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        base_url: str = SANDBOX_URL,
        redis: str | Any = DEFAULT_REDIS_URL,
        refresh_ahead: float = 300,
        min_validity: float = 30,
        lock_lease: float = 15,
        wait_timeout: float = 20,
        key_prefix: str = "k2",
        local_cache: bool = True,
        local_max_age: float = 60,
        exchange_deadline: float | None = None,
        connect_timeout: float = 3.05,
        read_timeout: float = 10,
        max_attempts: int = 4,
        redis_timeout: float = 1.0,
        on_redis_error: str = "fallback",
        redis_cooldown: float = 5.0,
        invalid_client_holdoff: float = 60.0,
        failure_backoff: float = 1.0,
        failure_backoff_max: float = 60.0,
        encryption_keys: Iterable[str | bytes] = (),
        allow_insecure_http: bool = False,
        session: requests.Session | None = None,
        hooks: Iterable[Hook] = (),
    ) -> None:
        self.settings = s = Settings.build(
            client_id=client_id,
            client_secret=client_secret,
            base_url=base_url,
            key_prefix=key_prefix,
            refresh_ahead=refresh_ahead,
            min_validity=min_validity,
            lock_lease=lock_lease,
            wait_timeout=wait_timeout,
            exchange_deadline=exchange_deadline,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            local_cache=local_cache,
            local_max_age=local_max_age,
            allow_insecure_http=allow_insecure_http,
            on_redis_error=on_redis_error,
            redis_timeout=redis_timeout,
            redis_cooldown=redis_cooldown,
            invalid_client_holdoff=invalid_client_holdoff,
            failure_backoff=failure_backoff,
            failure_backoff_max=failure_backoff_max,
        )
        if isinstance(redis, str):
            if not redis.strip():
                raise ConfigurationError("redis must be a Redis URL or a redis-py client")
            try:
                client = redis_client(redis, s.redis_timeout)
            except ValueError as exc:
                raise ConfigurationError(f"redis URL is not valid: {exc}") from None
            self._owns_redis = True
        elif redis is None or not hasattr(redis, "register_script"):
            raise ConfigurationError("redis must be a Redis URL or a redis-py client")
        else:
            client, self._owns_redis = redis, False
        self._windows = Windows(s.refresh_ahead, s.min_validity, s.local_max_age)
        self._backoff = BackoffPolicy(
            s.failure_backoff, s.failure_backoff_max, s.invalid_client_holdoff
        )
        keys = Keys.for_namespace(s.key_prefix, s.namespace)
        encryption_keys = list(encryption_keys)
        self._store = RedisStore(
            client,
            keys,
            s.lock_lease,
            s.namespace,
            credentials=credentials_fingerprint(s.client_id, s.client_secret),
            cipher=crypto.TokenCipher(encryption_keys, keys.token) if encryption_keys else None,
        )
        self._breaker = Breaker(s.redis_cooldown)
        # Only the fallback's single-flight leader touches it: no lock needed.
        self._local_failures = LocalFailures() if s.fallback else None
        self._exchange = ExchangeClient(s, session)
        self._held: Held | None = None
        self._generation = 0
        self._local_hits = 0  # the hot path's counter: a bare int, no lock (may lag a little)
        self._metrics = Metrics(s.namespace, hooks)
        self._flight: SingleFlight[Held] = SingleFlight()
        self._background = BackgroundRefresh(self._refresh_job, f"k2-token-refresh-{s.namespace}")
        _live.add(self)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> SharedTokenProvider:
        """Build from the environment; keyword arguments override it.

        Required: ``K2_CLIENT_ID``, ``K2_CLIENT_SECRET``. Optional: ``K2_BASE_URL`` (default:
        sandbox), ``K2_REDIS_URL`` (else ``REDIS_URL``), ``K2_TOKEN_ENCRYPTION_KEYS``
        (comma-separated, the encrypting key first), and the tuning knobs ``K2_REFRESH_AHEAD``,
        ``K2_MIN_VALIDITY``, ``K2_LOCK_LEASE``, ``K2_WAIT_TIMEOUT``, ``K2_REDIS_TIMEOUT``,
        ``K2_INVALID_CLIENT_HOLDOFF`` (seconds), ``K2_ON_REDIS_ERROR`` (``fallback`` or
        ``raise``), ``K2_KEY_PREFIX`` and ``K2_ALLOW_INSECURE_HTTP=1`` (plain http to a
        non-loopback host, e.g. the fake server in docker-compose), so a deployment is
        configured in one place.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {
            "client_id": env.get("K2_CLIENT_ID", ""),
            "client_secret": env.get("K2_CLIENT_SECRET", ""),
            "base_url": env.get("K2_BASE_URL") or SANDBOX_URL,
            "redis": env.get("K2_REDIS_URL") or env.get("REDIS_URL") or DEFAULT_REDIS_URL,
        }
        for name in (
            "refresh_ahead",
            "min_validity",
            "lock_lease",
            "wait_timeout",
            "redis_timeout",
            "invalid_client_holdoff",
        ):
            raw = env.get(f"K2_{name.upper()}")
            if raw:
                try:
                    kwargs[name] = float(raw)
                except ValueError:
                    raise ConfigurationError(f"K2_{name.upper()} must be seconds") from None
        if env.get("K2_KEY_PREFIX"):
            kwargs["key_prefix"] = env["K2_KEY_PREFIX"]
        if env.get("K2_ON_REDIS_ERROR"):
            kwargs["on_redis_error"] = env["K2_ON_REDIS_ERROR"]
        if env.get(crypto.ENV_KEYS):
            kwargs["encryption_keys"] = crypto.keys_from_env(env[crypto.ENV_KEYS])
        if env.get("K2_ALLOW_INSECURE_HTTP", "").lower() in ("1", "true", "yes"):
            kwargs["allow_insecure_http"] = True
        kwargs.update(overrides)
        missing = [n for n in ("client_id", "client_secret") if not kwargs[n]]
        if missing:
            names = " and ".join(f"K2_{n.upper()}" for n in missing)
            raise ConfigurationError(f"{names} must be set (environment or keyword argument)")
        return cls(**kwargs)

    def __repr__(self) -> str:
        s = self.settings
        return f"SharedTokenProvider(namespace={s.namespace!r}, base_url={s.base_url!r})"

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    @property
    def keys(self) -> Keys:
        return self._store.keys

    # -- the hot path ------------------------------------------------------------------------

    def get(self) -> AccessToken:
        """A token with at least ``min_validity`` seconds left (or, right after an exchange,
        whatever lifetime K2 granted)."""
        held = self._held
        if held is not None:
            now = time.monotonic()
            if now < held.recheck_at:
                self._local_hits += 1
                return held.token
            if now < held.usable_until:
                self._local_hits += 1
                self._background.kick()
                return held.token
        return self._get_slow()

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
            return self._redis(self._store.read)
        except SharedCacheError:
            if self.settings.fallback:
                return None
            raise

    def _obtain(self, seen: Snapshot | None) -> Held:
        generation = self._generation
        deadline = time.monotonic() + self.settings.wait_timeout
        missed = False

        def do(effect: flow.Effect[Any]) -> Any:
            # The first wait or exchange makes this a miss; without one, the lock attempt found
            # a usable token in Redis: a shared hit.
            nonlocal missed
            if not missed and isinstance(effect, (flow.Wait, flow.Exchange)):
                missed = True
                self._metrics.record(metrics.MISS)
            return self._do(effect)

        core = flow.obtain(
            self._windows,
            seen,
            deadline,
            time.monotonic,
            backoff=self._backoff,
            local=self._local_failures,
            shared=self._shared_allowed(),
        )
        snap = flow.drive(core, do)
        if not missed:
            self._metrics.record(metrics.SHARED_HIT)
        held = self._windows.hold(snap)
        self._adopt(held, generation, shared=snap.stored.fence > 0)
        return held

    def _refresh_job(self) -> float | None:
        """Background: refresh or re-confirm the token; returns a pause after a failure."""
        held, generation = self._held, self._generation
        lifetime = held.lifetime if held is not None else None
        try:
            core = flow.refresh(
                self._windows,
                lifetime,
                time.monotonic,
                backoff=self._backoff,
                local=self._local_failures,
                shared=self._shared_allowed(),
                held_fresh=held is not None and held.is_fresh(time.monotonic()),
            )
            snap = flow.drive(core, self._do)
        except K2TokenError as exc:
            self._metrics.record(metrics.REFRESH_FAILED)
            pause = max(self._windows.retry_interval(lifetime), getattr(exc, "retry_after", 0) or 0)
            log.warning(
                "namespace %s: early refresh failed (%s: %s); serving the current token, "
                "next try in %.1f s",
                self.namespace,
                type(exc).__name__,
                exc,
                pause,
            )
            return pause
        if snap is None:
            # Nothing newer (the winner announced nothing, or Redis is skipped and our copy is
            # still fresh): look again after a short pause rather than at every call.
            return self._windows.retry_interval(lifetime)
        self._adopt(self._windows.hold(snap), generation, shared=snap.stored.fence > 0)
        return None

    def _adopt(self, held: Held, generation: int, *, shared: bool) -> None:
        """Keep ``held`` as this process's copy, unless an invalidation happened meanwhile.

        Without ``local_cache`` only a token Redis does not have (the fallback's own) is kept:
        otherwise an outage would cost an exchange per call.
        """
        if generation == self._generation:
            self._held = held if self.settings.local_cache or not shared else None

    # -- Redis, behind the circuit breaker ---------------------------------------------------

    def _shared_allowed(self) -> bool:
        """Whether to try Redis now; with the circuit open and no fallback, fail at once."""
        if self._breaker.allows(time.monotonic()):
            return True
        if self.settings.fallback:
            return False
        raise SharedCacheError(
            "Redis is unavailable (circuit open: not retried for "
            f"{self.settings.redis_cooldown:g} s after a failure)"
        )

    def _redis(self, call: Callable[[], T]) -> T:
        """Run one Redis call; feed the breaker and log an outage's start and end, once each."""
        try:
            result = call()
        except SharedCacheError as exc:
            self._metrics.record(metrics.REDIS_ERROR)
            if self._breaker.failed(time.monotonic()):
                log.warning(
                    "namespace %s: Redis unavailable (%s); %s, retrying Redis every %g s",
                    self.namespace,
                    exc,
                    "each process keeps its own token meanwhile"
                    if self.settings.fallback
                    else "token requests fail meanwhile",
                    self.settings.redis_cooldown,
                )
            raise
        outage = self._breaker.succeeded(time.monotonic())
        if outage is not None:
            log.warning(
                "namespace %s: Redis answers again after %.1f s; the token is shared again",
                self.namespace,
                outage,
            )
        return result

    def _do(self, effect: flow.Effect[Any]) -> Any:
        """Perform one effect of the core with blocking I/O."""
        match effect:
            case flow.TryLock(min_ttl_ms=min_ttl_ms, after_timeout=after_timeout):
                attempt = self._redis(lambda: self._store.try_lock(min_ttl_ms))
                if attempt.acquired and after_timeout:
                    self._metrics.record(metrics.LOCK_TAKEOVER)
                    log.warning(
                        "namespace %s: took over the refresh lock after its holder's lease ran out",
                        self.namespace,
                    )
                return attempt
            case flow.Exchange():
                started = time.monotonic()
                try:
                    issued = self._exchange.fetch()
                except K2TokenError:
                    self._metrics.record(metrics.EXCHANGE_FAILED, time.monotonic() - started)
                    raise
                self._metrics.record(metrics.EXCHANGE_OK, issued.took)
                if self._breaker.is_open:
                    self._metrics.record(metrics.FALLBACK)
                log.info(
                    "namespace %s: exchanged a new token %s, valid %d s",
                    self.namespace,
                    fingerprint_of(issued.value),
                    issued.expires_in,
                )
                return issued
            case flow.Publish(lock=lock, issued=issued):
                return self._redis(lambda: self._store.publish(lock, issued))
            case flow.Release(lock=lock, error_code=code, holdoff_ms=ms, credentials=creds):
                return self._redis(lambda: self._store.release(lock, code, ms, creds))
            case flow.Wait(timeout=timeout, min_ttl_ms=min_ttl_ms):
                started = time.monotonic()
                try:
                    return self._redis(lambda: self._store.wait(timeout, min_ttl_ms))
                finally:
                    self._metrics.record(metrics.WAIT, time.monotonic() - started)
        raise TypeError(f"unknown effect {effect!r}")  # pragma: no cover

    # -- invalidation and auth ---------------------------------------------------------------

    def invalidate(self, token: str | AccessToken) -> bool:
        """Forget ``token`` here and, if it is still the shared one, in Redis.

        Compare-and-delete: a hundred workers reporting the same dead token cause one refresh,
        and a worker reporting an old token never deletes the new one. True if Redis held it.
        With Redis unavailable (fallback mode) only the local copy is dropped.
        """
        value = token.value if isinstance(token, AccessToken) else token
        held = self._held
        if held is not None and held.token.value == value:
            self._generation += 1
            self._held = None
        try:
            deleted = self._shared_allowed() and self._redis(lambda: self._store.invalidate(value))
        except SharedCacheError:
            if not self.settings.fallback:
                raise
            deleted = False
        log.info(
            "namespace %s: token %s invalidated (%s)",
            self.namespace,
            fingerprint_of(value),
            "was shared" if deleted else "no longer shared",
        )
        return deleted

    def auth(self) -> requests.auth.AuthBase:
        """A requests auth that sends ``Authorization: Bearer ...`` and, on a 401, invalidates
        the token and retries the request once with a fresh one."""
        return K2BearerAuth(self)

    # -- lifecycle ---------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """This process's counters (see :mod:`k2_shared_token.metrics`) and time sums
        (``<event>_seconds``)."""
        out: dict[str, float] = {metrics.LOCAL_HIT: self._local_hits}
        out.update(self._metrics.counts())
        out.update({f"{name}_seconds": t for name, t in self._metrics.seconds().items()})
        return out

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
