"""The fleet backplane: one subscription per Redis client per process, shared by every
namespace on it, to the namespaces' announcements.

Every token written, invalidated or revoked anywhere in the fleet is announced on its
namespace's channel (the same messages the lock's waiters listen to). With the backplane, each
process replaces or drops its copy the moment that happens, instead of trusting it for up to
``local_max_age``: against a server that revokes the previous token on issue, the fleet moves to
the new token at once instead of each process paying a 401 first. The hot path is untouched:
the listener changes the copy, callers still read one attribute.

A cold process joins with the subscription its first wait already holds (see
:meth:`AsyncBackplane.join`): it is subscribed to the namespace's channel, so the backplane
listens on it instead of opening a connection and subscribing again while the fleet stampedes,
and without a gap in which an announcement could be missed.

The subscription reconnects by itself, backing off while Redis is away. While it is down the
providers behave as without it (their copies are re-checked every ``local_max_age``); when it
comes back they re-check at once, since announcements may have been missed meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .._concurrency import AsyncDaemon, AsyncTimer, reset_in_children
from .._redis.commands import REDIS_FAILURES

log = logging.getLogger("k2_shared_token.backplane")

Listener = Callable[[bytes], None]  # an announcement's raw message
Resync = Callable[[], None]  # the subscription (re)connected: announcements may be missed

POLL = 0.25  # how long one read blocks: the delay before a new namespace is subscribed
MAX_PAUSE = 5.0  # the longest pause between reconnection attempts


class AsyncBackplane:
    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._listeners: dict[str, dict[int, tuple[Listener, Resync]]] = {}
        self._task: Any = None
        self._adopted: Any = None  # a waiter's open subscription to one channel, handed over
        self.connected = False

    def join(
        self,
        channel: str,
        key: int,
        listener: Listener,
        resync: Resync,
        subscription: Any = None,
    ) -> bool:
        """Deliver ``channel``'s messages to ``listener`` (``key`` identifies it for
        :meth:`leave`); starts the subscription on first use.

        ``subscription``: a pub/sub already subscribed to ``channel`` (a wait's, still open);
        the first join listens on it rather than subscribing anew. Returns whether it was
        taken; one that was not is the caller's to close.
        """
        taken = False
        with self._lock:
            self._listeners.setdefault(channel, {})[key] = (listener, resync)
            if self._task is None:
                if subscription is not None:
                    self._adopted, taken = (channel, subscription), True
                self._task = AsyncDaemon.start(self._run, "k2-token-backplane")
        return taken

    async def leave(self, channel: str, key: int) -> None:
        with self._lock:
            mine = self._listeners.get(channel, {})
            mine.pop(key, None)
            if not mine:
                self._listeners.pop(channel, None)
            task = self._task if not self._listeners else None
            if task is not None:
                self._task = None
        if task is not None:
            await AsyncDaemon.stop(task)

    async def _run(self) -> None:
        """Subscribe and listen until no namespace is left; on any failure, back off and
        subscribe again (the listener never dies of an error)."""
        pause = POLL
        try:
            while self._listeners:
                pubsub: Any = None
                try:
                    adopted, self._adopted = self._adopted, None
                    subscribed: set[str] = set()
                    if adopted is not None:
                        # Subscribed since before its wait ended: nothing can have been missed.
                        channel, pubsub = adopted
                        subscribed.add(channel)
                        self.connected = True
                    else:
                        pubsub = self._client.pubsub()  # a lazy cluster client meets Redis here
                    await self._listen(pubsub, subscribed)
                    pause = POLL
                except Exception as exc:  # reported by class only; the loop must go on
                    if self.connected or not isinstance(exc, REDIS_FAILURES):
                        log.warning("fleet backplane lost (%s); reconnecting", type(exc).__name__)
                    self.connected = False
                    await AsyncTimer.sleep(pause)
                    pause = min(pause * 2, MAX_PAUSE)
                finally:
                    self.connected = False
                    if pubsub is not None:
                        with contextlib.suppress(Exception):
                            await pubsub.aclose()
        finally:
            adopted, self._adopted = self._adopted, None
            if adopted is not None:  # left before it was listened on
                with contextlib.suppress(Exception):
                    await adopted[1].aclose()

    async def _listen(self, pubsub: Any, subscribed: set[str]) -> None:
        while self._listeners:
            wanted = set(self._listeners)
            if wanted - subscribed:
                await pubsub.subscribe(*sorted(wanted - subscribed))
            if subscribed - wanted:
                await pubsub.unsubscribe(*sorted(subscribed - wanted))
            newly = wanted - subscribed
            subscribed = wanted
            message = await pubsub.get_message(timeout=POLL)
            if message is not None and message["type"] == "subscribe" and not self.connected:
                self.connected = True
                self._resync(set(self._listeners))
            elif newly and self.connected:
                self._resync(newly)
            if message is not None and message["type"] == "message":
                self._deliver(message["channel"], message["data"])

    def _targets(self, channel: str) -> list[tuple[Listener, Resync]]:
        with self._lock:
            return list(self._listeners.get(channel, {}).values())

    def _resync(self, channels: set[str]) -> None:
        for channel in channels:
            for _, resync in self._targets(channel):
                resync()

    def _deliver(self, channel: Any, data: Any) -> None:
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        raw = data if isinstance(data, bytes) else str(data).encode()
        for listener, _ in self._targets(name):
            try:
                listener(raw)
            except Exception:
                log.exception("fleet backplane: a listener failed on %s", name)


_backplanes: weakref.WeakKeyDictionary[Any, AsyncBackplane] = weakref.WeakKeyDictionary()
_made = threading.Lock()


def backplane_for(client: Any) -> AsyncBackplane | None:
    """The process's backplane of ``client`` (None for a client that cannot be weakly
    referenced: such a provider simply runs without one)."""
    with _made:
        try:
            found = _backplanes.get(client)
            if found is None:
                found = _backplanes[client] = AsyncBackplane(client)
        except TypeError:
            return None
    return found


class _Registry:
    def _reset_after_fork(self) -> None:
        # A child inherits no listener thread or task: it subscribes anew on first use.
        _backplanes.clear()


_REGISTRY = _Registry()
reset_in_children(_REGISTRY)
