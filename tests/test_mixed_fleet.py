"""A fleet of blocking and asyncio processes on one namespace: one exchange per refresh period.

Sync processes (threads calling ``SharedTokenProvider.get_token()``) and asyncio processes (50
tasks each awaiting ``AsyncSharedTokenProvider.get_token()``) start cold, together, against one
redis-server and the fake K2 server handing out 4 s tokens refreshed 2 s early, and run for
3.5 refresh periods. Whatever the process kind, they must share one lock and one token: the
fake server sees one exchange per period, every token a caller held was still valid at the
fake server at that moment, and both kinds held exactly the same tokens.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest

from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import provider_kwargs
from tests.fleet import CTX
from tests.mixed_fleet import Report, async_worker, sync_worker

pytestmark = pytest.mark.fleet

EXPIRES_IN = 4  # s, the fake server's token lifetime
REFRESH_AHEAD = 2.0  # s: a token is refreshed 2 s before expiry...
PERIOD = EXPIRES_IN - REFRESH_AHEAD  # ... so the fleet exchanges every 2 s
RUN = 3.5 * PERIOD  # ends mid-period: the last token is seen by everybody before the end
SYNC_PROCESSES, THREADS, SYNC_PACE = 2, 4, 0.005
ASYNC_PROCESSES, TASKS, ASYNC_PACE = 2, 50, 0.010
READY_TIMEOUT = 60.0  # spawned interpreters import the package; generous on a busy machine


def test_sync_and_async_processes_share_one_exchange_per_refresh_period(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    fake_k2.expires_in = EXPIRES_IN
    kwargs = provider_kwargs(
        redis_server.url,
        fake_k2.base_url,
        refresh_ahead=REFRESH_AHEAD,
        min_validity=0.5,
        lock_lease=2,
        wait_timeout=5,
    )
    parties = SYNC_PROCESSES + ASYNC_PROCESSES
    barrier = CTX.Barrier(parties + 1)
    end = CTX.Value("d", 0.0)
    results = CTX.Queue()
    children = [
        CTX.Process(
            target=sync_worker,
            args=(kwargs, barrier, end, results, THREADS, SYNC_PACE, READY_TIMEOUT),
        )
        for _ in range(SYNC_PROCESSES)
    ] + [
        CTX.Process(
            target=async_worker,
            args=(kwargs, barrier, end, results, TASKS, ASYNC_PACE, READY_TIMEOUT),
        )
        for _ in range(ASYNC_PROCESSES)
    ]
    for child in children:
        child.start()
    try:
        barrier.wait(READY_TIMEOUT)  # every provider built, every thread and task waiting
        end.value = time.monotonic() + RUN
        barrier.wait(READY_TIMEOUT)  # go: a cold cache, everybody at once
        reports: list[Report] = [results.get(timeout=RUN + 60) for _ in children]
    finally:
        barrier.abort()
        for child in children:
            child.join(30)
        for child in children:
            if child.is_alive():  # pragma: no cover - only on a hang; ours, by PID
                child.kill()
                child.join(5)

    sync, asyncio_ = Report("sync"), Report("async")
    for report in reports:
        (sync if report.kind == "sync" else asyncio_).merge(report)
    assert sync.errors == []
    assert asyncio_.errors == []
    assert sync.calls > 0
    assert asyncio_.calls > 0

    # One exchange per refresh period, fleet-wide: the cold start plus one per full period.
    issued = {record.token: record for record in fake_k2.issued}
    bound = math.floor(RUN / PERIOD) + 1
    assert fake_k2.token_requests == fake_k2.exchanges == len(issued)
    assert bound - 1 <= len(issued) <= bound, f"{len(issued)} exchanges in {RUN} s"
    starts = sorted(record.issued_at for record in issued.values())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) > PERIOD / 2, gaps  # never two exchanges in one period

    # Every token held was issued by then and still valid at the fake server.
    for seen in (sync.seen, asyncio_.seen):
        for token, (first, last) in seen.items():
            record = issued[token]
            assert record.issued_at <= first
            assert last < record.issued_at + record.expires_in

    # Blocking and asyncio processes held exactly the same tokens: all that were issued.
    assert set(sync.seen) == set(asyncio_.seen) == set(issued)
