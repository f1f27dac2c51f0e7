"""Many tenants in one process: background work on a fixed number of threads, a bounded number of
exchanges in flight, one HTTP connection pool per base URL, and idle copies dropped.

Against a real redis-server and the fake K2 server. Concurrency is counted where it happens: the
fake server records the most token requests it served at once and the TCP connections it
accepted; threads are the process's own (``/proc/self/task``), less the fake server's handlers.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import redis

from k2_shared_token._core.local_copy import LocalCopy
from k2_shared_token._core.tokens import Snapshot, StoredToken
from k2_shared_token._core.windows import Windows
from k2_shared_token._scheduler import WORKERS, AsyncScheduler, Scheduler
from k2_shared_token.testing.fake_k2 import FakeK2Server
from tests.conftest import wait_until

Make = Callable[..., Any]


def library_threads() -> int:
    """The process's OS threads (which also sees threads started without ``threading``), less
    the fake K2 server's request handlers running in this process."""
    handlers = sum("process_request" in t.name for t in threading.enumerate())
    return len(os.listdir("/proc/self/task")) - handlers


def tenants(fake_k2: FakeK2Server, make_provider: Make, n: int, **settings: Any) -> list[Any]:
    made = []
    for i in range(n):
        client_id, secret = f"tenant-{i}", f"tenant-secret-{i}-not-for-logs"
        fake_k2.add_client(client_id, secret)
        made.append(make_provider(client_id=client_id, client_secret=secret, **settings))
    return made


def test_tenants_coming_due_together_are_all_refreshed_a_few_at_a_time(
    make_provider: Make, fake_k2: FakeK2Server, side: str
) -> None:
    """Each provider kicks its early refresh; the refreshes run on the scheduler's few workers,
    and no more than ``max_exchanges`` token requests are ever in flight at once."""
    fake_k2.expires_in = 4  # refresh window: the last 2 s of the token's life
    providers = tenants(fake_k2, make_provider, 24, max_exchanges=3, backplane=False)
    for provider in providers:
        provider.get_token()
    # The fake server's clock: every copy enters its refresh window 2 s after its exchange.
    wait_until(
        lambda: all(p.seconds_left() < 2.0 for p in providers), 10, "the tokens to come due"
    )
    fake_k2.latency = 0.05  # long enough for the refreshes to overlap
    fake_k2.reset_counters()
    threads_before = library_threads()
    old = [p.get_token() for p in providers]  # each call hands out its copy and kicks
    for provider in providers:
        assert provider.wait_for_refresh(30)
    assert fake_k2.exchanges == len(providers)
    assert [p.get_token() for p in providers] != old
    assert all(p.seconds_left() > 2.0 for p in providers)
    assert 2 <= fake_k2.peak_in_flight <= 3
    if side == "sync":
        assert library_threads() - threads_before <= WORKERS


