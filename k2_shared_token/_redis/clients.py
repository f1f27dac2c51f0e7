"""The redis-py clients a provider makes from a URL, for every form we accept.

:func:`redis_client` decides the connection options (short timeouts, RESP2, no client-info
handshake, a one-retry budget) once; the ``redis+cluster://`` and ``redis+sentinel://`` forms
then differ only in how each topology takes them, because the two redis-py families disagree:

* ``RedisCluster`` refuses ``retry`` among the per-node options: its own ``retry`` only counts
  how often a command is re-routed after the slot map is re-read (a connection error or
  CLUSTERDOWN), and every node connection gets none.
* The blocking ``RedisCluster`` contacts its startup nodes in its constructor. A provider is
  built at import time of an app and must come up, serving its process-local token, while
  Redis is down, as it does with a plain client; so :class:`LazyCluster` defers that contact
  to the first command, where a failure is an ordinary Redis error the circuit breaker sees.
* ``Sentinel(...).master_for(name)`` opens connections to the sentinels as well as to the
  primary. Closing the returned client closes only the primary's pool, so the client classes
  here also close the sentinel connections: the provider owns everything a URL made.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from .._core.errors import ConfigurationError
from .urls import (
    CLUSTER_SCHEME,
    SENTINEL_SCHEME,
    Address,
    parse_cluster_url,
    parse_sentinel_url,
    scheme_of,
)

__all__ = [
    "LazyCluster",
    "cluster_client",
    "connect",
    "redis_client",
    "sentinel_client",
    "topology_client",
]


def redis_client(url: str, timeout: float, *, asyncio: bool = False) -> Any:
    """A redis-py client with short timeouts, one immediate retry and a one-trip handshake.

    The retry survives a connection Redis dropped (a restart, an idle timeout): that error
    comes at once, and a fresh connection usually cures it. A timeout is never retried: against
    a partitioned Redis each attempt waits the whole timeout, and redis-py nests its retries
    (the health-check PING a connection sends before its first command retries too), so
    retrying timeouts would make one command cost several. More retries with backoff,
    redis-py's default, would turn a partition into seconds of stall per call.
    RESP2 and no client-info commands: redis-py's default handshake (HELLO 3, a maintenance
    notification probe, two CLIENT SETINFO) costs four round trips per new connection, which a
    cold fleet opening hundreds of connections at once pays all together.

    Besides redis-py's own forms (``redis://``, ``rediss://``, ``unix://``: one server),
    ``redis+cluster://host:port[,host:port...]/`` builds a ``RedisCluster`` and
    ``redis+sentinel://host:port[,host:port...]/<primary name>[/<db>]`` a client of the
    primary the sentinels name (see :mod:`.redis_urls`), with the same options; after a
    failover they find the new primary by themselves. ``asyncio=True`` builds the
    ``redis.asyncio`` equivalents.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
        "protocol": 2,
        **_NO_CLIENT_INFO,
    }
    retry = (AsyncRetry if asyncio else Retry)(NoBackoff(), 1, (redis.ConnectionError,))
    client = topology_client(url, retry, options, asyncio=asyncio)
    if client is None:
        cls: Any = redis.asyncio.Redis if asyncio else redis.Redis
        client = cls.from_url(url, retry=retry, **options)
    return client


# redis-py 8 takes driver_info=None to skip CLIENT SETINFO; older versions take lib_name=None.
_NO_CLIENT_INFO: dict[str, None] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def connect(redis_or_url: str | Any, timeout: float, *, asyncio: bool = False) -> tuple[Any, bool]:
    """The client for a provider's (or registry's) ``redis`` argument, and whether the caller
    owns it: a URL makes a client it must close; a client passed in stays the caller's."""
    if isinstance(redis_or_url, str):
        if not redis_or_url.strip():
            raise ConfigurationError("redis must be a Redis URL or a redis-py client")
        try:
            return redis_client(redis_or_url, timeout, asyncio=asyncio), True
        except ValueError as exc:
            raise ConfigurationError(f"redis URL is not valid: {exc}") from None
    if redis_or_url is None or not hasattr(redis_or_url, "register_script"):
        raise ConfigurationError("redis must be a Redis URL or a redis-py client")
    _check_side(redis_or_url, asyncio=asyncio)
    return redis_or_url, False


_ASYNC_CLIENTS = (redis.asyncio.Redis, AsyncRedisCluster)
_BLOCKING_CLIENTS = (redis.Redis, RedisCluster)


