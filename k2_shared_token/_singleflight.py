"""One in-flight call per process: the other threads wait for its result.

Only the leader thread talks to the Redis lock; in a 32-thread worker that is one lock attempt
and one subscription instead of 32. Followers get the leader's result or its exception.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

from ._core.errors import TokenUnavailableError

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Future[T] | None = None

    def run(self, call: Callable[[], T], follower_timeout: float) -> T:
        with self._lock:
            future = self._current
            leader = future is None
            if future is None:
                future = self._current = Future()
        if not leader:
            try:
                return future.result(follower_timeout)
            except FutureTimeout:
                raise TokenUnavailableError(
                    "no token within wait_timeout: this process's refresh is still running"
                ) from None
        try:
            result = call()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            # Hand the GIL over now: otherwise the waiting threads sit out up to a switch
            # interval (5 ms) each while this one keeps running, which a cold fleet of many
            # multi-threaded processes on few cores pays many times over.
            time.sleep(0)
            return result
        finally:
            with self._lock:
                self._current = None


class AsyncSingleFlight(Generic[T]):
    """The same for asyncio tasks of one event loop: one task asks, the others await it."""

    def __init__(self) -> None:
        self._current: asyncio.Future[T] | None = None

    async def run(self, call: Callable[[], Awaitable[T]], follower_timeout: float) -> T:
        future = self._current
        if future is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(future), follower_timeout)
            except asyncio.TimeoutError:
                raise TokenUnavailableError(
                    "no token within wait_timeout: this process's refresh is still running"
                ) from None
        future = self._current = asyncio.get_running_loop().create_future()
        try:
            result = await call()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without followers
            raise
        else:
            future.set_result(result)
            return result
        finally:
            self._current = None
