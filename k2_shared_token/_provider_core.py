"""What the blocking and asyncio providers share: everything but the waiting.

Settings, the refresh windows, the hold-off policy, the circuit breaker, the metrics and the
per-process copy (L1) live here, with the decisions that go with them: which flow to run (the
pure core in :mod:`.flow`), what a finished refresh means, when a token becomes this process's
copy, when Redis may be tried, and what to log. :class:`.SharedTokenProvider` drives the flows
with blocking calls, :class:`.AsyncSharedTokenProvider` with awaited ones; neither repeats a
decision.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, TypeVar

from ._core import flow, metrics
from ._core.backoff import BackoffPolicy, LocalFailures, credentials_fingerprint
from ._core.breaker import Breaker
from ._core.errors import ConfigurationError, K2TokenError, SharedCacheError
from ._core.metrics import Hook, Metrics
from ._core.settings import SANDBOX_URL, Settings
from ._core.tokens import AccessToken, Held, Snapshot, fingerprint_of
from ._core.windows import Windows
from ._redis import crypto
from ._redis.clients import connect
from ._redis.commands import Namespace
from ._redis.layout import Keys

log = logging.getLogger("k2_shared_token")

DEFAULT_REDIS_URL = "redis://localhost:6379/0"

P = TypeVar("P", bound="ProviderCore")


class ProviderCore:
    """Shared state and decisions; subclasses add the I/O (a store, an exchange client)."""

    _asyncio: ClassVar[bool] = False  # redis.asyncio clients for a URL

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
        session: Any = None,
        hooks: Iterable[Hook] = (),
    ) -> None:
        """``session``: a ``requests.Session`` (blocking provider) or an ``httpx.AsyncClient``
        (asyncio provider) to send the exchange through; by default the provider makes its own.
        """
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
        client, self._owns_redis = connect(redis, s.redis_timeout, asyncio=self._asyncio)
        keys = Keys.for_namespace(s.key_prefix, s.namespace)
        encryption_keys = list(encryption_keys)
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
        self._breaker = Breaker(s.redis_cooldown)
        # Only the fallback's single-flight leader touches it: no lock needed.
        self._local_failures = LocalFailures() if s.fallback else None
        self._held: Held | None = None
        self._generation = 0
        self._local_hits = 0  # the hot path's counter: a bare int, no lock (may lag a little)
        self._metrics = Metrics(s.namespace, hooks)
        self._connect(client, session)

    # -- what a subclass provides ------------------------------------------------------------

    def _connect(self, client: Any, session: Any) -> None:
        """Build the store and the exchange client around ``client``."""
        raise NotImplementedError

    # -- configuration -----------------------------------------------------------------------

    @classmethod
    def from_env(cls: type[P], environ: Mapping[str, str] | None = None, **overrides: Any) -> P:
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
        return f"{type(self).__name__}(namespace={s.namespace!r}, base_url={s.base_url!r})"

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    @property
    def keys(self) -> Keys:
        return self._ops.keys

    # -- the hot path ------------------------------------------------------------------------

    def _local_token(self) -> AccessToken | None:
        """This process's copy while it is usable (kicking a refresh once it is stale), else
        None: the slow path. One attribute read and a clock comparison, no lock, no I/O."""
        held = self._held
        if held is not None:
            now = time.monotonic()
            if now < held.recheck_at:
                self._local_hits += 1
                return held.token
            if now < held.usable_until:
                self._local_hits += 1
                self._kick()
                return held.token
        return None

    def _kick(self) -> None:
        """Start a background refresh unless one runs or pauses."""
        raise NotImplementedError

    # -- the flows, as configured ------------------------------------------------------------

    def _obtain_flow(self, seen: Snapshot | None) -> flow.Flow[Snapshot]:
        return flow.obtain(
            self._windows,
            seen,
            time.monotonic() + self.settings.wait_timeout,
            time.monotonic,
            backoff=self._backoff,
            local=self._local_failures,
            shared=self._shared_allowed(),
        )

    def _refresh_flow(self) -> flow.Flow[Snapshot | None]:
        held = self._held
        return flow.refresh(
            self._windows,
            held.lifetime if held is not None else None,
            time.monotonic,
            backoff=self._backoff,
            local=self._local_failures,
            shared=self._shared_allowed(),
            held_fresh=held is not None and held.is_fresh(time.monotonic()),
        )

    def _still_held(self) -> Held | None:
        """The copy another thread or task obtained while this one queued for the single
        flight: taking it saves an exchange (the fallback, which has no Redis to re-read)."""
        held = self._held
        return held if held is not None and held.is_usable(time.monotonic()) else None

    def _obtained(self, snap: Snapshot, generation: int, missed: bool) -> Held:
        if not missed:
            self._metrics.record(metrics.SHARED_HIT)
        held = self._windows.hold(snap)
        self._adopt(held, generation, shared=snap.stored.fence > 0)
        return held

    def _refreshed(self, snap: Snapshot | None, generation: int, lifetime: float | None) -> float:
        """A background refresh ended with ``snap``; the pause before the next one may run."""
        if snap is None:
            # Nothing newer (the winner announced nothing, or Redis is skipped and our copy is
            # still fresh): look again after a short pause rather than at every call; during a
            # Redis outage, no later than the breaker's next probe, so sharing resumes promptly.
            pause = self._windows.retry_interval(lifetime)
            if self._breaker.is_open:
                pause = min(pause, self.settings.redis_cooldown)
            return pause
        self._adopt(self._windows.hold(snap), generation, shared=snap.stored.fence > 0)
        return 0.0

    def _refresh_failed(self, exc: K2TokenError, lifetime: float | None) -> float:
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

    def _adopt(self, held: Held, generation: int, *, shared: bool) -> None:
        """Keep ``held`` as this process's copy, unless an invalidation happened meanwhile.

        Without ``local_cache`` only a token Redis does not have (the fallback's own) is kept:
        otherwise an outage would cost an exchange per call. The fallback's token is re-checked
        against Redis every ``redis_cooldown`` (in the background), so the process shares again
        soon after Redis answers, not only when its own token grows stale.
        """
        if generation != self._generation:
            return
        if not shared:
            probe_at = time.monotonic() + self.settings.redis_cooldown
            self._held = replace(held, recheck_at=min(held.recheck_at, probe_at))
        else:
            self._held = held if self.settings.local_cache else None

    def _forget(self, value: str) -> None:
        """Drop this process's copy if it is ``value`` (a 401 or an invalidate)."""
        held = self._held
        if held is not None and held.token.value == value:
            self._generation += 1
            self._held = None

    def _invalidated(self, value: str, deleted: bool) -> bool:
        log.info(
            "namespace %s: token %s invalidated (%s)",
            self.namespace,
            fingerprint_of(value),
            "was shared" if deleted else "no longer shared",
        )
        return deleted

    def _fallback_or_raise(self, exc: SharedCacheError) -> None:
        if not self.settings.fallback:
            raise exc

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

    def _redis_failed(self, exc: SharedCacheError) -> None:
        """Feed the breaker; log an outage's start, once."""
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

    def _redis_ok(self) -> None:
        outage = self._breaker.succeeded(time.monotonic())
        if outage is not None:
            log.warning(
                "namespace %s: Redis answers again after %.1f s; the token is shared again",
                self.namespace,
                outage,
            )

    # -- effects: the I/O, and the bookkeeping around it --------------------------------------

    _store: Any  # a RedisStore or an AsyncRedisStore: same methods, blocking or awaitable
    _exchange: Any  # an ExchangeClient or an AsyncExchangeClient: fetch()

    def _io(self, effect: flow.Effect[Any]) -> tuple[bool, Callable[[], Any]]:
        """What performs ``effect``: (whether it talks to Redis, the call; awaitable for the
        asyncio provider's store and exchange client)."""
        store = self._store
        match effect:
            case flow.Exchange():
                return False, self._exchange.fetch
            case flow.TryLock(min_ttl_ms=min_ttl_ms):
                return True, lambda: store.try_lock(min_ttl_ms)
            case flow.Publish(lock=lock, issued=issued):
                return True, lambda: store.publish(lock, issued)
            case flow.Release(lock=lock, error_code=code, holdoff_ms=ms, credentials=creds):
                return True, lambda: store.release(lock, code, ms, creds)
            case flow.Wait(timeout=timeout, min_ttl_ms=min_ttl_ms):
                return True, lambda: store.wait(timeout, min_ttl_ms)
        raise TypeError(f"unknown effect {effect!r}")  # pragma: no cover

    def _after_effect(self, effect: flow.Effect[Any], result: Any, started: float) -> None:
        """Metrics and logs of one performed effect (``started``: monotonic, before it)."""
        match effect:
            case flow.TryLock(after_timeout=True) if result.acquired:
                self._metrics.record(metrics.LOCK_TAKEOVER)
                log.warning(
                    "namespace %s: took over the refresh lock after its holder's lease ran out",
                    self.namespace,
                )
            case flow.Wait():
                self._metrics.record(metrics.WAIT, time.monotonic() - started)
            case flow.Exchange():
                self._metrics.record(metrics.EXCHANGE_OK, result.took)
                if self._breaker.is_open:
                    self._metrics.record(metrics.FALLBACK)
                log.info(
                    "namespace %s: exchanged a new token %s, valid %d s",
                    self.namespace,
                    fingerprint_of(result.value),
                    result.expires_in,
                )

    def _effect_failed(self, effect: flow.Effect[Any], started: float) -> None:
        if isinstance(effect, flow.Exchange):
            self._metrics.record(metrics.EXCHANGE_FAILED, time.monotonic() - started)
        elif isinstance(effect, flow.Wait):
            self._metrics.record(metrics.WAIT, time.monotonic() - started)

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """This process's counters (see :mod:`k2_shared_token._core.metrics`) and time sums
        (``<event>_seconds``)."""
        out: dict[str, float] = {metrics.LOCAL_HIT: self._local_hits}
        out.update(self._metrics.counts())
        out.update({f"{name}_seconds": t for name, t in self._metrics.seconds().items()})
        return out
