"""Who refreshes and what happens on each failure: the I/O-free core, written once.

Like httpx's auth flow, the logic is a generator that *yields* the I/O it needs (an effect) and
is sent back the result. A driver performs the effects (the providers' ``_drive``, written once
for asyncio and generated for blocking code, stepping with :func:`advance`). So the sync and
asyncio providers share the decisions instead of copying them, and the tests can step through a
flow by hand.

Errors travel the same way: a driver throws the effect's :class:`K2TokenError` into the
generator, which decides: give the lock back and tell the waiters (and the fleet, through a
hold-off in Redis, see :mod:`.backoff`); hand out the last token while it is still alive rather
than fail a caller; or, when Redis itself fails (:class:`SharedCacheError`) and the provider
allows it, carry on without Redis: exchange in this process, under its own single flight and
hold-off (the *local fallback*).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .backoff import BackoffPolicy, LocalFailures, is_credentials_error
from .errors import (
    InvalidTokenResponseError,
    K2TokenError,
    SharedCacheError,
    TokenUnavailableError,
    error_from_report,
)
from .tokens import IssuedToken, Snapshot, StoredToken
from .windows import REUSE_ALLOWANCE, REUSE_MARGIN, Windows

R = TypeVar("R")
T = TypeVar("T")


class Effect(Generic[R]):
    """A piece of I/O the flow asks its driver to perform; ``R`` is what it sends back."""


@dataclass(frozen=True)
class LockAttempt:
    acquired: bool
    skipped: bool  # the script judged the token good enough and left the lock alone
    fence: int  # meaningful only when acquired
    lock_ttl_ms: int  # meaningful only when not acquired
    snapshot: Snapshot | None
    owner: str
    streak: int = 0  # acquired: how many exchanges in a row failed before this one
    holdoff_code: str | None = None  # the fleet is holding off K2 after this error...
    holdoff_ms: int = 0  # ... for this much longer
    reuse: bool = False  # the fleet has learned that K2 hands back live tokens
    revoke: bool = False  # ... or that K2 revokes the previous token on issue


@dataclass(frozen=True)
class WaitOutcome:
    snapshot: Snapshot | None
    error_code: str | None = None
    timed_out: bool = False  # nothing was announced before the timeout (the lease, usually)
    holdoff_ms: int = 0  # with error_code: the hold-off the holder set for the fleet


@dataclass(frozen=True)
class TryLock(Effect[LockAttempt]):
    min_ttl_ms: int
    after_timeout: bool = False  # the last wait saw nothing: acquiring now is a takeover


@dataclass(frozen=True)
class Exchange(Effect[IssuedToken]):
    pass


@dataclass(frozen=True)
class Publish(Effect[Snapshot]):
    """Write, wake, release; the driver returns the issued token as a snapshot of our own
    (:func:`own_snapshot` of these fields)."""

    lock: LockAttempt
    issued: IssuedToken
    reuse: bool = False  # the server reuses tokens: the stored token says so, for every reader
    keep: Snapshot | None = None  # the same grant handed back: keep its lifetime and expiry


@dataclass(frozen=True)
class Pause(Effect[None]):
    """Sleep: under token reuse, the server's rounding must pass before it issues a new one."""

    seconds: float


@dataclass(frozen=True)
class Release(Effect[None]):
    """Give the lock back; after a failed exchange, report it and set the fleet's hold-off."""

    lock: LockAttempt
    error_code: str = ""
    holdoff_ms: int = 0
    credentials: bool = False  # the hold-off binds only workers with the same secret


@dataclass(frozen=True)
class Wait(Effect[WaitOutcome]):
    """Block until a token is announced, the lock holder reports failure or gives the lock back
    without a token, or ``timeout`` ends. The driver re-reads the token after subscribing, so
    an announcement cannot be missed."""

    timeout: float
    min_ttl_ms: int
    replacing: bool = False  # the holder's exchange will revoke the token Redis still has


Flow = Generator[Effect[Any], Any, T]


def perform(effect: Effect[R]) -> Generator[Effect[Any], Any, R]:
    """``x = yield from perform(e)``: a typed yield."""
    result: R = yield effect
    return result


