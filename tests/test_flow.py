"""The I/O-free refresh core and the freshness windows, driven by hand (no Redis, no network).

Each flow runs against a scripted handler (the effects it must yield, in order, and the canned
result or error for each) and a fake monotonic clock.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_shared_token._core.backoff import LocalFailures
from k2_shared_token._core.errors import (
    InvalidCredentialsError,
    InvalidTokenResponseError,
    K2TokenError,
    SharedCacheError,
    TokenEndpointError,
    TokenEndpointUnavailableError,
    TokenRequestRejectedError,
    TokenUnavailableError,
)
from k2_shared_token._core.flow import (
    Effect,
    Exchange,
    IssuedToken,
    LockAttempt,
    LockGuard,
    Pause,
    Publish,
    Release,
    TryLock,
    Wait,
    WaitOutcome,
    advance,
    obtain,
    own_snapshot,
    refresh,
)
from k2_shared_token._core.tokens import AccessToken, Held, Snapshot, StoredToken
from k2_shared_token._core.windows import Windows

WINDOWS = Windows(refresh_ahead=300, min_validity=30, local_max_age=60)
TOKEN = "old-token-value"
NEW_TOKEN = "new-token-value"


T = TypeVar("T")


def drive(flow: Generator[Effect[Any], Any, T], handle: Callable[[Effect[Any]], Any]) -> T:
    """The smallest driver: perform each effect with ``handle``, throw its K2TokenError back."""
    result: Any = None
    error: K2TokenError | None = None
    while True:
        done, value = advance(flow, result, error)
        if done:
            return value  # type: ignore[no-any-return]
        try:
            result, error = handle(value), None
        except K2TokenError as exc:
            result, error = None, exc


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Script:
    """A handler that expects effects of the given types in order and answers each in turn.

    An answer that is an exception is raised (and so thrown into the flow by :func:`drive`);
    a callable answer is called with the effect.
    """

    def __init__(self, *steps: tuple[type[Effect[Any]], Any]) -> None:
        self.steps = list(steps)
        self.seen: list[Effect[Any]] = []

    def __call__(self, effect: Effect[Any]) -> Any:
        self.seen.append(effect)
        assert self.steps, f"unexpected extra effect {effect!r}"
        kind, answer = self.steps.pop(0)
        assert isinstance(effect, kind), f"expected {kind.__name__}, got {effect!r}"
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer(effect)
        return answer

    def finished(self) -> bool:
        return not self.steps

    def kinds(self) -> list[type[Effect[Any]]]:
        return [type(effect) for effect in self.seen]


def snap(
    ttl_s: float, *, lifetime: float = 3600, seen_at: float = 1000.0, value: str = TOKEN
) -> Snapshot:
    return Snapshot(
        StoredToken(value, "Bearer", lifetime, 1), int(ttl_s * 1000), seen_at, 1.7e9 + seen_at
    )


def grant(lifetime: float) -> Snapshot:
    """The token a refresh starts from: ``lifetime`` long, half of it left."""
    return snap(lifetime / 2, lifetime=lifetime, value="the-token-held-before")


def attempt(
    *,
    acquired: bool = False,
    skipped: bool = False,
    fence: int = 0,
    lock_ttl_ms: int = 0,
    snapshot: Snapshot | None = None,
    streak: int = 0,
    holdoff_code: str | None = None,
    holdoff_ms: int = 0,
    reuse: bool = False,
) -> LockAttempt:
    return LockAttempt(
        acquired,
        skipped,
        fence,
        lock_ttl_ms,
        snapshot,
        "me",
        streak,
        holdoff_code,
        holdoff_ms,
        reuse,
    )


def won(snapshot: Snapshot | None = None, fence: int = 5) -> LockAttempt:
    return attempt(acquired=True, fence=fence, snapshot=snapshot)


def lost(lock_ttl_ms: int = 4000, snapshot: Snapshot | None = None) -> LockAttempt:
    return attempt(lock_ttl_ms=lock_ttl_ms, snapshot=snapshot)


ISSUED = IssuedToken(NEW_TOKEN, "Bearer", 3600, 1000.0, 1_700_000_000.0, 0.1)
PUBLISHED = snap(3600, value=NEW_TOKEN)


# -- obtain ----------------------------------------------------------------------------------


def test_obtain_with_lock_exchanges_publishes_and_returns_published_snapshot() -> None:
    lock = won()
    script = Script((TryLock, lock), (Exchange, ISSUED), (Publish, PUBLISHED))
    result = drive(obtain(WINDOWS, None, 1020.0, Clock()), script)
    assert result is PUBLISHED
    assert script.finished()
    try_lock, _, publish = script.seen
    assert try_lock == TryLock(min_ttl_ms=30_000)  # no token seen: the configured floor
    assert publish == Publish(lock, ISSUED)


def test_obtain_lock_threshold_follows_seen_short_lived_token() -> None:
    seen = snap(5, lifetime=60)  # 60 s tokens: the floor shrinks to 15 s
    script = Script((TryLock, won()), (Exchange, ISSUED), (Publish, PUBLISHED))
    drive(obtain(WINDOWS, seen, 1020.0, Clock()), script)
    assert script.seen[0] == TryLock(min_ttl_ms=15_000)


@pytest.mark.parametrize(
    ("error", "code", "holdoff_ms", "credentials"),
    [
        (
            InvalidCredentialsError("no", status=401, error="invalid_client"),
            "invalid_client",
            60_000,
            True,
        ),
        (TokenRequestRejectedError("no", status=400), "rejected", 60_000, True),
        (TokenEndpointUnavailableError("down", status=503), "unavailable", 1000, False),
        (InvalidTokenResponseError("junk", status=200), "invalid_response", 1000, False),
    ],
)
def test_obtain_exchange_failure_releases_with_code_and_hold_off_and_propagates(
    error: TokenEndpointError, code: str, holdoff_ms: int, credentials: bool
) -> None:
    lock = won()
    script = Script((TryLock, lock), (Exchange, error), (Release, None))
    with pytest.raises(type(error)) as info:
        drive(obtain(WINDOWS, None, 1020.0, Clock()), script)
    assert info.value is error
    assert script.finished()
    assert script.seen[-1] == Release(lock, code, holdoff_ms, credentials)
    assert Publish not in script.kinds()


def test_obtain_stepped_by_hand_with_send_and_throw() -> None:
    lock = won()
    flow = obtain(WINDOWS, None, 1020.0, Clock())
    assert next(flow) == TryLock(30_000)
    assert flow.send(lock) == Exchange()
    error = InvalidCredentialsError("rejected", status=401, error="invalid_client")
    assert flow.throw(error) == Release(lock, "invalid_client", 60_000, credentials=True)
    with pytest.raises(InvalidCredentialsError):
        flow.send(None)


def test_obtain_release_failure_after_exchange_failure_keeps_the_exchange_error() -> None:
    lock = won()
    original = InvalidCredentialsError("rejected", status=401)
    script = Script((TryLock, lock), (Exchange, original), (Release, SharedCacheError("down")))
    with pytest.raises(InvalidCredentialsError) as info:
        drive(obtain(WINDOWS, None, 1020.0, Clock()), script)
    assert info.value is original


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("invalid_client", InvalidCredentialsError),
        ("rejected", TokenRequestRejectedError),
        ("unavailable", TokenEndpointUnavailableError),
        ("something-new", TokenEndpointError),
    ],
)
def test_obtain_waiter_raises_the_error_the_holder_reported(
    code: str, expected: type[K2TokenError]
) -> None:
    script = Script((TryLock, lost()), (Wait, WaitOutcome(None, code)))
    with pytest.raises(expected) as info:
        drive(obtain(WINDOWS, None, 1020.0, Clock()), script)
    assert type(info.value) is expected
    assert script.finished()
    assert Exchange not in script.kinds()


def test_obtain_wait_is_bounded_by_the_lock_lease_and_returns_announced_token() -> None:
    clock = Clock(1000.0)
    announced = snap(3600, value=NEW_TOKEN)
    script = Script((TryLock, lost(lock_ttl_ms=4000)), (Wait, WaitOutcome(announced)))
    assert drive(obtain(WINDOWS, None, 1020.0, clock), script) is announced
    assert script.seen[1] == Wait(timeout=pytest.approx(4.01), min_ttl_ms=30_000)


def test_obtain_wait_is_bounded_by_the_deadline() -> None:
    script = Script((TryLock, lost(lock_ttl_ms=60_000)), (Wait, WaitOutcome(snap(3600))))
    drive(obtain(WINDOWS, None, 1002.5, Clock(1000.0)), script)
    wait = script.seen[1]
    assert isinstance(wait, Wait)
    assert wait.timeout == pytest.approx(2.5)


def test_obtain_gives_up_with_token_unavailable_once_the_clock_passes_the_deadline() -> None:
    clock = Clock(1000.0)
    waits: list[Wait] = []
    tries: list[TryLock] = []

    def handle(effect: Effect[Any]) -> Any:
        if isinstance(effect, TryLock):
            tries.append(effect)
            return lost(lock_ttl_ms=3000)
        assert isinstance(effect, Wait), effect
        waits.append(effect)
        clock.now += effect.timeout  # the wait ran its full course: nothing announced
        return WaitOutcome(None)

    with pytest.raises(TokenUnavailableError):
        drive(obtain(WINDOWS, None, 1010.0, clock), handle)
    assert [w.timeout for w in waits] == pytest.approx([3.01, 3.01, 3.01, 0.97])
    assert len(tries) == 5  # one more look at the lock after the last wait
    assert clock.now == pytest.approx(1010.0)


def test_obtain_past_deadline_raises_without_waiting() -> None:
    script = Script((TryLock, lost()))
    with pytest.raises(TokenUnavailableError):
        drive(obtain(WINDOWS, None, 999.0, Clock(1000.0)), script)
    assert script.finished()


def test_obtain_ignores_an_unusable_snapshot_from_a_wait_and_tries_again() -> None:
    expiring = snap(10)  # below the 30 s floor: not usable
    script = Script(
        (TryLock, lost(lock_ttl_ms=0)),  # the holder died: its lease is gone
        (Wait, WaitOutcome(expiring)),
        (TryLock, won()),
        (Exchange, ISSUED),
        (Publish, PUBLISHED),
    )
    assert drive(obtain(WINDOWS, None, 1020.0, Clock()), script) is PUBLISHED
    assert script.seen[1] == Wait(timeout=pytest.approx(0.01), min_ttl_ms=30_000)
    assert script.finished()


def test_obtain_acquired_but_reread_token_usable_releases_without_code_and_returns_it() -> None:
    current = snap(1000)
    lock = won(snapshot=current)
    script = Script((TryLock, lock), (Release, None))
    assert drive(obtain(WINDOWS, None, 1020.0, Clock()), script) is current
    assert script.seen[1] == Release(lock)
    assert script.seen[1] == Release(lock, "")
    assert Exchange not in script.kinds()


def test_obtain_not_acquired_but_token_usable_returns_it_without_waiting() -> None:
    current = snap(100)  # stale but above the floor
    script = Script((TryLock, lost(snapshot=current)))
    assert drive(obtain(WINDOWS, None, 1020.0, Clock()), script) is current
    assert script.finished()


def test_obtain_skipped_with_unusable_snapshot_forces_the_next_try_lock() -> None:
    script = Script(
        (TryLock, attempt(skipped=True, snapshot=None)),  # Redis liked a value we cannot read
        (TryLock, won()),
        (Exchange, ISSUED),
        (Publish, PUBLISHED),
    )
    assert drive(obtain(WINDOWS, None, 1020.0, Clock()), script) is PUBLISHED
    assert script.seen[0] == TryLock(30_000)
    assert script.seen[1] == TryLock(-1)


def test_obtain_after_force_waits_with_the_forced_threshold() -> None:
    expired_for_us = snap(20, lifetime=3600)  # 20 s left: below our 30 s floor
    announced = snap(3600, value=NEW_TOKEN)
    script = Script(
        (TryLock, attempt(skipped=True, snapshot=expired_for_us)),
        (TryLock, lost(lock_ttl_ms=1000)),
        (Wait, WaitOutcome(announced)),
    )
    assert drive(obtain(WINDOWS, None, 1020.0, Clock()), script) is announced
    assert script.seen[1] == TryLock(-1)
    assert script.seen[2] == Wait(timeout=pytest.approx(1.01), min_ttl_ms=-1)


def test_obtain_judges_usability_at_the_clock_not_at_the_snapshot() -> None:
    current = snap(100, seen_at=1000.0)  # usable until 1070, alive until 1100 (monotonic)
    script = Script((TryLock, lost(snapshot=current)), (Wait, WaitOutcome(None, "unavailable")))
    with pytest.raises(TokenEndpointUnavailableError):
        drive(obtain(WINDOWS, None, 2000.0, Clock(1100.0)), script)


@pytest.mark.parametrize(
    "failure",
    [
        (Wait, WaitOutcome(None, "unavailable", holdoff_ms=2000)),
        (Exchange, TokenEndpointUnavailableError("down", status=503)),
    ],
)
def test_obtain_hands_out_a_token_below_min_validity_rather_than_an_error(
    failure: tuple[type[Effect[Any]], Any],
) -> None:
    current = snap(100, seen_at=1000.0)  # below min_validity at 1071, expires at 1100
    lock = won(snapshot=current) if failure[0] is Exchange else lost(snapshot=current)
    steps: list[tuple[type[Effect[Any]], Any]] = [(TryLock, lock), failure]
    if failure[0] is Exchange:
        steps.append((Release, None))
    script = Script(*steps)
    assert drive(obtain(WINDOWS, None, 2000.0, Clock(1071.0)), script) is current
    assert script.finished()


def test_obtain_raises_the_fleet_hold_off_without_waiting_or_exchanging() -> None:
    held_off = attempt(holdoff_ms=4500, holdoff_code="unavailable")
    script = Script((TryLock, held_off))
    with pytest.raises(TokenEndpointUnavailableError) as info:
        drive(obtain(WINDOWS, None, 2000.0, Clock()), script)
    assert info.value.retry_after == 4.5
    assert script.finished()


def test_obtain_hold_off_grows_with_the_failure_streak() -> None:
    lock = attempt(acquired=True, fence=9, streak=3)  # three failed exchanges before this one
    error = TokenEndpointUnavailableError("down", status=503)
    script = Script((TryLock, lock), (Exchange, error), (Release, None))
    with pytest.raises(TokenEndpointUnavailableError):
        drive(obtain(WINDOWS, None, 2000.0, Clock()), script)
    assert script.seen[-1] == Release(lock, "unavailable", 8000)  # 1 s * 2**3


def test_obtain_hold_off_honours_a_longer_retry_after() -> None:
    error = TokenEndpointUnavailableError("busy", status=429, retry_after=30)
    script = Script((TryLock, won()), (Exchange, error), (Release, None))
    with pytest.raises(TokenEndpointUnavailableError):
        drive(obtain(WINDOWS, None, 2000.0, Clock()), script)
    assert script.seen[-1] == Release(won(), "unavailable", 30_000)


def test_obtain_falls_back_to_a_local_exchange_when_redis_fails() -> None:
    local = LocalFailures()
    script = Script((TryLock, SharedCacheError("down")), (Exchange, ISSUED))
    result = drive(obtain(WINDOWS, None, 2000.0, Clock(1000.0), local=local), script)
    assert result.stored.value == NEW_TOKEN
    assert result.stored.fence == 0  # not shared
    assert result.ttl_ms == 3600_000


def test_obtain_without_fallback_lets_the_redis_error_through() -> None:
    script = Script((TryLock, SharedCacheError("down")))
    with pytest.raises(SharedCacheError):
        drive(obtain(WINDOWS, None, 2000.0, Clock()), script)


def test_obtain_keeps_the_token_when_redis_fails_at_publish() -> None:
    local = LocalFailures()
    script = Script((TryLock, won()), (Exchange, ISSUED), (Publish, SharedCacheError("down")))
    result = drive(obtain(WINDOWS, None, 2000.0, Clock(1000.0), local=local), script)
    assert result.stored.value == NEW_TOKEN
    assert script.finished()  # no second exchange


def test_local_fallback_holds_off_after_a_failure() -> None:
    local = LocalFailures()
    clock = Clock(1000.0)
    error = TokenEndpointUnavailableError("down", status=503)
    script = Script((Exchange, error))
    with pytest.raises(TokenEndpointUnavailableError):
        drive(obtain(WINDOWS, None, 2000.0, clock, local=local, shared=False), script)
    with pytest.raises(TokenEndpointUnavailableError) as info:  # no effect at all: held off
        drive(obtain(WINDOWS, None, 2000.0, clock, local=local, shared=False), Script())
    assert info.value.retry_after == 1.0
    clock.now += 1.0
    script = Script((Exchange, ISSUED))
    assert drive(obtain(WINDOWS, None, 2000.0, clock, local=local, shared=False), script)


def test_refresh_without_redis_and_a_fresh_token_does_nothing() -> None:
    flow = refresh(
        WINDOWS, grant(3600), Clock(), local=LocalFailures(), shared=False, held_fresh=True
    )
    assert drive(flow, Script()) is None


def test_refresh_during_a_fleet_hold_off_raises_for_the_background_runner() -> None:
    held_off = attempt(holdoff_ms=2000, holdoff_code="invalid_client", snapshot=snap(200))
    with pytest.raises(InvalidCredentialsError):
        drive(refresh(WINDOWS, grant(3600), Clock()), Script((TryLock, held_off)))


# -- refresh ---------------------------------------------------------------------------------


def test_refresh_loser_waits_and_returns_the_announced_snapshot() -> None:
    stale = snap(200)
    announced = snap(3600, value=NEW_TOKEN)
    script = Script(
        (TryLock, lost(lock_ttl_ms=2000, snapshot=stale)), (Wait, WaitOutcome(announced))
    )
    assert drive(refresh(WINDOWS, grant(3600), Clock()), script) is announced
    assert script.seen[0] == TryLock(300_000)
    assert script.seen[1] == Wait(timeout=pytest.approx(2.01), min_ttl_ms=300_000)
    assert Exchange not in script.kinds()


def test_refresh_loser_with_nothing_announced_returns_none() -> None:
    script = Script((TryLock, lost(snapshot=snap(200))), (Wait, WaitOutcome(None)))
    assert drive(refresh(WINDOWS, grant(3600), Clock()), script) is None


def test_refresh_loser_raises_the_reported_error() -> None:
    script = Script((TryLock, lost()), (Wait, WaitOutcome(None, "invalid_client")))
    with pytest.raises(InvalidCredentialsError):
        drive(refresh(WINDOWS, grant(3600), Clock()), script)


def test_refresh_finding_a_fresh_token_skipped_does_not_exchange() -> None:
    fresh = snap(3000, value=NEW_TOKEN)
    script = Script((TryLock, attempt(skipped=True, snapshot=fresh)))
    assert drive(refresh(WINDOWS, grant(3600), Clock()), script) is fresh
    assert script.kinds() == [TryLock]


def test_refresh_acquired_with_fresh_token_releases_and_does_not_exchange() -> None:
    fresh = snap(3000, value=NEW_TOKEN)
    lock = won(snapshot=fresh)
    script = Script((TryLock, lock), (Release, None))
    assert drive(refresh(WINDOWS, grant(3600), Clock()), script) is fresh
    assert script.seen[1] == Release(lock, "")
    assert Exchange not in script.kinds()


def test_refresh_acquired_with_stale_token_exchanges_and_publishes() -> None:
    lock = won(snapshot=snap(200))
    script = Script((TryLock, lock), (Exchange, ISSUED), (Publish, PUBLISHED))
    assert drive(refresh(WINDOWS, grant(3600), Clock()), script) is PUBLISHED
    assert script.seen[2] == Publish(lock, ISSUED)


def test_refresh_exchange_failure_releases_with_code() -> None:
    lock = won(snapshot=snap(200))
    error = TokenEndpointUnavailableError("down", status=503)
    script = Script((TryLock, lock), (Exchange, error), (Release, None))
    with pytest.raises(TokenEndpointUnavailableError):
        drive(refresh(WINDOWS, grant(3600), Clock()), script)
    assert script.seen[2] == Release(lock, "unavailable", 1000)


def test_refresh_skipped_but_not_fresh_to_us_retries_lock_forced() -> None:
    short = snap(40, lifetime=3600)  # Redis skipped, yet 40 s left is not fresh for us
    script = Script(
        (TryLock, attempt(skipped=True, snapshot=short)),
        (TryLock, won(snapshot=short)),
        (Exchange, ISSUED),
        (Publish, PUBLISHED),
    )
    assert drive(refresh(WINDOWS, grant(3600), Clock()), script) is PUBLISHED
    assert [e for e in script.seen if isinstance(e, TryLock)] == [TryLock(300_000), TryLock(-1)]


@pytest.mark.parametrize(
    ("lifetime", "threshold"), [(None, 300_000), (3600, 300_000), (60, 30_000), (100, 50_000)]
)
def test_refresh_lock_threshold_is_the_refresh_window(
    lifetime: float | None, threshold: int
) -> None:
    script = Script((TryLock, attempt(skipped=True, snapshot=snap(3000))))
    drive(refresh(WINDOWS, None if lifetime is None else grant(lifetime), Clock()), script)
    assert script.seen[0] == TryLock(threshold)


# -- drive -----------------------------------------------------------------------------------


def test_drive_does_not_throw_foreign_errors_into_the_flow() -> None:
    script = Script((TryLock, won()), (Exchange, RuntimeError("bug in handler")))
    with pytest.raises(RuntimeError, match="bug in handler"):
        drive(obtain(WINDOWS, None, 1020.0, Clock()), script)
    assert Release not in script.kinds()


def test_drive_sends_results_back_and_returns_the_flow_value() -> None:
    def flow() -> Generator[Effect[Any], Any, tuple[Any, Any]]:
        first = yield TryLock(1)
        second = yield Release(won())
        return (first, second)

    script = Script((TryLock, 7), (Release, "done"))
    assert drive(flow(), script) == (7, "done")
    assert script.finished()


def test_drive_throws_package_errors_into_the_flow() -> None:
    caught: list[K2TokenError] = []

    def flow() -> Generator[Effect[Any], Any, str]:
        try:
            yield Exchange()
        except K2TokenError as exc:
            caught.append(exc)
        return "recovered"

    error = SharedCacheError("down")
    assert drive(flow(), Script((Exchange, error))) == "recovered"
    assert caught == [error]


# -- windows ---------------------------------------------------------------------------------


def test_hold_computes_monotonic_instants_and_wall_expiry() -> None:
    s = Snapshot(StoredToken(TOKEN, "Bearer", 3600.0, 1), 3_600_000, 100.0, 1_000_000.0)
    held = WINDOWS.hold(s)
    assert held == Held(
        token=AccessToken(TOKEN, "Bearer", 1_003_600.0),
        lifetime=3600.0,
        recheck_at=160.0,  # local_max_age after the read comes before the refresh window
        fresh_until=3400.0,
        usable_until=3670.0,
        source=s,
    )
    assert held.is_fresh(3399.9)
    assert not held.is_fresh(3400.0)
    assert held.is_usable(3669.9)
    assert not held.is_usable(3670.0)


def test_hold_recheck_at_is_the_refresh_window_when_it_comes_first() -> None:
    windows = Windows(refresh_ahead=300, min_validity=30, local_max_age=10_000)
    held = windows.hold(Snapshot(StoredToken(TOKEN, "Bearer", 3600.0, 1), 400_000, 0.0, 0.0))
    assert held.fresh_until == pytest.approx(100.0)
    assert held.recheck_at == held.fresh_until
    assert held.usable_until == pytest.approx(370.0)


def test_hold_uses_shrunk_windows_for_short_lived_tokens() -> None:
    held = WINDOWS.hold(Snapshot(StoredToken(TOKEN, "Bearer", 60.0, 1), 60_000, 0.0, 500.0))
    assert held.fresh_until == pytest.approx(30.0)
    assert held.usable_until == pytest.approx(45.0)
    assert held.recheck_at == pytest.approx(30.0)
    assert held.token.expires_at == pytest.approx(560.0)


@pytest.mark.parametrize(
    ("lifetime", "expected"),
    [
        (3600, (300, 30)),
        (600, (300, 30)),
        (100, (50, 25)),
        (60, (30, 15)),
        (1, (0.5, 0.25)),
        (1000, (300, 30)),
    ],
)
def test_for_lifetime_shrinks_windows_for_short_lifetimes(
    lifetime: float, expected: tuple[float, float]
) -> None:
    assert WINDOWS.for_lifetime(lifetime) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("lifetime", "expected"),
    [(3600, 5.0), (60, 3.75), (20, 1.25), (0.2, 0.05), (0.001, 0.05)],
)
def test_retry_interval_is_bounded(lifetime: float, expected: float) -> None:
    assert WINDOWS.retry_interval(lifetime) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("lifetime", "fresh", "expected"),
    [
        (None, True, 300_000),
        (None, False, 30_000),
        (3600, True, 300_000),
        (3600, False, 30_000),
        (60, True, 30_000),
        (60, False, 15_000),
        (0.001, False, 0),
    ],
)
def test_lock_threshold_ms(lifetime: float | None, fresh: bool, expected: int) -> None:
    threshold = WINDOWS.lock_threshold_ms(lifetime, fresh=fresh)
    assert threshold == expected
    assert type(threshold) is int


@settings(max_examples=100, deadline=None, database=None)
@given(
    refresh_ahead=st.floats(0.01, 10_000),
    ratio=st.floats(0, 0.99),
    local_max_age=st.floats(0.01, 10_000),
    lifetime=st.floats(0.01, 100_000),
    ttl_ms=st.integers(0, 100_000_000),
    seen_at=st.floats(0, 1e6),
)
def test_hold_instants_are_ordered(
    refresh_ahead: float,
    ratio: float,
    local_max_age: float,
    lifetime: float,
    ttl_ms: int,
    seen_at: float,
) -> None:
    windows = Windows(refresh_ahead, refresh_ahead * ratio, local_max_age)
    held = windows.hold(Snapshot(StoredToken(TOKEN, "Bearer", lifetime, 1), ttl_ms, seen_at, 0.0))
    expires = seen_at + ttl_ms / 1000
    assert held.recheck_at <= held.fresh_until < held.usable_until <= expires
    assert 0.05 <= windows.retry_interval(lifetime) <= 5.0
    assert windows.lock_threshold_ms(lifetime, fresh=True) >= windows.lock_threshold_ms(
        lifetime, fresh=False
    )


def test_refresh_takes_over_once_when_the_holders_lease_runs_out_unannounced() -> None:
    """A holder that died or stalled mid-refresh: the loser takes the lock over at lease end
    (a takeover the driver counts), instead of leaving the refresh to a later pause."""
    stale = snap(200)
    script = Script(
        (TryLock, lost(lock_ttl_ms=2000, snapshot=stale)),
        (Wait, WaitOutcome(None, timed_out=True)),
        (TryLock, won(snapshot=stale)),
        (Exchange, ISSUED),
        (Publish, PUBLISHED),
    )
    assert drive(refresh(WINDOWS, grant(3600), Clock()), script) is PUBLISHED
    assert script.seen[2] == TryLock(300_000, after_timeout=True)


def test_refresh_takes_over_at_most_once() -> None:
    stale = snap(200)
    script = Script(
        (TryLock, lost(lock_ttl_ms=2000, snapshot=stale)),
        (Wait, WaitOutcome(None, timed_out=True)),
        (TryLock, lost(lock_ttl_ms=2000, snapshot=stale)),  # someone else was quicker
        (Wait, WaitOutcome(None, timed_out=True)),
    )
    assert drive(refresh(WINDOWS, grant(3600), Clock()), script) is None
    assert script.finished()


# -- a server that reuses tokens (Doorkeeper's reuse_access_token) -----------------------------


def _publish_as_driver(clock: Clock) -> Callable[[Effect[Any]], Snapshot]:
    """Answer a Publish the way the store does: the issued token as held by this worker."""

    def answer(effect: Effect[Any]) -> Snapshot:
        assert isinstance(effect, Publish)
        return own_snapshot(
            effect.issued, effect.lock.fence, clock(), reuse=effect.reuse, keep=effect.keep
        )

    return answer


def test_the_same_token_handed_back_is_the_same_grant_and_teaches_reuse() -> None:
    clock = Clock(1000.0)
    held = snap(200, lifetime=3600, value=TOKEN)  # in the refresh window: 200 s left
    same = IssuedToken(TOKEN, "Bearer", 201, 1000.0, 1.7e9, 0.01)  # rounded up by the server
    script = Script(
        (TryLock, attempt(acquired=True, fence=7, snapshot=held)),
        (Exchange, same),
        (Publish, _publish_as_driver(clock)),
    )
    result = drive(refresh(WINDOWS, held, clock), script)
    publish = script.seen[2]
    assert isinstance(publish, Publish)
    assert publish.reuse and publish.keep is held
    # The original grant: its lifetime (no shrinking windows) and the earlier expiry.
    assert result.stored.lifetime == 3600 and result.stored.reuse
    assert result.ttl_ms == 200_000
    # Reuse known: no early window; the token is handed out until a short margin before it dies.
    kept = WINDOWS.hold(result)
    assert kept.fresh_until == kept.usable_until == result.expires_at - 1.0


def test_with_reuse_known_the_next_ask_waits_for_the_servers_rounding() -> None:
    clock = Clock(1000.0)
    dying = Snapshot(StoredToken(TOKEN, "Bearer", 3600, 1, reuse=True), 500, 1000.0, 1.7e9)
    script = Script(
        (TryLock, attempt(acquired=True, fence=8, snapshot=dying, reuse=True)),
        (Pause, None),
        (Exchange, ISSUED),
        (Publish, _publish_as_driver(clock)),
    )
    result = drive(obtain(WINDOWS, dying, 1020.0, clock), script)
    pause = script.seen[1]
    assert isinstance(pause, Pause) and pause.seconds == pytest.approx(1.5)
    assert result.stored.value == NEW_TOKEN and result.stored.reuse
    publish = script.seen[3]
    assert isinstance(publish, Publish) and publish.reuse and publish.keep is None


@pytest.mark.parametrize(
    "expired",
    [
        IssuedToken(TOKEN, "Bearer", 0, 1000.0, 1.7e9, 0.01),
        # expires_in counts from the request: a reply slower than its grant (a reused token
        # near its end, a slow server) is dead on arrival too. Asked 1.5 s ago, for 1 s:
        IssuedToken(TOKEN, "Bearer", 1, 998.5, 1.7e9, 1.5),
    ],
    ids=["expires-in-zero", "slower-than-its-grant"],
)
def test_a_reply_dead_on_arrival_is_not_published_and_one_more_ask_gets_the_new_token(
    expired: IssuedToken,
) -> None:
    clock = Clock(1000.0)
    script = Script(
        (TryLock, attempt(acquired=True, fence=9)),
        (Exchange, expired),
        (Pause, None),
        (Exchange, ISSUED),
        (Publish, _publish_as_driver(clock)),
    )
    result = drive(obtain(WINDOWS, None, 1020.0, clock), script)
    assert result.stored.value == NEW_TOKEN
    assert not script.steps


def test_an_expired_token_handed_back_twice_gives_the_lock_back_and_raises() -> None:
    expired = IssuedToken(TOKEN, "Bearer", 0, 1000.0, 1.7e9, 0.01)
    script = Script(
        (TryLock, attempt(acquired=True, fence=9)),
        (Exchange, expired),
        (Pause, None),
        (Exchange, expired),
        (Release, None),
    )
    with pytest.raises(InvalidTokenResponseError, match="expired"):
        drive(obtain(WINDOWS, None, 1020.0, Clock()), script)
    release = script.seen[-1]
    # Told to the fleet as a failure, with a hold-off: else each waiter would take the lock in
    # turn and ask twice more.
    assert isinstance(release, Release) and release.error_code == "invalid_response"
    assert release.holdoff_ms > 0


def test_an_interruption_after_a_failed_publish_does_not_go_back_to_redis() -> None:
    """The guard settles what a flow holds when it is interrupted; a Publish or Release that
    Redis just failed is not tried again then (the lease frees the lock)."""
    lock = LockAttempt(acquired=True, skipped=False, fence=3, lock_ttl_ms=0, snapshot=None,
                       owner="me")  # fmt: skip
    issued = IssuedToken("t" * 40, "Bearer", 3600, 0.0, 0.0, 0.1)
    for settle in (Publish(lock, issued), Release(lock)):
        guard = LockGuard()
        guard.saw(TryLock(min_ttl_ms=0), lock)
        guard.saw(Exchange(), issued)
        assert guard.pending() == Publish(lock, issued)
        guard.failed(settle)
        assert guard.pending() is None
    guard = LockGuard()
    guard.saw(TryLock(min_ttl_ms=0), lock)
    guard.failed(Exchange())  # the flow releases the lock itself: still held until then
    assert guard.pending() == Release(lock)


def test_the_local_fallback_never_hands_out_a_dead_reply() -> None:
    """Without Redis the same rule holds: one more ask after the server's rounding, then an
    error rather than a token K2 would refuse."""
    expired = IssuedToken(TOKEN, "Bearer", 0, 1000.0, 1.7e9, 0.01)
    script = Script((Exchange, expired), (Pause, None), (Exchange, ISSUED))
    flow = obtain(WINDOWS, None, 2000.0, Clock(1000.0), local=LocalFailures(), shared=False)
    assert drive(flow, script).stored.value == NEW_TOKEN
    local = LocalFailures()
    script = Script((Exchange, expired), (Pause, None), (Exchange, expired))
    flow = obtain(WINDOWS, None, 2000.0, Clock(1000.0), local=local, shared=False)
    with pytest.raises(InvalidTokenResponseError, match="expired"):
        drive(flow, script)
    assert script.finished()
    # ... and held off, as after any failure: the next call asks nothing.
    flow = obtain(WINDOWS, None, 2000.0, Clock(1000.0), local=local, shared=False)
    with pytest.raises(InvalidTokenResponseError):
        drive(flow, Script())


def test_a_token_that_died_while_redis_failed_its_write_is_not_kept_by_the_fallback() -> None:
    """Redis failing slowly at the publish (a timeout longer than the token's remaining life):
    the fallback keeps the token only if it still lives."""
    clock = Clock(1000.0)
    short = IssuedToken(NEW_TOKEN, "Bearer", 2, 1000.0, 1.7e9, 0.01)

    def slow_failure(effect: Effect[Any]) -> Any:
        clock.now += 3.0
        raise SharedCacheError("timed out")

    script = Script((TryLock, won()), (Exchange, short), (Publish, slow_failure))
    with pytest.raises(TokenUnavailableError, match="expired"):
        drive(obtain(WINDOWS, None, 2000.0, clock, local=LocalFailures()), script)
