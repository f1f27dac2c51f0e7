"""Many processes, one token: single flight across processes, and takeover from a dead holder."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from k2_shared_token import SharedTokenProvider
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import provider_kwargs
from tests.fleet import CTX, holder_worker, stampede_worker

pytestmark = pytest.mark.fleet


def run_stampede(
    redis_url: str, base_url: str, processes: int, threads: int
) -> list[tuple[str, str]]:
    barrier = CTX.Barrier(processes * threads)
    results = CTX.Queue()
    kwargs = provider_kwargs(redis_url, base_url)
    children = [
        CTX.Process(target=stampede_worker, args=(kwargs, barrier, results, threads))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        outcomes = [item for _ in children for item in results.get(timeout=120)]
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():  # pragma: no cover - only on a hang
                child.kill()
    return outcomes


def test_16_processes_on_a_cold_cache_make_one_exchange(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    fake_k2.latency = 0.1
    outcomes = run_stampede(redis_server.url, fake_k2.base_url, processes=16, threads=2)
    assert [o for o in outcomes if o[0] != "ok"] == []
    assert len(outcomes) == 32
    assert len({token for _, token in outcomes}) == 1
    assert fake_k2.exchanges == 1
    assert fake_k2.token_requests == 1


def test_lock_holder_killed_mid_exchange_is_taken_over_after_its_lease(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    kwargs = provider_kwargs(redis_server.url, fake_k2.base_url, lock_lease=2, wait_timeout=10)
    fake_k2.pause_tokens()
    holder = CTX.Process(target=holder_worker, args=(kwargs,))
    holder.start()
    try:
        assert fake_k2.wait_for_token_requests(1, timeout=30)  # the holder is inside K2 now
        survivor = SharedTokenProvider(**kwargs)
        lock_key = survivor.keys.lock
        assert redis_client.get(lock_key) is not None
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        killed_at = time.monotonic()
        lease_left = redis_client.pttl(lock_key) / 1000

        got: list[str] = []
        waiter = threading.Thread(target=lambda: got.append(survivor.get_token()))
        waiter.start()
        # The survivor must not exchange while the dead holder's lease runs...
        assert fake_k2.wait_for_token_requests(2, timeout=10)
        took_over_after = time.monotonic() - killed_at
        fake_k2.resume_tokens()
        waiter.join(10)
        assert got and fake_k2.is_valid(got[0])
        # ... and takes over as soon as it ends (woken by the lease, not by a poll interval).
        assert took_over_after >= lease_left - 0.05
        assert took_over_after <= lease_left + 2.0
        assert fake_k2.token_requests == 2
        survivor.close()
    finally:
        fake_k2.resume_tokens()
        if holder.is_alive():  # pragma: no cover
            holder.kill()