def test_cold_tenants_asking_at_once_send_at_most_max_exchanges_requests(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    fake_k2.latency = 0.05
    providers = tenants(fake_k2, make_provider, 12, max_exchanges=2)
    start = threading.Barrier(len(providers))
    tokens: list[str] = []

    def call(provider: Any) -> None:
        start.wait()
        tokens.append(provider.get_token())

    threads = [threading.Thread(target=call, args=(p,)) for p in providers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(set(tokens)) == len(providers)
    assert fake_k2.exchanges == len(providers)
    assert fake_k2.peak_in_flight == 2


def test_providers_of_one_base_url_share_one_connection_pool(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    providers = tenants(fake_k2, make_provider, 10)
    fake_k2.reset_counters()
    for provider in providers:
        provider.get_token()
    assert fake_k2.exchanges == 10
    assert fake_k2.connections_accepted == 1
    for provider in providers:
        provider.close()  # the last one closes the shared client: a new provider opens anew
    fake_k2.add_client("late", "late-secret-not-for-logs")
    make_provider(client_id="late", client_secret="late-secret-not-for-logs").get_token()
    assert fake_k2.exchanges == 11
    assert fake_k2.connections_accepted == 2


def test_an_idle_copy_is_dropped_and_the_next_call_reads_redis(
    make_provider: Make, fake_k2: FakeK2Server
) -> None:
    provider = make_provider(local_idle=0.1)
    token = provider.get_token()
    wait_until(lambda: provider.seconds_left() is None, 5, "the idle copy to be dropped")
    assert provider.get_token() == token
    assert fake_k2.exchanges == 1
    assert provider.stats()["shared_hit"] == 1


# -- the local copy's idle check (pure) ----------------------------------------------------


def copy_holding(fence: int) -> tuple[LocalCopy, list[int]]:
    copy = LocalCopy(Windows(300, 30, 60), keep_shared=True, recheck_unshared=5, idle=900)
    armed: list[int] = []
    copy.watch = lambda: armed.append(1)
    stored = StoredToken(value="t" * 40, token_type="Bearer", lifetime=3600, fence=fence)
    copy.adopt(Snapshot(stored, 3_600_000, 0.0, 0.0), copy.generation)
    return copy, armed


def test_a_copy_used_between_checks_is_kept_and_an_unused_one_dropped() -> None:
    copy, armed = copy_holding(fence=1)
    assert armed == [1]
    copy.hits += 1
    assert copy.idle_check() is True and copy.held is not None
    assert copy.idle_check() is False and copy.held is None
    # A later adopt arms the check again, once.
    stored = StoredToken(value="u" * 40, token_type="Bearer", lifetime=3600, fence=2)
    copy.adopt(Snapshot(stored, 3_600_000, 0.0, 0.0), copy.generation)
    copy.adopt(Snapshot(stored, 3_600_000, 0.0, 0.0), copy.generation)
    assert armed == [1, 1]


def test_the_fallbacks_own_token_is_never_dropped_as_idle() -> None:
    copy, _ = copy_holding(fence=0)  # Redis does not have it: dropping it costs an exchange
    assert copy.idle_check() is True and copy.held is not None


# -- the scheduler ---------------------------------------------------------------------------


def test_the_scheduler_runs_many_jobs_on_at_most_its_workers() -> None:
    scheduler = Scheduler(workers=3)
    together = threading.Barrier(3)  # passes only if three jobs run at once
    running, peak, lock = [0], [0], threading.Lock()
    done = threading.Semaphore(0)

    def job(first: bool) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if first:
            together.wait(10)
        with lock:
            running[0] -= 1
        done.release()

    for i in range(30):
        scheduler.submit(lambda first=i < 3: job(first))
    for _ in range(30):
        assert done.acquire(timeout=10)
    assert peak[0] == 3
    assert scheduler.threads == 3


def test_timers_run_in_deadline_order_and_a_failing_job_leaves_the_worker_alive() -> None:
    scheduler = Scheduler(workers=1)
    order: list[str] = []
    finished = threading.Event()

    def fail() -> None:
        raise RuntimeError("a bug in a job")

    scheduler.call_later(0.03, lambda: order.append("c"))
    scheduler.call_later(0.01, lambda: order.append("a"))
    scheduler.call_later(0.02, fail)
    scheduler.call_later(0.02, lambda: order.append("b"))
    scheduler.call_later(0.04, finished.set)
    assert finished.wait(10)
    assert order == ["a", "b", "c"]
    assert scheduler.threads == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_scheduler() -> None:
    parent = Scheduler.here()
    ran = threading.Event()
    parent.submit(ran.set)
    assert ran.wait(10)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        ok = threading.Event()
        child = Scheduler.here()
        child.submit(ok.set)
        os.write(write, b"1" if child is not parent and ok.wait(10) else b"0")
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_a_late_announcement_of_a_dropped_token_does_not_bring_it_back() -> None:
    """The backplane adopts with the generation it reads on delivery: a publish announced
    before an invalidate but delivered after it must not restore the dead token."""
    copy, _ = copy_holding(fence=1)
    assert copy.held is not None
    dead = copy.held.source
    copy.forget(dead.stored.value)
    copy.adopt(dead, copy.generation)
    assert copy.held is None
    newer = replace(dead, stored=replace(dead.stored, value="n" * 40, fence=2))
    copy.adopt(newer, copy.generation)
    assert copy.held is not None and copy.held.token.value == "n" * 40


def test_an_event_loop_runs_at_most_its_workers_background_jobs_at_once() -> None:
    async def main() -> tuple[int, int]:
        scheduler = AsyncScheduler.here()
        assert AsyncScheduler.here() is scheduler
        running, peak = [0], [0]
        full = asyncio.Event()
        go = asyncio.Event()

        async def job() -> None:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            if running[0] == WORKERS:
                full.set()
            await go.wait()
            running[0] -= 1

        tasks = [scheduler.submit(job, "job") for _ in range(3 * WORKERS)]
        await asyncio.wait_for(full.wait(), 10)
        waiting = sum(not t.done() for t in tasks)
        go.set()
        await asyncio.gather(*tasks)
        return peak[0], waiting

    peak, waiting = asyncio.run(main())
    assert peak == WORKERS
    assert waiting == 3 * WORKERS


def test_an_announcement_does_not_refill_a_copy_dropped_as_idle(
    make_provider: Make, redis_client: redis.Redis
) -> None:
    """The backplane follows the copies a process holds; one dropped as idle stays dropped
    until a call asks for it, or every fleet refresh would refill every idle tenant."""
    idle = make_provider(local_idle=0.1, backplane=False)
    other = make_provider(backplane=False)
    idle.get_token()
    wait_until(lambda: idle.seconds_left() is None, 5, "the idle copy to be dropped")
    with redis_client.pubsub() as sub:
        sub.subscribe(idle.keys.channel)
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        other.invalidate(other.get_token())
        new = other.get_token()
        raw = b""
        while not raw.startswith(b"T"):  # the announcement of the new token
            message = sub.get_message(timeout=5)
            assert message is not None, "no announcement of the new token"
            raw = message["data"] if message["type"] == "message" else b""
    idle._announced(raw)
    assert idle.seconds_left() is None
    other._announced(raw)  # a held copy does follow it
    assert other.get_token() == new


def test_closing_a_transport_twice_leaves_the_shared_session_to_the_others(
    make_provider: Make, fake_k2: FakeK2Server, side: str
) -> None:
    first, second = tenants(fake_k2, make_provider, 2)
    first.get_token()
    second.get_token()  # both use the shared client now
    transport = first._exchange.transport
    for _ in range(2):  # counted once: the session stays open for the other tenant
        if side == "async":
            first._loop.run(transport.aclose())
        else:
            transport.close()
    first.close()
    fake_k2.reset_counters()
    second.invalidate(second.get_token())
    second.get_token()
    assert fake_k2.exchanges == 1
    assert fake_k2.connections_accepted == 0  # still the pooled connection
