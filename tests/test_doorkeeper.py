"""The library against a real Doorkeeper 5.5 (what K2 runs), in its default mode: no token
reuse, no revocation of the previous token.

Each test starts the Rails app of ``tests/doorkeeper`` on a free loopback port (the
``doorkeeper`` fixture) next to a private redis-server, and prints its figures (``make
test-doorkeeper`` runs ``pytest -m doorkeeper -s``). Without Ruby the tests skip, saying what to
install; ``make test`` deselects them and says so.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable

import pytest
import redis

from k2_shared_token import InvalidCredentialsError, SharedTokenProvider
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import CLIENT_ID, CLIENT_SECRET, provider_kwargs
from tests.doorkeeper.server import DoorkeeperServer
from tests.doorkeeper.workers import ping_worker
from tests.faultkit import assert_no_leak
from tests.fleet import CTX
from tests.test_fleet import run_stampede

pytest_plugins = ("tests.doorkeeper.fixtures",)
pytestmark = pytest.mark.doorkeeper

Start = Callable[..., DoorkeeperServer]

# 6 s tokens refreshed 3 s ahead: one exchange every 3 s under load.
LIFETIME = 6
REFRESH_AHEAD = 3.0
MIN_VALIDITY = 1.0
PERIOD = LIFETIME - REFRESH_AHEAD
LOAD_SECONDS = 20.0  # not a multiple of the period: the expected count is unambiguous
PROCESSES = 4


def start(doorkeeper: Start, **options: object) -> DoorkeeperServer:
    """A server whose seeded application has the suite's client id and secret."""
    return doorkeeper(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **options)


def test_16_processes_x_4_threads_on_a_cold_cache_make_one_token_request(
    doorkeeper: Start, redis_server: EmbeddedRedis
) -> None:
    dk = start(doorkeeper)
    began = time.monotonic()
    outcomes = run_stampede(redis_server.url, dk.base_url, processes=16, threads=4)
    took = time.monotonic() - began
    counts = dk.counts()
    tokens = {token for kind, token in outcomes if kind == "ok"}
    print(
        f"\n[doorkeeper default] cold stampede 16x4: {len(outcomes)} callers, "
        f"{len(tokens)} distinct token(s), token_requests={counts['token_requests']} "
        f"issued={counts['token_issued']} errors={counts['token_errors']} ({took:.1f} s)"
    )
    assert [o for o in outcomes if o[0] != "ok"] == []
    assert len(outcomes) == 64
    assert len(tokens) == 1
    assert counts["token_requests"] == counts["token_issued"] == 1
    assert dk.ping(tokens.pop()).status == 200  # Doorkeeper accepts the token it issued


def test_4_processes_for_20_s_with_6_s_tokens_fail_no_call_and_exchange_once_per_period(
    doorkeeper: Start, redis_server: EmbeddedRedis
) -> None:
    dk = start(doorkeeper, expires_in=LIFETIME)
    kwargs = provider_kwargs(
        redis_server.url, dk.base_url, refresh_ahead=REFRESH_AHEAD, min_validity=MIN_VALIDITY
    )
    barrier = CTX.Barrier(PROCESSES + 1)
    stop = CTX.Event()
    results = CTX.Queue()
    url = f"{dk.base_url}/api/ping"
    children = [
        CTX.Process(target=ping_worker, args=(kwargs, url, barrier, stop, results, 0.002))
        for _ in range(PROCESSES)
    ]
    for child in children:
        child.start()
    try:
        barrier.wait(60)  # every worker has built its provider; the cache is cold
        started = time.time()
        time.sleep(LOAD_SECONDS)  # the load phase itself, not an ordering
        stop.set()
        ended = time.time()
        reports = [results.get(timeout=60) for _ in children]
    finally:
        stop.set()
        for child in children:
            child.join(30)
            if child.is_alive():  # pragma: no cover - only on a hang
                child.kill()
    counts = dk.counts()
    issued = dk.issued_at()
    calls = sum(r["calls"] for r in reports)
    failures = [f for r in reports for f in r["failures"]]
    retried = sum(r["retried_401"] for r in reports)
    duration = ended - started
    expected = 1 + math.floor(duration / PERIOD)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(issued)]
    print(
        f"\n[doorkeeper default] {PROCESSES} processes, {LIFETIME} s tokens refreshed "
        f"{REFRESH_AHEAD:g} s ahead, {duration:.1f} s: {calls} API calls "
        f"({[r['calls'] for r in reports]}), {len(failures)} failed, {retried} retried 401s, "
        f"Doorkeeper saw api_calls={counts['api_calls']} api_401={counts['api_401']} "
        f"server_errors={counts['server_errors']}; exchanges={len(issued)} "
        f"(token_requests={counts['token_requests']}, expected {expected} +- 1), "
        f"first at +{issued[0] - started:.2f} s, gaps {gaps} s"
    )
    assert failures == [], f"{len(failures)} failed, first: {failures[:5]}"
    assert counts["api_401"] == 0
    assert counts["server_errors"] == 0
    assert counts["api_calls"] == calls + retried  # every call reached Doorkeeper once
    assert counts["token_requests"] == counts["token_issued"] == len(issued)
    # The same bound as the deployment fleets (tests/deploy_helpers.py): exchanges only during
    # the load (slack after it for a refresh kicked by its last calls), 1 + floor(duration /
    # period) of them +- 1, and no two closer than 0.8 periods.
    assert all(started - 0.05 <= t <= ended + 0.5 for t in issued), (issued, started, ended)
    assert abs(len(issued) - expected) <= 1
    assert all(g >= 0.8 * PERIOD for g in gaps), f"exchanges too close: gaps {gaps}"