DEFAULT_BACKOFF = BackoffPolicy()

# A token handed out as the last resort (below min_validity, instead of an error) still needs
# this long to reach K2 before it dies there: never send a token whose expiry has passed.
LAST_RESORT_MARGIN = 0.05


def own_snapshot(
    issued: IssuedToken,
    fence: int,
    now: float,
    *,
    reuse: bool = False,
    keep: Snapshot | None = None,
) -> Snapshot:
    """A token this process exchanged, as if read back from Redis at ``now``.

    ``keep``: the reply handed back a token we already had. It is the same grant, so it keeps
    its original lifetime (the windows do not shrink to the remaining seconds) and the earlier
    of the two expiries (the server rounds its ``expires_in``, which can overstate).
    """
    age = now - issued.requested_at
    ttl_ms = int((issued.expires_in - age) * 1000)
    lifetime: float = issued.expires_in
    if keep is not None:
        lifetime = keep.stored.lifetime
        ttl_ms = min(ttl_ms, int((keep.expires_at - now) * 1000))
    stored = StoredToken(
        issued.value,
        issued.token_type,
        lifetime,
        fence,
        issued.requested_at_wall,
        int(issued.took * 1000),
        reuse,
    )
    return Snapshot(stored, max(ttl_ms, 0), now, issued.requested_at_wall + age)


def _usable(windows: Windows, snap: Snapshot | None, now: float, *, fresh: bool) -> bool:
    if snap is None:
        return False
    held = windows.hold(snap)
    return held.is_fresh(now) if fresh else held.is_usable(now)


def _lifetime(snap: Snapshot | None) -> float | None:
    return None if snap is None else snap.stored.lifetime


def _reuse(snap: Snapshot | None) -> bool:
    return snap is not None and snap.stored.reuse


def _holdoff_error(code: str, holdoff_ms: int) -> K2TokenError:
    return error_from_report(code, holdoff_ms / 1000 if holdoff_ms > 0 else None)


def _exchange_and_publish(
    lock: LockAttempt,
    windows: Windows,
    previous: Snapshot | None,
    clock: Callable[[], float],
    *,
    backoff: BackoffPolicy,
    local: LocalFailures | None,
) -> Flow[Snapshot]:
    """Exchange and publish, knowing what the server may hand back.

    ``previous`` is the token this flow knew before (the one in Redis, or this process's
    copy). A reply that carries it again is the same grant (Doorkeeper's
    ``reuse_access_token``): if it still has time left, it is republished with its original
    lifetime and expiry, and the namespace learns that early asks cannot help. A reply that is
    already expired (``expires_in`` 0, or the reused token at its very end) is not handed out:
    once the server's rounding has passed, one more ask gets the new token.
    """
    reuse = lock.reuse or _reuse(previous)
    if reuse and previous is not None:
        wait = previous.expires_at + REUSE_ALLOWANCE - clock()
        if 0 < wait <= REUSE_ALLOWANCE + REUSE_MARGIN:
            yield from perform(Pause(wait))  # an ask before then only gets the old token back
    for attempt in (1, 2):
        issued = yield from _exchange(lock, backoff)
        same = previous is not None and issued.value == previous.stored.value
        reuse = reuse or same
        if same and previous is not None:
            margin = windows.for_lifetime(previous.stored.lifetime, True)[1]
            if previous.expires_at - clock() > margin:
                return (yield from _publish(lock, issued, clock, local=local, reuse=True,
                                            keep=previous))  # fmt: skip
        elif _alive(issued, clock):
            return (yield from _publish(lock, issued, clock, local=local, reuse=reuse, keep=None))
        if attempt == 1:
            yield from perform(Pause(REUSE_ALLOWANCE))
    dead = _expired_twice()
    yield from _give_up(lock, backoff, dead)
    raise dead


def _expired_twice() -> InvalidTokenResponseError:
    # A reply that is no use, like a garbage one: the fleet is held off as for any failure, or
    # every waiter would take the lock in turn and ask twice more.
    return InvalidTokenResponseError("K2 handed back an already expired token twice")


