"""The ways to get a shared token that the stampede section compares, behind one interface.

Each contender is built before the start barrier (so construction is never timed) and then
asked for a token by every thread of its process. The four baselines exchange with the same
fake K2 server the library uses, with a plain form POST, and keep their keys in their own
namespace, so nothing but the coordination strategy differs.

- ``library``: :class:`SharedTokenProvider` with its defaults (``lock_lease=15``);
- ``library (user client)``: the same, given the ``redis.Redis.from_url(url)`` a user would
  pass (redis-py's defaults, its handshake included) instead of a URL;
- ``naive``: every process fetches its own token (what K2's SDKs leave users to do); the threads
  of a process share it through a ``threading.Lock``;
- ``redis-py Lock``: double-checked read around ``redis.Redis.lock`` (polls every 0.1 s);
- ``python-redis-lock``: the same pattern around ``redis_lock.Lock`` (BLPOP wake-ups);
- ``dogpile.cache``: ``region.get_or_create`` on the redis backend with ``distributed_lock``;
- ``warm GET``: not a contender but the floor: the cache is already warm and every thread does
  one plain redis-py ``GET`` on a default client, connection set-up included, as the cold
  library's processes must set theirs up too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import requests

from k2_shared_token import SharedTokenProvider
from k2_shared_token.testing.fake_k2 import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

LOCK_LEASE = 15  # seconds, the same lease for every contender that takes a lock
BLOCKING_TIMEOUT = 20  # seconds a redis-py Lock waiter gives up after (the library's wait_timeout)


@dataclass(frozen=True)
class Target:
    """Where a contender talks to, and the key namespace it alone uses."""

    redis_url: str
    base_url: str
    prefix: str


class Contender(Protocol):
    def get_token(self) -> str: ...

    def close(self) -> None: ...


def fetch_token(session: requests.Session, base_url: str) -> tuple[str, int]:
    """One client-credentials exchange, the way a hand-written client does it."""
    reply = session.post(
        f"{base_url}/oauth/token",
        data={
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "grant_type": "client_credentials",
        },
        timeout=(3.05, 10),
    )
    reply.raise_for_status()
    body = reply.json()
    return str(body["access_token"]), int(body["expires_in"])


class Library:
    """This library, configured as a user would: defaults, plus the benchmark's namespace."""

    def __init__(self, target: Target, redis_client: Any = None) -> None:
        self._redis = redis_client
        self._provider = SharedTokenProvider(
            client_id=DEFAULT_CLIENT_ID,
            client_secret=DEFAULT_CLIENT_SECRET,
            base_url=target.base_url,
            redis=target.redis_url if redis_client is None else redis_client,
            key_prefix=target.prefix,
            lock_lease=LOCK_LEASE,
        )

    def get_token(self) -> str:
        return self._provider.get_token()

    def close(self) -> None:
        self._provider.close()
        if self._redis is not None:
            self._redis.close()


class LibraryUserClient(Library):
    """The library given a client built the way a user builds one: redis-py's defaults."""

    def __init__(self, target: Target) -> None:
        super().__init__(target, redis.Redis.from_url(target.redis_url))


def warm_key(target: Target) -> str:
    """The key the warm-GET baseline reads; the coordinator writes it before the round."""
    return f"{target.prefix}:token"


class WarmGet:
    """The floor: one plain GET per thread of a key already there, on a default client.

    Built like a user's client (nothing connected before the start), so each process pays its
    connection set-up inside the measurement, as a cold library process does.
    """

    def __init__(self, target: Target) -> None:
        self._redis = redis.Redis.from_url(target.redis_url)
        self._key = warm_key(target)

    def get_token(self) -> str:
        value: Any = self._redis.get(self._key)
        if value is None:
            raise LookupError("the warm key is missing")
        return str(value.decode())

    def close(self) -> None:
        self._redis.close()


class Naive:
    """No sharing across processes: each fetches once; its threads wait on a local lock."""

    def __init__(self, target: Target) -> None:
        self._base_url = target.base_url
        self._session = requests.Session()
        self._lock = threading.Lock()
        self._token: str | None = None

    def get_token(self) -> str:
        token = self._token
        if token is not None:
            return token
        with self._lock:
            if self._token is None:
                self._token, _ = fetch_token(self._session, self._base_url)
            return self._token

    def close(self) -> None:
        self._session.close()


class _DoubleChecked:
    """GET; on a miss take a distributed lock, GET again, else exchange and SET with EX."""

    def __init__(self, target: Target) -> None:
        self._base_url = target.base_url
        self._redis = redis.Redis.from_url(target.redis_url)
        self._session = requests.Session()
        self._key = f"{target.prefix}:token"
        self._lock_name = f"{target.prefix}:lock"

    def _lock(self) -> Any:
        raise NotImplementedError

    def get_token(self) -> str:
        cached: Any = self._redis.get(self._key)
        if cached is not None:
            return str(cached.decode())
        with self._lock():
            cached = self._redis.get(self._key)
            if cached is not None:
                return str(cached.decode())
            token, expires_in = fetch_token(self._session, self._base_url)
            self._redis.set(self._key, token, ex=expires_in)
            return token

    def close(self) -> None:
        self._session.close()
        self._redis.close()


class RedisPyLock(_DoubleChecked):
    """redis-py's own Lock: SET NX, then a retry every 0.1 s (its default sleep)."""

    def _lock(self) -> Any:
        return self._redis.lock(
            self._lock_name, timeout=LOCK_LEASE, blocking_timeout=BLOCKING_TIMEOUT
        )


class PythonRedisLock(_DoubleChecked):
    """python-redis-lock: waiters block in BLPOP on a signal list; a release wakes one."""

    def _lock(self) -> Any:
        import redis_lock  # noqa: PLC0415 - imported by the children that use it

        return redis_lock.Lock(self._redis, self._lock_name, expire=LOCK_LEASE)


class Dogpile:
    """dogpile.cache's region on the redis backend, with its Redis lock as the dogpile lock."""

    def __init__(self, target: Target) -> None:
        from dogpile.cache import make_region  # noqa: PLC0415 - imported by its users only

        self._base_url = target.base_url
        self._session = requests.Session()
        self._key = f"{target.prefix}:token"
        self._region = make_region().configure(
            "dogpile.cache.redis",
            expiration_time=3600,
            arguments={
                "url": target.redis_url,
                "distributed_lock": True,
                "thread_local_lock": False,
                "lock_timeout": LOCK_LEASE,
                "redis_expiration_time": 3600,
            },
        )

    def _create(self) -> str:
        token, _ = fetch_token(self._session, self._base_url)
        return token

    def get_token(self) -> str:
        return str(self._region.get_or_create(self._key, self._create))

    def close(self) -> None:
        self._session.close()
        backend: Any = self._region.backend
        for client in {id(c): c for c in (backend.writer_client, backend.reader_client)}.values():
            client.close()


CONTENDERS: dict[
    str,
    type[Library | LibraryUserClient | Naive | RedisPyLock | PythonRedisLock | Dogpile | WarmGet],
] = {
    "library": Library,
    "library (user client)": LibraryUserClient,
    "naive": Naive,
    "redis-py Lock": RedisPyLock,
    "python-redis-lock": PythonRedisLock,
    "dogpile.cache": Dogpile,
    "warm GET": WarmGet,
}
BASELINE = "warm GET"  # the floor: no exchange, measured in the same run


def build(name: str, target: Target) -> Contender:
    return CONTENDERS[name](target)