def _check_side(client: Any, *, asyncio: bool) -> None:
    """A client of the other redis-py family, or one that cannot subscribe, fails here, at
    construction, not as a raw TypeError or AttributeError at the first wait."""
    if asyncio and isinstance(client, _BLOCKING_CLIENTS):
        raise ConfigurationError(
            "AsyncSharedTokenProvider needs a redis.asyncio client (got a blocking "
            f"{type(client).__name__}); pass a URL or a redis.asyncio client"
        )
    if not asyncio and isinstance(client, _ASYNC_CLIENTS):
        raise ConfigurationError(
            f"SharedTokenProvider needs a blocking redis-py client (got a redis.asyncio "
            f"{type(client).__name__}); use AsyncSharedTokenProvider for asyncio code"
        )
    if isinstance(client, (*_ASYNC_CLIENTS, *_BLOCKING_CLIENTS)) and not callable(
        getattr(type(client), "pubsub", None)
    ):
        raise ConfigurationError(
            f"this redis-py {type(client).__name__} cannot subscribe (no pubsub()), and waiters "
            "are woken by pub/sub; upgrade redis-py (see the declared floor)"
        )


def topology_client(
    url: str, retry: Any, options: dict[str, Any], *, asyncio: bool = False
) -> Any | None:
    """The client for a ``redis+cluster://`` or ``redis+sentinel://`` URL; None for any other
    URL (redis-py's ``from_url`` forms). Raises ValueError for a malformed one."""
    scheme = scheme_of(url)
    if scheme == CLUSTER_SCHEME:
        return cluster_client(parse_cluster_url(url), retry, options, asyncio=asyncio)
    if scheme == SENTINEL_SCHEME:
        return sentinel_client(*parse_sentinel_url(url), retry, options, asyncio=asyncio)
    return None


class LazyCluster:
    """A blocking ``RedisCluster`` built on first use, and rebuilt after a failed build.

    Attribute access builds it, so the first command (inside the store's error handling)
    pays for the discovery, and a cluster that is unreachable then is one failed call, not a
    provider that cannot be constructed. ``close()`` of a never-built client does nothing.
    """

    def __init__(self, build: Callable[[], RedisCluster]) -> None:
        self._build = build
        self._built: RedisCluster | None = None
        self._lock = threading.Lock()  # held only to publish the result, never across I/O

    @property
    def built(self) -> RedisCluster | None:
        return self._built

    def _client(self) -> RedisCluster:
        client = self._built
        if client is not None:
            return client
        fresh = self._build()  # may raise: the next use tries again
        with self._lock:
            if self._built is None:
                self._built = fresh
                return fresh
            client = self._built
        fresh.close()  # another thread finished first; keep one set of connections
        return client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client(), name)

    def close(self) -> None:
        client, self._built = self._built, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"LazyCluster(built={self._built is not None})"


def cluster_client(
    nodes: list[Address], retry: Any, options: dict[str, Any], *, asyncio: bool = False
) -> Any:
    """A cluster client over ``nodes`` (any reachable one is enough to discover the rest).

    ``retry`` re-routes a failed command after the slot map was re-read (a failover, a
    migrated slot); the node connections never retry on their own. The blocking client
    silently drops ``health_check_interval``, which is not among its per-node options.
    ``require_full_coverage=False``: a namespace lives in one slot, so a range that no node
    serves elsewhere in the cluster must not stop this client from reaching ours.
    """
    if asyncio:
        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(host, port) for host, port in nodes],
            require_full_coverage=False,
            retry=retry,
            **options,
        )

    def build() -> RedisCluster:
        startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
        return RedisCluster(
            startup_nodes=startup, require_full_coverage=False, retry=retry, **options
        )

    return LazyCluster(build)


class SentinelPrimary(redis.Redis):
    """``master_for``'s client; closing it also closes the connections to the sentinels."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                sentinel.close()


class AsyncSentinelPrimary(redis.asyncio.Redis):
    """The asyncio counterpart of :class:`SentinelPrimary`."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                await sentinel.aclose()


def sentinel_client(
    sentinels: list[Address],
    name: str,
    db: int,
    retry: Any,
    options: dict[str, Any],
    *,
    asyncio: bool = False,
) -> Any:
    """A client of the primary the sentinels call ``name``; it follows a failover by asking
    them again whenever it (re)connects.

    The sentinel connections get the same short timeouts, handshake and retry as the data ones:
    a dead or partitioned sentinel must cost one timeout, not a default one, nor redis-py's
    default retries with backoff, before the next is asked.
    """
    family: Any = AsyncSentinel if asyncio else Sentinel
    primary = AsyncSentinelPrimary if asyncio else SentinelPrimary
    manager = family(sentinels, sentinel_kwargs={**options, "retry": retry}, **options)
    return manager.master_for(name, redis_class=primary, db=db, retry=retry)