def _alive(issued: IssuedToken, clock: Callable[[], float]) -> bool:
    """Whether a reply still has life in it once it is here: ``expires_in`` counts from the
    request, so a zero grant, or a reply that took longer than the grant (a reused token near
    its end, a slow server), is dead on arrival and must not be handed out."""
    return issued.requested_at + issued.expires_in - clock() > LAST_RESORT_MARGIN


def _exchange(lock: LockAttempt, backoff: BackoffPolicy) -> Flow[IssuedToken]:
    try:
        return (yield from perform(Exchange()))
    except K2TokenError as exc:
        yield from _give_up(lock, backoff, exc)
        raise


def _give_up(lock: LockAttempt, backoff: BackoffPolicy, exc: K2TokenError) -> Flow[None]:
    """Give the lock back, tell the waiters why and hold the fleet off K2 for a while. If
    Redis fails here too, the lease frees the lock anyway; the exchange's error is the one the
    caller can act on."""
    holdoff = backoff.holdoff(exc, lock.streak + 1)
    release = Release(lock, exc.code, int(holdoff * 1000), is_credentials_error(exc))
    with contextlib.suppress(K2TokenError):
        yield from perform(release)


def _publish(
    lock: LockAttempt,
    issued: IssuedToken,
    clock: Callable[[], float],
    *,
    local: LocalFailures | None,
    reuse: bool,
    keep: Snapshot | None,
) -> Flow[Snapshot]:
    try:
        snap = yield from perform(Publish(lock, issued, reuse, keep))
    except SharedCacheError:
        if local is None:
            raise
        # Redis went away mid-exchange: the token is good, keep it in this process.
        snap = own_snapshot(issued, 0, clock(), reuse=reuse, keep=keep)
    # Dead since _alive() (a slow write, or Redis failing slowly): the store gave the lock back.
    if snap.ttl_ms <= 0:
        raise TokenUnavailableError("the token K2 granted expired before it could be kept")
    return snap


def _local(
    clock: Callable[[], float], backoff: BackoffPolicy, local: LocalFailures
) -> Flow[Snapshot]:
    """Without Redis: exchange in this process, under the same hold-off policy kept locally."""
    local.check(clock())
    for attempt in (1, 2):
        try:
            issued = yield from perform(Exchange())
        except K2TokenError as exc:
            local.failed(exc, backoff, clock())
            raise
        if _alive(issued, clock):
            local.succeeded()
            return own_snapshot(issued, 0, clock())
        if attempt == 1:  # as with Redis: once the server's rounding has passed, a new token
            yield from perform(Pause(REUSE_ALLOWANCE))
    dead = _expired_twice()
    local.failed(dead, backoff, clock())
    raise dead


def _through_redis(
    shared: bool, local: LocalFailures | None, run: Callable[[], Flow[T]]
) -> Flow[tuple[bool, T | None]]:
    """``(True, result)`` of the flow ``run()`` makes against Redis, or ``(False, None)`` when
    the caller must carry on without Redis: skipped (``shared=False``) or failing, with a
    fallback (``local``) to carry on with. Without one, the Redis failure propagates."""
    if shared:
        try:
            return True, (yield from run())
        except SharedCacheError:
            if local is None:
                raise
    if local is None:
        raise SharedCacheError("Redis is skipped and the local fallback is off")
    return False, None


class _Sighting:
    """The newest token a flow has seen, kept across the flow's failure: handed out instead of
    the error while it has not expired."""

    def __init__(self, snapshot: Snapshot | None) -> None:
        self.snapshot = snapshot

    def saw(self, snapshot: Snapshot | None) -> None:
        self.snapshot = snapshot or self.snapshot

    def alive(self, now: float) -> Snapshot | None:
        snap = self.snapshot
        return snap if snap is not None and now < snap.expires_at - LAST_RESORT_MARGIN else None


