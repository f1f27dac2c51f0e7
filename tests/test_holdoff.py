"""The fleet-wide hold-off in Redis: after a failed exchange nobody asks K2 again for a while.

Each "worker" is a separate provider (own connection pool, own local state) on one real Redis and
one real fake K2 server, which counts every request that reaches it: a held-off worker must add
none. A hold-off running out is simulated by deleting its key, which is exactly what its expiry
does, so no test waits for one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from k2_shared_token import (
    InvalidCredentialsError,
    K2TokenError,
    SharedTokenProvider,
    TokenEndpointUnavailableError,
)
from k2_shared_token._redis.codec import decode
from k2_shared_token.testing.fake_k2 import FakeK2Server, Fault
from tests.conftest import CLIENT_SECRET
from tests.faultkit import assert_no_leak, stored_bytes, warnings_with

Make = Callable[..., SharedTokenProvider]

WRONG_SECRET = "wrong-secret-Zq81-typo-in-the-deploy"


def issued_tokens(fake_k2: FakeK2Server) -> list[str]:
    return [record.token for record in fake_k2.issued]


def no_leaks(
    fake_k2: FakeK2Server,
    client: redis.Redis,
    logs: pytest.LogCaptureFixture,
    errors: list[BaseException],
    objects: list[object],
) -> None:
    for secret in (CLIENT_SECRET, WRONG_SECRET):
        assert_no_leak(
            secret=secret,
            tokens=issued_tokens(fake_k2),
            logs=logs.records,
            errors=errors,
            objects=objects,
            client=client,
        )


def test_invalid_client_holds_off_workers_with_that_secret_but_not_a_corrected_one(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """A bad secret deployed to a fleet costs K2 one request, not one per worker and retry;
    fixing the secret takes effect at once, and the first success lifts the hold-off."""
    first = make_provider(client_secret=WRONG_SECRET, invalid_client_holdoff=120)
    keys = first.keys
    errors: list[BaseException] = []
    with pytest.raises(InvalidCredentialsError) as info:
        first.get()
    errors.append(info.value)
    assert fake_k2.token_requests == 1
    assert 119_000 < redis_client.pttl(keys.backoff) <= 120_000
    holdoff = first._store.status()["holdoff"]
    assert holdoff is not None
    assert holdoff["error"] == "invalid_client"
    assert holdoff["failed_exchanges"] == 1
    assert 119 < holdoff["seconds_left"] <= 120

    second = make_provider(client_secret=WRONG_SECRET, invalid_client_holdoff=120)
    for worker in (second, first, second):
        with pytest.raises(InvalidCredentialsError) as info:
            worker.get()
        errors.append(info.value)
        assert info.value.retry_after is not None
        assert 118 < info.value.retry_after <= 120
    assert fake_k2.token_requests == 1, "a held-off worker asked K2"

    fixed = make_provider()  # same client id, the corrected secret
    token = fixed.get_token()
    assert fake_k2.token_requests == 2
    assert fake_k2.is_valid(token)
    assert decode(stored_bytes(redis_client, keys.token)).value == token
    assert redis_client.exists(keys.backoff) == 0
    assert redis_client.exists(keys.failures) == 0
    assert first._store.status()["holdoff"] is None
    no_leaks(fake_k2, redis_client, all_logs, errors, [first, second, fixed])


def test_503s_that_exhaust_the_retries_hold_the_fleet_off_for_failure_backoff(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    fake_k2.inject(Fault.status(503), Fault.status(503))
    kwargs = {"max_attempts": 2, "failure_backoff": 30, "failure_backoff_max": 120}
    first = make_provider(**kwargs)
    keys = first.keys
    with pytest.raises(TokenEndpointUnavailableError) as first_error:
        first.get()
    assert fake_k2.token_requests == 2
    assert 29_000 < redis_client.pttl(keys.backoff) <= 30_000
    assert redis_client.get(keys.backoff) == b"unavailable:"  # binds every secret
    assert redis_client.get(keys.failures) == b"1"
    holdoff = first._store.status()["holdoff"]
    assert holdoff is not None
    assert (holdoff["error"], holdoff["failed_exchanges"]) == ("unavailable", 1)
    assert 29 < holdoff["seconds_left"] <= 30

    second = make_provider(**kwargs)
    with pytest.raises(TokenEndpointUnavailableError) as second_error:
        second.get()
    assert second_error.value.retry_after is not None
    assert 28 < second_error.value.retry_after <= 30
    assert fake_k2.token_requests == 2, "a held-off worker asked K2"
    no_leaks(
        fake_k2, redis_client, all_logs, [first_error.value, second_error.value], [first, second]
    )


def test_consecutive_failed_exchanges_double_the_holdoff_up_to_its_cap(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """The streak outlives each hold-off (its key lives 10 min longer), so an endpoint that stays
    down is asked less and less often; one success resets everything."""
    provider = make_provider(max_attempts=1, failure_backoff=10, failure_backoff_max=30)
    keys = provider.keys
    errors: list[BaseException] = []
    for seconds, streak in ((10, b"1"), (20, b"2"), (30, b"3"), (30, b"4")):
        redis_client.delete(keys.backoff)  # the previous hold-off ran out
        fake_k2.inject(Fault.status(503))
        with pytest.raises(TokenEndpointUnavailableError) as info:
            provider.get()
        errors.append(info.value)
        pttl = redis_client.pttl(keys.backoff)
        assert (seconds - 1) * 1000 < pttl <= seconds * 1000
        assert redis_client.get(keys.failures) == streak
        assert redis_client.pttl(keys.failures) > pttl + 590_000
    assert fake_k2.token_requests == 4

    redis_client.delete(keys.backoff)
    token = provider.get_token()
    assert fake_k2.is_valid(token)
    assert redis_client.exists(keys.backoff, keys.failures) == 0
    no_leaks(fake_k2, redis_client, all_logs, errors, [provider])


@pytest.mark.parametrize(("retry_after", "holdoff"), [(30, 30), (999_999, 3600)])
def test_a_429_retry_after_sets_the_holdoff_capped_at_an_hour(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
    retry_after: int,
    holdoff: int,
) -> None:
    """The server's own "come back in N s" wins over a shorter backoff; a broken header cannot
    park the fleet for longer than an hour."""
    fake_k2.inject(*[Fault.status(429, retry_after=retry_after)] * 2)
    kwargs = {"max_attempts": 2, "failure_backoff": 1, "failure_backoff_max": 60}
    first = make_provider(**kwargs)
    keys = first.keys
    with pytest.raises(TokenEndpointUnavailableError) as first_error:
        first.get()
    requests_made = fake_k2.token_requests
    assert (holdoff - 1) * 1000 < redis_client.pttl(keys.backoff) <= holdoff * 1000
    with pytest.raises(TokenEndpointUnavailableError) as second_error:
        make_provider(**kwargs).get()
    assert second_error.value.retry_after is not None
    assert holdoff - 2 < second_error.value.retry_after <= holdoff
    assert fake_k2.token_requests == requests_made
    no_leaks(fake_k2, redis_client, all_logs, [first_error.value, second_error.value], [first])


def test_a_still_valid_token_is_served_throughout_a_holdoff(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """A hold-off stops exchanges, not service: workers keep the shared token, stale or even
    below ``min_validity``, while it is alive, and the failed early refresh is only logged."""
    fake_k2.expires_in = 600
    kwargs = {"refresh_ahead": 120, "min_validity": 10, "max_attempts": 1, "failure_backoff": 30}
    # Without local_cache this worker reads Redis on every call, so it sees the refresh window.
    reader = make_provider(local_cache=False, **kwargs)
    keys = reader.keys
    token = reader.get_token()
    redis_client.pexpire(keys.token, 100_000)  # 100 s left: inside the refresh window
    fake_k2.inject(Fault.status(503))
    assert reader.get_token() == token  # served; the early refresh runs in the background
    assert reader.wait_for_refresh(5)
    assert fake_k2.token_requests == 2
    assert reader.stats()["refresh_failed"] == 1
    assert 29_000 < redis_client.pttl(keys.backoff) <= 30_000
    assert warnings_with(all_logs.records, "early refresh failed")

    for _ in range(20):
        assert reader.get_token() == token
    assert make_provider(**kwargs).get_token() == token  # a new worker: shared, no exchange

    redis_client.pexpire(keys.token, 5_000)  # alive, but below min_validity
    late = make_provider(**kwargs)
    assert late.get_token() == token  # better than an error while the fleet holds off
    assert late.wait_for_refresh(5)
    assert fake_k2.token_requests == 2, "a held-off worker asked K2"
    no_leaks(fake_k2, redis_client, all_logs, [], [reader, late])


def test_holdoff_error_types_are_the_package_errors(
    make_provider: Make,
    fake_k2: FakeK2Server,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """What a held-off caller catches: the same classes an exchange raises, so one ``except``
    clause handles both the worker that asked K2 and the ones that did not."""
    fake_k2.inject(Fault.status(502))
    provider = make_provider(max_attempts=1, failure_backoff=30)
    with pytest.raises(K2TokenError) as direct:
        provider.get()
    with pytest.raises(K2TokenError) as held_off:
        make_provider(max_attempts=1).get()
    assert type(direct.value) is type(held_off.value) is TokenEndpointUnavailableError
    assert redis_client.exists(provider.keys.backoff) == 1
    no_leaks(fake_k2, redis_client, all_logs, [direct.value, held_off.value], [provider])
