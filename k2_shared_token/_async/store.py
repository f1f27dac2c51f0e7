"""The Redis side of one namespace: one method per script in :mod:`.._redis.layout`, each one
round trip, and the waiter's subscription.

What is sent and how replies read is :class:`.._redis.commands.Namespace`'s. Every redis error
becomes a :class:`SharedCacheError` (chained), so callers never see a raw redis exception, and
every value read back goes through :func:`.._redis.codec.decode`: a value that is not ours reads
as a miss, logged once per distinct problem, and is overwritten by the next write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.asyncio

from .._core.flow import LockAttempt, WaitOutcome
from .._core.tokens import IssuedToken, Snapshot
from .._redis.commands import REDIS_FAILURES, Call, Namespace, cache_error, loaded_scripts
from .._redis.layout import Keys

log = logging.getLogger("k2_shared_token.store")

R = TypeVar("R")


class AsyncPipelinedRead:
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
    def for_client(cls, client: Any, keys: Keys) -> AsyncPipelinedRead | None:
        # The type first: a lazily built cluster client would connect on any attribute read.
        if not isinstance(client, redis.asyncio.Redis):
            return None
        pool = getattr(client, "connection_pool", None)
        if not isinstance(pool, redis.asyncio.ConnectionPool):
            return None
        return cls(pool, keys)

    async def read(self) -> tuple[Any, Any, Any]:
        """Retried as the client retries its own commands (the connection's ``Retry``): ours
        retries a dropped connection once and never a timeout; a client passed in keeps its
        policy."""
        conn = await self._pool.get_connection()
        try:
            replies: tuple[Any, Any, Any] = await conn.retry.call_with_retry(
                lambda: self._send(conn), lambda _: conn.disconnect()
            )
            return replies
        except BaseException:
            await conn.disconnect()  # replies may be left unread: never reuse this one
            raise
        finally:
            await self._pool.release(conn)

    async def _send(self, conn: Any) -> tuple[Any, Any, Any]:
        if self._packed is None:
            self._packed = conn.pack_commands(self._commands)
        await conn.send_packed_command(self._packed)
        return await self._reply(conn), await self._reply(conn), await self._reply(conn)

    @staticmethod
    async def _reply(conn: Any) -> Any:
        try:
            return await conn.read_response()
        except redis.ResponseError:  # WRONGTYPE: someone else's data under our key
            return b"!wrongtype"


class AsyncRedisStore:
    """All Redis I/O of one namespace."""

    def __init__(self, client: Any, ops: Namespace) -> None:
        self.client = client
        self.ops = ops
        self.keys = ops.keys
        self.namespace = ops.namespace
        self._loaded = loaded_scripts(client)
        self._pipelined = AsyncPipelinedRead.for_client(client, ops.keys)

    async def run(self, call: Call[R]) -> R:
        try:
            reply = await self._eval(call)
        except BaseException as exc:
            # No reply, or an interruption (a cancellation, Ctrl-C) after the script perhaps
            # ran: a lock it took has no owner left in this process to give it back.
            self.ops.unanswered(call)
            if isinstance(exc, REDIS_FAILURES):
                raise cache_error(call.what, exc) from exc
            raise
        result = call.parse(reply)  # first: a snapshot's age counts from this reply
        try:
            await self.release_orphans()
        except BaseException:
            self.ops.unanswered(call)  # interrupted here: the flow never gets this lock attempt
            raise
        return result

    async def release_orphans(self) -> None:
        """Give back the lock attempts left without a reply (owner-only, so harmless when
        they took nothing). Best effort, and at most one failed round trip: the rest are kept
        for later (as on an interruption), and an orphan's lease frees it anyway."""
        cleanups = self.ops.cleanups()
        for i, cleanup in enumerate(cleanups):
            try:
                await self._eval(cleanup)
            except BaseException as exc:
                self.ops.orphaned(cleanups[i:])
                if not isinstance(exc, REDIS_FAILURES):
                    raise
                failure = type(exc).__name__
                log.debug("namespace %s: orphan release failed (%s)", self.namespace, failure)
                return

    async def _eval(self, call: Call[Any]) -> Any:
        script, keys, args = call.script, call.keys, call.args
        if script.sha in self._loaded:
            try:
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                pass
        result = await self.client.eval(script.source, len(keys), *keys, *args)
        self._loaded.add(script.sha)
        return result

    async def read(self) -> Snapshot | None:
        return (await self._read_with_lock())[0]

    async def _read_with_lock(self) -> tuple[Snapshot | None, int]:
        if self._pipelined is None:
            return await self.run(self.ops.read())
        try:
            replies = await self._pipelined.read()
        except REDIS_FAILURES as exc:
            raise cache_error("read", exc) from exc
        return self.ops.read_reply(*replies)

    async def try_lock(self, min_ttl_ms: int) -> LockAttempt:
        return await self.run(self.ops.try_lock(min_ttl_ms))

    async def publish(
        self,
        lock: LockAttempt,
        issued: IssuedToken,
        reuse: bool = False,
        keep: Snapshot | None = None,
    ) -> Snapshot:
        snap, call = self.ops.publish(lock, issued, reuse, keep)
        await self.run(call)
        return snap

    async def release(
        self,
        lock: LockAttempt,
        error_code: str = "",
        holdoff_ms: int = 0,
        credentials: bool = False,
    ) -> None:
        await self.run(self.ops.release(lock, error_code, holdoff_ms, credentials))

    async def learn(self, trait: str) -> None:
        await self.run(self.ops.learn(trait))

    async def invalidate(self, token: str) -> int:
        """1: deleted; 3: deleted while a lock holder exchanges; 2: another token is shared
        (this one was replaced); 0: none is."""
        return await self.run(self.ops.invalidate(token))

    async def clear(self) -> bool:
        """Unconditional delete of the shared token (``k2-token invalidate --force``)."""
        try:
            return bool(await self.client.delete(self.keys.token))
        except REDIS_FAILURES as exc:
            raise cache_error("clear", exc) from exc

    async def status(self) -> dict[str, Any]:
        """The shared state of this namespace, for operators; never the token itself."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for command, key in self.ops.status_keys():
                pipe.execute_command(command, key)
            replies = list(await pipe.execute(raise_on_error=False))
        except REDIS_FAILURES as exc:
            raise cache_error("status", exc) from exc
        return self.ops.status(replies)

    async def wait(
        self,
        timeout: float,
        min_ttl_ms: int,
        replacing: bool = False,
        keep: Callable[[Any], bool] | None = None,
    ) -> WaitOutcome:
        """Subscribe, re-read, then wait on the channel until an announcement or ``timeout``.

        ``keep``: offered the subscription when the wait ended with it intact (subscribed, no
        error); if it takes it (True), it is not closed here. A cold process hands it to its
        backplane, which then needs no connection and no SUBSCRIBE of its own.
        """
        deadline = time.monotonic() + timeout
        try:
            # Inside the guard: a cluster client built lazily may meet Redis here first.
            pubsub = self.client.pubsub()
        except REDIS_FAILURES as exc:
            raise cache_error("wait", exc) from exc
        kept = False
        try:
            outcome, subscribed = await self._wait(pubsub, deadline, min_ttl_ms, replacing)
            kept = subscribed and keep is not None and keep(pubsub)
            return outcome
        except REDIS_FAILURES as exc:
            raise cache_error("wait", exc) from exc
        finally:
            if not kept:
                await self._unsubscribe(pubsub)

    async def close_subscription(self, pubsub: Any) -> None:
        """Close a subscription a wait handed out (``keep``) that found no taker."""
        await self._unsubscribe(pubsub)

    async def _unsubscribe(self, pubsub: Any) -> None:
        """Close the subscription. Its failure is logged and dropped: it must never replace
        the wait's result, nor the error the wait is already raising."""
        try:
            await pubsub.aclose()
        except REDIS_FAILURES as exc:
            log.debug("namespace %s: unsubscribe failed (%s)", self.namespace, type(exc).__name__)

    async def _wait(
        self, pubsub: Any, deadline: float, min_ttl_ms: int, replacing: bool
    ) -> tuple[WaitOutcome, bool]:
        """The outcome, and whether the subscription was confirmed."""
        await pubsub.subscribe(self.keys.channel)
        subscribed = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return WaitOutcome(None, timed_out=True), subscribed
            message = await pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "subscribe":
                subscribed = True
                snap, lock_ttl = await self._read_with_lock()
                done = self.ops.after_subscribe(snap, lock_ttl, min_ttl_ms, replacing)
            elif message["type"] == "message" and subscribed:
                done = self.ops.on_message(message["data"])
            else:
                continue
            if done is not None:
                return done, subscribed
