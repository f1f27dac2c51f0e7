"""The Redis side for ``redis.asyncio`` clients: the same calls as :mod:`.store`, awaited.

What is sent and how replies read comes from :class:`commands.Namespace`, so an asyncio worker
and a blocking one share the token, the lock and the hold-off of one namespace. Only the
waiting differs; scripts are cached as in :func:`.store.loaded_scripts` (EVAL first, then
EVALSHA with one fallback after a Redis restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, TypeVar

import redis
import redis.asyncio

from .._core.flow import LockAttempt, WaitOutcome
from .._core.tokens import IssuedToken, Snapshot
from .commands import Call, Namespace
from .store import REDIS_FAILURES, cache_error, loaded_scripts

R = TypeVar("R")


class AsyncRedisStore:
    def __init__(self, client: Any, ops: Namespace) -> None:
        self.client = client
        self.ops = ops
        self.keys = ops.keys
        self._cached = loaded_scripts(client)

    async def run(self, call: Call[R]) -> R:
        try:
            reply = await self._eval(call)
        except REDIS_FAILURES as exc:
            self.ops.unanswered(call)
            raise cache_error(call.what, exc) from exc
        for cleanup in self.ops.cleanups():
            with contextlib.suppress(*REDIS_FAILURES):
                await self._eval(cleanup)
        return call.parse(reply)

    async def _eval(self, call: Call[Any]) -> Any:
        script, keys, args = call.script, call.keys, call.args
        if script.sha in self._cached:
            try:
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                pass
        result = await self.client.eval(script.source, len(keys), *keys, *args)
        self._cached.add(script.sha)
        return result

    async def read(self) -> Snapshot | None:
        return (await self.run(self.ops.read()))[0]

    async def try_lock(self, min_ttl_ms: int) -> LockAttempt:
        return await self.run(self.ops.try_lock(min_ttl_ms))

    async def publish(self, lock: LockAttempt, issued: IssuedToken) -> Snapshot:
        snap, call = self.ops.publish(lock, issued)
        if call is not None:
            await self.run(call)
        return snap

    async def release(
        self, lock: LockAttempt, error_code: str, holdoff_ms: int = 0, credentials: bool = False
    ) -> None:
        await self.run(self.ops.release(lock, error_code, holdoff_ms, credentials))

    async def invalidate(self, token: str) -> bool:
        return await self.run(self.ops.invalidate(token))

    async def wait(self, timeout: float, min_ttl_ms: int) -> WaitOutcome:
        """Subscribe, re-read, then wait on the channel (see :meth:`.store.RedisStore.wait`)."""
        deadline = time.monotonic() + timeout
        pubsub = self.client.pubsub()
        try:
            return await self._wait(pubsub, deadline, min_ttl_ms)
        except REDIS_FAILURES as exc:
            raise cache_error("wait", exc) from exc
        finally:
            try:
                await pubsub.aclose()
            except REDIS_FAILURES as exc:
                raise cache_error("unsubscribe", exc) from exc

    async def _wait(self, pubsub: Any, deadline: float, min_ttl_ms: int) -> WaitOutcome:
        await pubsub.subscribe(self.keys.channel)
        subscribed = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return WaitOutcome(None, timed_out=True)
            try:
                message = await asyncio.wait_for(pubsub.get_message(timeout=left), left + 1.0)
            except asyncio.TimeoutError:
                continue
            if message is None:
                continue
            if message["type"] == "subscribe":
                subscribed = True
                done = self.ops.after_subscribe(*await self.run(self.ops.read()), min_ttl_ms)
            elif message["type"] == "message" and subscribed:
                done = self.ops.on_message(message["data"])
            else:
                continue
            if done is not None:
                return done