def test_a_wrong_secret_gets_doorkeepers_401_as_invalid_credentials_and_leaks_nowhere(
    doorkeeper: Start,
    redis_server: EmbeddedRedis,
    redis_client: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    dk = start(doorkeeper)
    wrong = "wrong-" + secrets.token_urlsafe(18)
    provider = SharedTokenProvider(
        **provider_kwargs(redis_server.url, dk.base_url, client_secret=wrong)
    )
    try:
        with pytest.raises(InvalidCredentialsError) as first:
            provider.get_token()
        with pytest.raises(InvalidCredentialsError) as again:  # held off: Doorkeeper not asked
            provider.get_token()
    finally:
        provider.close()
    counts = dk.counts()
    error = first.value
    print(
        f"\n[doorkeeper default] wrong secret: {type(error).__name__} status={error.status} "
        f"error={error.error!r}; second call {type(again.value).__name__} during the hold-off; "
        f"token_requests={counts['token_requests']}; scanned {len(all_logs.records)} log "
        f"records, 2 exceptions and {redis_client.dbsize()} Redis keys for the secret"
    )
    assert error.status == 401
    assert error.error == "invalid_client"
    assert counts["token_requests"] == counts["token_errors"] == 1
    assert_no_leak(
        secret=wrong,
        logs=all_logs.records,
        errors=[error, again.value],
        objects=[provider],
        client=redis_client,
    )


@pytest.mark.parametrize("scopes", [(), ("read", "write")], ids=["no-scopes", "default-scopes"])
def test_doorkeepers_success_reply_with_integer_created_at_is_accepted(
    doorkeeper: Start, redis_server: EmbeddedRedis, scopes: tuple[str, ...]
) -> None:
    dk = start(doorkeeper, default_scopes=scopes)
    raw = dk.token_reply().json()  # the reply as Doorkeeper sends it, for its shape
    dk.reset_counts()
    provider = SharedTokenProvider(**provider_kwargs(redis_server.url, dk.base_url))
    try:
        began = time.time()
        token = provider.get()  # one exchange: POST /oauth/token, parsed by the library
        took = time.time() - began
    finally:
        provider.close()
    counts = dk.counts()
    shape = {k: type(v).__name__ for k, v in raw.items()}
    print(
        f"\n[doorkeeper default] reply fields {shape} (scope={raw.get('scope')!r}); "
        f"one exchange in {took * 1000:.1f} ms, token_requests={counts['token_requests']}, "
        f"expires in {token.expires_at - time.time():.1f} s"
    )
    assert isinstance(raw["created_at"], int)
    assert not isinstance(raw["created_at"], bool)
    expected = {"access_token", "token_type", "expires_in", "created_at"}
    assert set(raw) == (expected | {"scope"} if scopes else expected)
    assert counts["token_requests"] == counts["token_issued"] == 1
    assert token.token_type == "Bearer"
    assert 3590 <= token.expires_at - began <= 3600 + 1
    assert dk.ping(token.value).status == 200