def obtain(
    windows: Windows,
    seen: Snapshot | None,
    deadline: float,
    clock: Callable[[], float],
    *,
    backoff: BackoffPolicy = DEFAULT_BACKOFF,
    local: LocalFailures | None = None,
    shared: bool = True,
) -> Flow[Snapshot]:
    """A caller needs a usable token now (cache miss or past ``min_validity``).

    Take the lock and exchange, or wait to be woken by whoever holds it. A holder that dies
    leaves its lock to expire; the wait is bounded by the lock's remaining lease, after which
    this caller tries to take the lock over. Gives up with :class:`TokenUnavailableError` at
    ``deadline``; a failure the holder reports, or a hold-off the fleet is in, is raised here
    too, so a fleet does not hammer the endpoint after, say, ``invalid_client``. Whatever the
    failure (but Redis's without a fallback), a token that has not expired yet is handed out
    instead of an error: below ``min_validity``, but better than an error.

    ``local`` (a process's own hold-off memory) turns on the fallback: when Redis fails, the
    flow carries on without it. ``shared=False`` goes there directly (the circuit is open).
    """
    sighting = _Sighting(seen)
    try:
        done, snap = yield from _through_redis(
            shared,
            local,
            lambda: _obtain_shared(
                windows, sighting, deadline, clock, backoff=backoff, local=local
            ),
        )
        if done:
            assert snap is not None
            return snap
        assert local is not None
        return (yield from _local(clock, backoff, local))
    except SharedCacheError:
        raise
    except K2TokenError:
        alive = sighting.alive(clock())
        if alive is None:
            raise
        return alive


def _obtain_shared(
    windows: Windows,
    sighting: _Sighting,
    deadline: float,
    clock: Callable[[], float],
    *,
    backoff: BackoffPolicy,
    local: LocalFailures | None,
) -> Flow[Snapshot]:
    force = timed_out = False
    while True:
        seen = sighting.snapshot
        threshold = (
            -1
            if force
            else windows.lock_threshold_ms(_lifetime(seen), fresh=False, reuse=_reuse(seen))
        )
        lock = yield from perform(TryLock(threshold, timed_out))
        sighting.saw(lock.snapshot)
        # Under revoke-previous, another holder's exchange is about to kill the token Redis
        # still has: wait for its replacement rather than send a token K2 will refuse.
        replacing = lock.revoke and not lock.acquired and lock.lock_ttl_ms > 0
        if not replacing and _usable(windows, lock.snapshot, clock(), fresh=False):
            if lock.acquired:
                yield from perform(Release(lock))
            assert lock.snapshot is not None
            return lock.snapshot
        if lock.acquired:
            previous = lock.snapshot or sighting.snapshot
            return (
                yield from _exchange_and_publish(
                    lock, windows, previous, clock, backoff=backoff, local=local
                )
            )
        if lock.holdoff_code is not None:
            raise _holdoff_error(lock.holdoff_code, lock.holdoff_ms)
        if lock.skipped:
            # Redis judged the value good but we cannot use it (unreadable, or its lifetime
            # shrinks our windows): take the lock regardless on the next attempt.
            force = True
            continue
        remaining = deadline - clock()
        if remaining <= 0:
            raise TokenUnavailableError(
                "no token within wait_timeout: another worker holds the refresh lock"
            )
        wake_by = min(remaining, max(lock.lock_ttl_ms, 0) / 1000 + 0.01)
        outcome = yield from perform(Wait(wake_by, threshold, replacing))
        if outcome.error_code is not None:
            raise _holdoff_error(outcome.error_code, outcome.holdoff_ms)
        if _usable(windows, outcome.snapshot, clock(), fresh=False):
            assert outcome.snapshot is not None
            return outcome.snapshot
        sighting.saw(outcome.snapshot)
        timed_out = outcome.timed_out


def refresh(
    windows: Windows,
    previous: Snapshot | None,
    clock: Callable[[], float],
    *,
    backoff: BackoffPolicy = DEFAULT_BACKOFF,
    local: LocalFailures | None = None,
    shared: bool = True,
    held_fresh: bool = False,
) -> Flow[Snapshot | None]:
    """Early refresh, off the callers' path: the current token is still usable.

    Only the worker that wins the lock exchanges; a worker that loses waits for the winner's
    announcement (so its local copy is replaced the moment the new token exists) but never
    exchanges itself. Returns ``None`` when nothing newer arrived; errors propagate to the
    background runner, which logs them and keeps the current token. Without Redis (``local``
    given and Redis failing, or ``shared=False``), this process exchanges for itself, unless
    its token is still fresh (``held_fresh``: the refresh was only a re-check against Redis).
    ``previous`` is the token held now (its lifetime sets the windows; see
    :func:`_exchange_and_publish` for what else it tells).
    """
    done, snap = yield from _through_redis(
        shared,
        local,
        lambda: _refresh_shared(windows, previous, clock, backoff=backoff, local=local),
    )
    if done or held_fresh:
        return snap
    assert local is not None
    return (yield from _local(clock, backoff, local))


