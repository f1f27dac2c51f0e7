"""Run a provider-level test against the blocking and the asyncio provider alike.

:class:`BlockingView` puts an :class:`AsyncSharedTokenProvider` on an event loop of its own
thread and offers the blocking provider's methods: a call from a test thread becomes a task on
that loop, and the test waits for it. So a test written once with blocking calls (and threads
for concurrency) exercises the asyncio provider's tasks, single flight and refresher for real.
Attributes are forwarded: a test may reach into ``_local`` or ``_store`` on either side, and a
coroutine a forwarded method returns is run on the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import requests
from requests.auth import AuthBase

from k2_shared_token import AsyncSharedTokenProvider
from k2_shared_token.contrib.requests_auth import K2BearerAuth

T = TypeVar("T")


class EventLoopThread:
    """One event loop on a daemon thread; ``run`` blocks the caller until a coroutine ends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class _Forward:
    """Forwards attribute reads to ``target``, running whatever coroutine a call returns."""

    def __init__(self, target: Any, loop: EventLoopThread) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_loop", loop)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if inspect.iscoroutinefunction(value):
            return lambda *a, **k: self._loop.run(value(*a, **k))
        if type(value).__module__.startswith("k2_shared_token._async"):
            return _Forward(value, self._loop)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)


class BlockingView(_Forward):
    """The blocking provider's API over an asyncio provider (see the module docstring)."""

    side = "async"

    def __init__(self, loop: EventLoopThread, **kwargs: Any) -> None:
        async def build() -> AsyncSharedTokenProvider:
            return AsyncSharedTokenProvider(**kwargs)

        super().__init__(loop.run(build()), loop)

    def __repr__(self) -> str:
        return f"BlockingView({self._target!r})"

    def auth(self) -> AuthBase:
        return K2BearerAuth(self)  # type: ignore[arg-type]

    def close(self) -> None:
        self._loop.run(self._target.aclose())

    def __enter__(self) -> BlockingView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def maker(side: str, loop: Callable[[], EventLoopThread]) -> Callable[..., Any]:
    """A provider constructor for ``side`` ("sync" or "async")."""
    if side == "sync":
        from k2_shared_token import SharedTokenProvider  # noqa: PLC0415

        return SharedTokenProvider
    return lambda **kwargs: BlockingView(loop(), **kwargs)


def users_http_client(side: str, **httpx_options: Any) -> Any:
    """An HTTP client of ``side``'s kind, built as a user passes it (``session=``): theirs to
    close, with :func:`close_users_http_client`. requests follows redirects by default."""
    if side == "sync":
        return requests.Session()
    return httpx.AsyncClient(**httpx_options)


def close_users_http_client(provider: Any, client: Any) -> None:
    """Close it on its side: an httpx.AsyncClient on the provider's event loop."""
    if isinstance(client, requests.Session):
        client.close()
    else:
        provider._loop.run(client.aclose())


def underlying(provider: Any) -> Any:
    """The provider itself (behind a :class:`BlockingView`, the asyncio one), to patch parts
    of it with :func:`around`."""
    return provider._target if isinstance(provider, BlockingView) else provider


def around(
    real: Callable[..., Any],
    *,
    before: Callable[..., None] | None = None,
    after: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """``real`` (a method of either side) with ``before(*args)`` run ahead of it and
    ``after(result, *args)`` after it; either may raise, to interrupt the call there. On the
    asyncio side an awaitable ``after`` returns is awaited (``aclose()``, say)."""
    if not inspect.iscoroutinefunction(real):

        def blocking(*args: Any) -> Any:
            if before is not None:
                before(*args)
            result = real(*args)
            if after is not None:
                after(result, *args)
            return result

        return blocking

    async def asyncio_side(*args: Any) -> Any:
        if before is not None:
            before(*args)
        result = await real(*args)
        if after is not None:
            pending = after(result, *args)
            if inspect.isawaitable(pending):
                await pending
        return result

    return asyncio_side
