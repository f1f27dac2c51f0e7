"""This process's copy of the shared token (L1): the hot path and the rules for replacing it.

A warm call is one attribute read and one ``time.monotonic()`` comparison: no lock, no I/O.
Replacing the copy takes a lock, because two writers race for it: a finished exchange or
refresh adopting a token, and a 401 (or :meth:`forget`) dropping it. Without the lock an
invalidation landing between the adopter's generation check and its assignment would be undone,
and the process would keep handing out the token it was just told is dead.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from .tokens import AccessToken, Held, Snapshot
from .windows import Windows


def _no_kick() -> None:
    return None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class LocalCopy:
    # Slots, and the hot path's values first (beside the object's header): a process with
    # thousands of tenants calls thousands of copies in turn, so what one warm call touches is
    # what it costs. Hence also the mirrors of ``held``'s instants and token:
    # reading them here spares the hot path a hop to the Held object.
    __slots__ = (  # noqa: RUF023 - in layout order, not alphabetical
        "_recheck_at", "_usable_until", "_token", "hits", "kick",
        "_held", "_dropped", "_generation", "_hits_seen", "_keep_shared", "_lock",
        "_recheck_unshared", "_watched", "watch", "windows", "_idle", "_check_due",
    )  # fmt: skip

    def __init__(
        self, windows: Windows, *, keep_shared: bool, recheck_unshared: float, idle: float
    ) -> None:
        """``keep_shared``: keep tokens that Redis also has (``local_cache``); without it only
        the fallback's own token is kept, or an outage would cost an exchange per call.
        ``recheck_unshared``: how soon a token Redis does not have is checked against Redis
        again (the breaker's cooldown), so sharing resumes soon after Redis answers.
        ``idle``: the delay :attr:`watch` arms the idle check with (``local_idle``)."""
        self.windows = windows
        self.held = None
        self.hits = 0  # a bare int bumped on the hot path: may lag a little, never locks
        self.kick: Callable[[], None] = _no_kick  # wakes the background refresh
        self.watch: Callable[[], None] = _no_kick  # arms an idle_check() after local_idle
        self._keep_shared = keep_shared
        self._recheck_unshared = recheck_unshared
        self._generation = 0
        self._lock = threading.Lock()
        self._watched = False  # an idle_check() is due
        self._dropped = b""  # the digest of the token last reported dead: never adopted again
        self._idle = idle
        self._check_due = 0.0
        self._hits_seen = 0

    @property
    def held(self) -> Held | None:
        return self._held

    @held.setter
    def held(self, held: Held | None) -> None:
        # Token first, instants last: a hot-path reader between the assignments sees the old
        # instants with the new token, which is the newer one or None (the caller then takes
        # the slow path), never the old token past the new instants.
        if held is None:
            self._token = None
            self._recheck_at = self._usable_until = 0.0
        else:
            self._token = held.token
            self._recheck_at, self._usable_until = held.recheck_at, held.usable_until
        self._held = held

    def token(self) -> AccessToken | None:
        """The copy while it is usable (kicking a refresh once it is stale), else None."""
        now = time.monotonic()
        if now < self._recheck_at:
            self.hits += 1
            return self._token
        if now < self._usable_until:
            self.hits += 1
            self.kick()
            return self._token
        return None

    def seconds_left(self) -> float | None:
        """How long the held copy has before it expires (0 once it has), None when none is
        held. Read-only: no kick, no hit counted."""
        held = self.held
        if held is None:
            return None
        return max(0.0, held.source.expires_at - time.monotonic())

    @property
    def generation(self) -> int:
        """Read before a flow starts; :meth:`adopt` refuses a token if it changed meanwhile."""
        return self._generation

    def still_held(self) -> Held | None:
        """The copy another caller obtained while this one queued: taking it saves an exchange
        (the fallback, which has no Redis to re-read)."""
        held = self.held
        return held if held is not None and held.is_usable(time.monotonic()) else None

    def adopt(self, snap: Snapshot, generation: int) -> Held:
        """Keep ``snap`` as this process's copy, unless an invalidation happened since
        ``generation`` was read. Returns the token as held, kept or not."""
        held = self.windows.hold(snap)
        shared = snap.stored.fence > 0
        if not shared:
            probe_at = time.monotonic() + self._recheck_unshared
            kept: Held | None = replace(held, recheck_at=min(held.recheck_at, probe_at))
        else:
            kept = held if self._keep_shared else None
        arm = False
        with self._lock:
            # An announcement of a token delivered after that token was dropped here (a 401,
            # an invalidate) must not bring it back: the drop bumped the generation, but the
            # backplane reads the generation only when the late message arrives.
            if generation == self._generation and _digest(snap.stored.value) != self._dropped:
                self.held = kept
                now = time.monotonic()
                # A check long overdue was lost (its event loop ended before it fired).
                arm = kept is not None and (not self._watched or now > self._check_due + self._idle)
                if arm:
                    self._watched, self._check_due = True, now + self._idle
        if arm:
            self.watch()
        return held

    def idle_check(self) -> bool:
        """Drop the copy if no call used it since the last check: with thousands of tenants,
        memory is bounded by the ones in use. A token Redis does not have (the fallback's) is
        kept, since dropping it would cost an exchange. True while the copy should be watched
        further (:attr:`watch` arms the next check)."""
        with self._lock:
            held, hits = self.held, self.hits
            if held is None:
                self._watched = False
                return False
            if hits != self._hits_seen or held.source.stored.fence == 0:
                self._hits_seen = hits
                return True
            self._generation += 1
            self.held = None
            self._watched = False
            return False

    def forget(self, value: str) -> None:
        """Drop the copy if it is ``value`` (a 401 or an invalidate)."""
        with self._lock:
            self._dropped = _digest(value)
            held = self.held
            if held is not None and held.token.value == value:
                self._generation += 1
                self.held = None

    def recheck_now(self) -> None:
        """Have the next call confirm the copy against Redis (off the callers' path): the
        fleet's announcements may have been missed."""
        with self._lock:
            held = self.held
            if held is not None:
                self.held = replace(held, recheck_at=0.0)

    def suspend(self) -> None:
        """Stop handing out the copy: a replacement is being issued, and K2 revokes the old
        token as it issues the new one. Callers wait for the new token (or, if the exchange
        fails, get the old one as the last token alive)."""
        with self._lock:
            held = self.held
            if held is not None:
                self.held = replace(held, recheck_at=0.0, usable_until=0.0)

    def drop(self) -> None:
        """Drop whatever is held (the provider is closing)."""
        with self._lock:
            self._generation += 1
            self.held = None

    def reset_after_fork(self) -> None:
        """A child keeps the still-valid token but not a lock another thread may have held."""
        self._lock = threading.Lock()
        self.hits = self._hits_seen = 0
        self._watched = False  # the parent's timers are not the child's: the next adopt re-arms