def _refresh_shared(
    windows: Windows,
    previous: Snapshot | None,
    clock: Callable[[], float],
    *,
    backoff: BackoffPolicy,
    local: LocalFailures | None,
) -> Flow[Snapshot | None]:
    threshold = windows.lock_threshold_ms(
        _lifetime(previous), fresh=True, reuse=_reuse(previous)
    )
    timed_out = False
    while True:
        lock = yield from perform(TryLock(threshold, timed_out))
        if lock.skipped and not _usable(windows, lock.snapshot, clock(), fresh=True):
            lock = yield from perform(TryLock(-1))  # unreadable to us, whatever Redis thought
        if lock.acquired:
            if _usable(windows, lock.snapshot, clock(), fresh=True):
                yield from perform(Release(lock))
                return lock.snapshot
            return (
                yield from _exchange_and_publish(
                    lock, windows, lock.snapshot or previous, clock, backoff=backoff, local=local
                )
            )
        if _usable(windows, lock.snapshot, clock(), fresh=True):
            return lock.snapshot
        if lock.holdoff_code is not None:
            raise _holdoff_error(lock.holdoff_code, lock.holdoff_ms)
        outcome = yield from perform(Wait(max(lock.lock_ttl_ms, 0) / 1000 + 0.01, threshold))
        if outcome.error_code is not None:
            raise _holdoff_error(outcome.error_code, outcome.holdoff_ms)
        if not outcome.timed_out or timed_out:
            return outcome.snapshot
        # The holder's lease ran out with nothing announced: it died or stalled. Take over
        # now, once, rather than leave the refresh to the next caller's pause.
        timed_out = True


def advance(flow: Flow[T], result: Any, error: K2TokenError | None) -> tuple[bool, Any]:
    """Send a result (or throw an error) into the flow: ``(True, value)`` when it returned,
    ``(False, effect)`` when it asks for more I/O. The drivers (one per side) loop on this."""
    try:
        return False, (flow.throw(error) if error is not None else flow.send(result))
    except StopIteration as stop:
        return True, stop.value


class LockGuard:
    """What a running flow owns in Redis, so a driver interrupted mid-flow can settle it.

    A flow gives its lock back itself on every error it is told about. A cancellation, a
    ``KeyboardInterrupt`` or a gevent ``Timeout`` is not one of those: it unwinds the driver,
    and the generator is merely closed. The driver then asks :meth:`pending` what to do so the
    fleet does not sit out a lease: publish the token if the exchange already returned one
    (K2 issued it; the fleet should have it), else release the lock (owner-only).
    """

    def __init__(self) -> None:
        self._lock: LockAttempt | None = None
        self._issued: IssuedToken | None = None

    def saw(self, effect: Effect[Any], result: Any) -> None:
        """``effect`` was performed and returned ``result``."""
        match effect:
            case TryLock() if result.acquired:
                self._lock, self._issued = result, None
            case Exchange() if self._lock is not None:
                self._issued = result
            case Publish() | Release():
                self._lock = self._issued = None

    def failed(self, effect: Effect[Any]) -> None:
        """``effect`` raised an error the flow is told about. A Publish or Release that failed
        is not tried again if an interruption follows: Redis just failed in this call, and the
        lease frees the lock."""
        if isinstance(effect, (Publish, Release)):
            self._lock = self._issued = None

    def pending(self) -> Effect[Any] | None:
        if self._lock is None:
            return None
        if self._issued is not None:
            return Publish(self._lock, self._issued)
        return Release(self._lock)
