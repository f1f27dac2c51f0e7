"""The Redis side, for blocking redis-py clients: keys, scripts and the waiter's subscription.

One method per script in :mod:`.redis_layout`, each one round trip. Every redis error becomes a
:class:`SharedCacheError` (chained), so callers never see a raw redis exception, and every value
read back goes through :func:`codec.decode`: a value that is not ours reads as a miss, logged
once per distinct problem, and is overwritten by the next write.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from .._core.errors import SharedCacheError
from .._core.flow import LockAttempt, WaitOutcome
from .._core.tokens import IssuedToken, Snapshot
from .commands import Call, Namespace
from .layout import Keys

T = TypeVar("T")
R = TypeVar("R")


_LOADED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def loaded_scripts(client: Any) -> set[str]:
    """SHA-1s of the scripts this client has run, shared by every store on the client.

    Scripts are sent whole on first use (EVAL), then by SHA (EVALSHA). redis-py's
    ``register_script`` starts with EVALSHA and, on the NOSCRIPT every fresh process gets, loads
    the script and calls again: three round trips on the cold path, where a stampeding fleet
    waits for them; EVAL caches the script as it runs it, so the first call costs one. Keyed by
    client, so a registry of a thousand namespaces on one client sends each script whole once,
    not a thousand times. After a Redis restart (empty script cache) one NOSCRIPT costs one more.
    """
    try:
        return _LOADED.setdefault(client, set())
    except TypeError:  # a client that cannot be weakly referenced: a cache of its own
        return set()


class PipelinedRead:
    """The read as three plain commands in one write: GET token, PTTL token, PTTL lock.

    Same round trip as the READ script, but Redis runs no Lua and redis-py builds no command
    objects: about 1.1x a bare GET instead of 1.4x, which is what a worker with
    ``local_cache=False`` pays per call. Redis executes a client's pipelined commands from one
    read of its socket back to back, so the value and its TTL describe the same write; the
    Lua script remains the fallback for clients without a plain connection pool (Cluster).
    """

    def __init__(self, pool: Any, keys: Keys) -> None:
        self._pool = pool
        self._commands = (("GET", keys.token), ("PTTL", keys.token), ("PTTL", keys.lock))
        self._packed: list[bytes] | None = None

    @classmethod
    def for_client(cls, client: Any, keys: Keys) -> PipelinedRead | None:
        # The type first: a lazily built cluster client would connect on any attribute read.
        if not isinstance(client, redis.Redis):
            return None
        pool = getattr(client, "connection_pool", None)
        if not isinstance(pool, redis.ConnectionPool):
            return None
        return cls(pool, keys)

    def read(self) -> tuple[Any, Any, Any]:
        for attempt in (1, 2):  # one retry on a fresh connection, as the client's Retry does
            conn = self._pool.get_connection()
            try:
                if self._packed is None:
                    self._packed = conn.pack_commands(self._commands)
                conn.send_packed_command(self._packed)
                return self._reply(conn), self._reply(conn), self._reply(conn)
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                conn.disconnect()  # replies may be left unread: never reuse this connection
                raise
            finally:
                self._pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _reply(conn: Any) -> Any:
        try:
            return conn.read_response()
        except redis.ResponseError:  # WRONGTYPE: someone else's data under our key
            return b"!wrongtype"


# A cluster client's own failures (no reachable node while it re-reads the slot map, a slot
# no node serves) are not RedisErrors; to a caller they are Redis failing like any other.
REDIS_FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException)


def guard(what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except REDIS_FAILURES as exc:
        raise cache_error(what, exc) from exc


def cache_error(what: str, exc: BaseException) -> SharedCacheError:
    """The package's error for a failed Redis call: names the failure class, never its text
    (which can carry a URL with a password)."""
    return SharedCacheError(f"Redis failed during {what}: {type(exc).__name__}")


class RedisStore:
    """All Redis I/O of one namespace, blocking. What is sent and how replies read is
    :class:`commands.Namespace`'s, shared with the asyncio store."""

    def __init__(self, client: Any, ops: Namespace) -> None:
        self.client = client
        self.ops = ops
        self.keys = keys = ops.keys
        self.namespace = ops.namespace
        self._loaded = loaded_scripts(client)
        self._pipelined = PipelinedRead.for_client(client, keys)

    def run(self, call: Call[R]) -> R:
        try:
            reply = self._eval(call)
        except REDIS_FAILURES as exc:
            self.ops.unanswered(call)
            raise cache_error(call.what, exc) from exc
        for cleanup in self.ops.cleanups():
            with contextlib.suppress(*REDIS_FAILURES):
                self._eval(cleanup)
        return call.parse(reply)

    def _eval(self, call: Call[Any]) -> Any:
        script, keys, args = call.script, call.keys, call.args
        if script.sha in self._loaded:
            try:
                return self.client.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                pass
        result = self.client.eval(script.source, len(keys), *keys, *args)
        self._loaded.add(script.sha)
        return result

    def read(self) -> Snapshot | None:
        return self._read_with_lock()[0]

    def _read_with_lock(self) -> tuple[Snapshot | None, int]:
        if self._pipelined is not None:
            return self.ops.read_reply(*guard("read", self._pipelined.read))
        return self.run(self.ops.read())

    def try_lock(self, min_ttl_ms: int) -> LockAttempt:
        return self.run(self.ops.try_lock(min_ttl_ms))

    def publish(self, lock: LockAttempt, issued: IssuedToken) -> Snapshot:
        snap, call = self.ops.publish(lock, issued)
        if call is not None:
            self.run(call)
        return snap

    def release(
        self, lock: LockAttempt, error_code: str, holdoff_ms: int = 0, credentials: bool = False
    ) -> None:
        self.run(self.ops.release(lock, error_code, holdoff_ms, credentials))

    def invalidate(self, token: str) -> bool:
        return self.run(self.ops.invalidate(token))

    def clear(self) -> bool:
        """Unconditional delete of the shared token (``k2-token invalidate --force``)."""
        return bool(guard("clear", lambda: self.client.delete(self.keys.token)))

    def status(self) -> dict[str, Any]:
        """The shared state of this namespace, for operators; never the token itself."""

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for command, key in self.ops.status_keys():
                pipe.execute_command(command, key)
            return list(pipe.execute(raise_on_error=False))

        return self.ops.status(guard("status", read))

    def wait(self, timeout: float, min_ttl_ms: int) -> WaitOutcome:
        """Subscribe, re-read, then block on the channel until an announcement or ``timeout``."""
        deadline = time.monotonic() + timeout
        # Inside the guard: a cluster client built lazily may meet Redis here for the first time.
        pubsub = guard("wait", self.client.pubsub)
        try:
            return guard("wait", lambda: self._wait(pubsub, deadline, min_ttl_ms))
        finally:
            guard("unsubscribe", pubsub.close)

    def _wait(self, pubsub: Any, deadline: float, min_ttl_ms: int) -> WaitOutcome:
        pubsub.subscribe(self.keys.channel)
        subscribed = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return WaitOutcome(None, timed_out=True)
            message = pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "subscribe":
                subscribed = True
                done = self.ops.after_subscribe(*self._read_with_lock(), min_ttl_ms)
            elif message["type"] == "message" and subscribed:
                done = self.ops.on_message(message["data"])
            else:
                continue
            if done is not None:
                return done
