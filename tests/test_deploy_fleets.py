"""Real deployments share one token: gunicorn (sync and gthread, with and without preload_app;
gevent), uvicorn serving the FastAPI example, and a celery prefork pool, each four worker
processes, run the example apps against the fake K2 server and a private redis-server.

The fake K2 server grants 4 s tokens and the examples refresh 2 s ahead, so a 7 s load phase
spans three refresh periods. Each test asserts that no request or task failed, that K2 never
saw an unauthorised API call, and that the whole fleet made one exchange per refresh period.
One worker is SIGKILLed between load phases (gunicorn sync without preload, and celery): its
replacement must join the fleet without an extra exchange and without a failed request.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from celery import Celery
from celery.result import AsyncResult

from k2_shared_token import SharedTokenProvider
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis, free_port
from tests.conftest import provider_kwargs, wait_until
from tests.deploy_helpers import (
    CLOSE,
    PERIOD,
    ROOT,
    TOKEN_LIFETIME,
    Phase,
    check_one_exchange_per_period,
    exchanges_per_phase,
    fleet_env,
    http_load,
    live_children,
    log_tail,
    stop_processes,
)

pytestmark = pytest.mark.fleet

WORKERS = 4
LOAD_SECONDS = 7.0  # not a multiple of the period: the count is then unambiguous
CLIENT_THREADS = 4
CLIENT_RATE = 50.0  # requests per second per client thread: 200/s in all
GEVENT_CLIENTS = 8  # more concurrent callers for the gevent workers: 400/s in all
TASK_BURST = 8  # tasks submitted together, every BURST_EVERY seconds: 40 tasks/s
BURST_EVERY = 0.2


def lock_key(redis_url: str, base_url: str) -> str:
    """The Redis key of the fleet's refresh lock (built from the same settings the workers use)."""
    with SharedTokenProvider(**provider_kwargs(redis_url, base_url)) as provider:
        return provider.keys.lock


def wait_for_quiet_lock(redis_url: str, base_url: str) -> None:
    """Wait until no worker holds the refresh lock, so a kill cannot hit an exchange in flight
    (that would be the lock-holder-dies case, tested elsewhere, not a clean respawn)."""
    key = lock_key(redis_url, base_url)
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: not client.exists(key), 10, "the refresh lock to be released")
    finally:
        client.close()


def respawn_one(master: int, victim: int) -> int:
    """SIGKILL ``victim``, wait for ``master`` to replace it; returns the new worker's PID."""
    before = live_children(master)
    assert victim in before
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in live_children(master) and len(live_children(master)) == WORKERS,
        20,
        f"a replacement for worker {victim}",
    )
    (new,) = live_children(master) - before
    return new


def check_and_report(name: str, phases: list[Phase], fake: FakeK2Server) -> None:
    """Print the figures for the closing note (shown with ``pytest -s``), then assert that no
    request failed, K2 saw no unauthorised call and the fleet made one exchange per period."""
    issued_at = [r.issued_at for r in fake.issued]
    pids = set().union(*(p.pids for p in phases))
    failures = [f for p in phases for f in p.failures]
    requests_made = sum(p.requests for p in phases)
    times = sorted(issued_at)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    print(
        f"\n[{name}] workers={len(pids)} requests={requests_made} failures={len(failures)} "
        f"exchanges={fake.exchanges} token_requests={fake.token_requests} "
        f"(per phase {exchanges_per_phase(issued_at, phases)}; "
        f"phases {[round(p.duration, 1) for p in phases]} s, period {PERIOD} s, gaps {gaps} s) "
        f"api_requests={fake.api_requests} api_unauthorized={fake.api_unauthorized} "
        f"per-worker counts {[sorted(p.pids.values(), reverse=True) for p in phases]}"
    )
    assert failures == [], f"{len(failures)} failed, first: {failures[:5]}"
    assert fake.api_unauthorized == 0
    assert fake.token_requests == fake.exchanges  # no exchange failed or was retried
    # Every success reached K2 exactly once: no 401-and-retry happened behind our back.
    assert fake.api_requests == requests_made
    check_one_exchange_per_period(issued_at, phases)


# ---------------------------------------------------------------------------------- gunicorn


@contextmanager
def gunicorn(env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start gunicorn with the example config; yield it once all workers are up and /health
    answers. Always stopped by PID afterwards, workers included."""
    port = free_port()
    env = {**env, "GUNICORN_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(WORKERS)}
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "examples/gunicorn.conf.py",
        "examples.wsgi_app:application",
    ]
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: set[int] = set()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {proc.returncode}:\n{log_tail(log)}")
        seen.update(live_children(proc.pid))
        if len(live_children(proc.pid)) < WORKERS:
            return False
        try:
            return requests.get(f"{base}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(ready, 20, "gunicorn workers and GET /health")
        yield proc, base
    finally:
        seen.update(live_children(proc.pid))
        stop_processes(proc, seen, grace=10)


def provider_origins(base: str, asks: int = 12) -> dict[int, int]:
    """Worker pid -> pid of the process that built its provider, from ``GET /health`` on fresh
    connections. Gunicorn preloads for all workers or none, so any one answer tells which case
    we are in; we ask a few times to check several workers, but cannot aim at a given one (the
    first worker to wake accepts), so we do not insist on hearing from all of them."""
    origins: dict[int, int] = {}
    for _ in range(asks):
        body = requests.get(f"{base}/health", headers=CLOSE, timeout=5).json()
        origins[body["pid"]] = body["provider_built_in"]
        if len(origins) == WORKERS:
            break
    return origins


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_fleet_makes_one_exchange_per_period(
    worker_class: str,
    preload: bool,
    redis_server: EmbeddedRedis,
    fake_k2: FakeK2Server,
    tmp_path: Path,
) -> None:
    fake_k2.expires_in = TOKEN_LIFETIME
    env = fleet_env(
        redis_server.url,
        fake_k2.base_url,
        GUNICORN_WORKER_CLASS=worker_class,
        GUNICORN_PRELOAD="1" if preload else "0",
    )
    kill_one = worker_class == "sync" and not preload
    name = f"gunicorn {worker_class} {'preload' if preload else 'no-preload'}"
    with gunicorn(env, tmp_path / "gunicorn.log") as (master, base):
        # With preload_app the master built the provider before forking, and the workers use
        # that (reset) object; without, each worker built its own after the fork.
        built_in = provider_origins(base)
        for worker, origin in built_in.items():
            assert origin == (master.pid if preload else worker), built_in
        phases = [http_load(f"{base}/pay", CLIENT_THREADS, LOAD_SECONDS, CLIENT_RATE)]
        if kill_one:
            assert phases[0].failures == []
            wait_for_quiet_lock(redis_server.url, fake_k2.base_url)
            victim = max(phases[0].pids, key=lambda pid: phases[0].pids[pid])
            new = respawn_one(master.pid, victim)
            phases.append(http_load(f"{base}/pay", CLIENT_THREADS, LOAD_SECONDS, CLIENT_RATE))
            print(
                f"\n[{name}] killed worker {victim}, respawned as {new}, "
                f"which served {phases[1].pids[new]} requests"
            )
            assert victim not in phases[1].pids
            assert phases[1].pids[new] > 0, "the respawned worker never served"
    print(f"\n[{name}] provider built in (worker: builder) {built_in}, master {master.pid}")
    check_and_report(name, phases, fake_k2)
    # Every worker took part: the token was really shared, not used by one busy process.
    assert len(phases[0].pids) == WORKERS


def os_threads(pid: int) -> int:
    """How many OS threads process ``pid`` runs (its /proc task entries)."""
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def test_gunicorn_gevent_fleet_makes_one_exchange_per_period(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, tmp_path: Path
) -> None:
    """``-k gevent`` (the example config's GUNICORN_WORKER_CLASS): each worker monkey-patches
    before it imports the app, so the provider's single flight waits on gevent locks and its
    background refresher is a greenlet. Concurrent requests in one worker are greenlets that
    wait on the same exchange, and no worker grows an OS thread per waiting request."""
    fake_k2.expires_in = TOKEN_LIFETIME
    # GEVENT_RESOLVER=block: gevent's default resolver would add a pool of OS threads of its
    # own (getaddrinfo), which would hide any thread the library started.
    env = fleet_env(
        redis_server.url,
        fake_k2.base_url,
        GUNICORN_WORKER_CLASS="gevent",
        GEVENT_RESOLVER="block",
    )
    name = "gunicorn gevent"
    with gunicorn(env, tmp_path / "gunicorn.log") as (master, base):
        phases = [http_load(f"{base}/pay", GEVENT_CLIENTS, LOAD_SECONDS, CLIENT_RATE)]
        threads = {pid: os_threads(pid) for pid in live_children(master.pid)}
    print(f"\n[{name}] OS threads per worker after the load {threads}")
    check_and_report(name, phases, fake_k2)
    assert len(phases[0].pids) == WORKERS
    # Greenlets wait, not OS threads: each worker still runs on its one OS thread.
    assert set(threads.values()) == {1}, threads


def test_gevent_greenlets_share_one_flight_and_refresh_without_os_threads(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    """Inside one monkey-patched process (tests/gevent_probe.py): 200 greenlets on a cold
    cache, with K2 taking 0.5 s to answer, make one exchange between them and all get its
    token; a call in the refresh-ahead window returns the held token and the background
    refresher (a greenlet) exchanges the next one. The OS thread count never grows."""
    fake_k2.expires_in = TOKEN_LIFETIME
    fake_k2.latency = 0.5
    # gevent's default resolver runs getaddrinfo in a pool of OS threads of its own; the
    # blocking one does not, so every thread seen here would be the library's.
    env = fleet_env(redis_server.url, fake_k2.base_url, GEVENT_RESOLVER="block")
    out = subprocess.run(
        [sys.executable, "-m", "tests.gevent_probe", "200"],
        cwd=ROOT, env=env, capture_output=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    probe = json.loads(out.stdout.decode().splitlines()[-1])
    print(f"\n[gevent probe] {probe} exchanges={fake_k2.exchanges}")
    assert probe["patched"]
    assert probe["distinct_tokens"] == 1
    assert probe["kicked_got_held"] and probe["refreshed_new"]
    assert probe["exchange_ok"] == 2 == fake_k2.exchanges == fake_k2.token_requests
    assert probe["threads_peak"] == probe["threads_before"], probe


# ---------------------------------------------------------------------------------- uvicorn


@contextmanager
def uvicorn(env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start ``uvicorn --workers 4`` on the FastAPI example; yield once every worker has run
    its lifespan startup (one line each in the log) and /health answers. Always stopped by PID
    afterwards, workers (and multiprocessing's resource tracker) included."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.fastapi_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(WORKERS),
        "--no-access-log",
    ]
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: set[int] = set()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"uvicorn exited with {proc.returncode}:\n{log_tail(log)}")
        seen.update(live_children(proc.pid))
        if log.read_text(errors="replace").count("Application startup complete") < WORKERS:
            return False
        try:
            return requests.get(f"{base}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(ready, 30, "uvicorn workers' lifespans and GET /health")
        yield proc, base
    finally:
        seen.update(live_children(proc.pid))
        stop_processes(proc, seen, grace=10)


def test_uvicorn_fastapi_fleet_makes_one_exchange_per_period(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, tmp_path: Path
) -> None:
    """Four uvicorn worker processes (spawned, not forked), each with the provider its lifespan
    built, share one token; the lifespan's ``aclose`` runs at shutdown."""
    fake_k2.expires_in = TOKEN_LIFETIME
    env = fleet_env(redis_server.url, fake_k2.base_url)
    name = "uvicorn fastapi"
    log = tmp_path / "uvicorn.log"
    with uvicorn(env, log) as (_, base):
        phases = [http_load(f"{base}/pay", CLIENT_THREADS, LOAD_SECONDS, CLIENT_RATE)]
    check_and_report(name, phases, fake_k2)
    assert len(phases[0].pids) == WORKERS
    text = log.read_text(errors="replace")
    assert text.count("Application shutdown complete") == WORKERS, log_tail(log)
    assert "Traceback" not in text, log_tail(log)


# ---------------------------------------------------------------------------------- celery


@dataclass
class CeleryFleet:
    """A running ``celery worker`` (the pool's parent process) and a client app to feed it."""

    proc: subprocess.Popen[bytes]
    client: Celery
    log: Path

    def load(self, seconds: float, burst: int, every: float) -> Phase:
        """Submit ``burst`` ``charge`` tasks at once every ``every`` seconds for ``seconds``,
        then collect every result (bounded by a timeout each); a task that raised or saw a
        non-200 is a failure. Bursts, because tasks this quick sent one by one would all run
        in whichever pool process happens to be idle first."""
        phase = Phase(started=time.monotonic())
        sent: list[AsyncResult] = []
        rounds = 0
        while time.monotonic() < phase.started + seconds:
            for _ in range(burst):
                sent.append(self.client.send_task("k2.charge", args=[len(sent)]))
            rounds += 1
            time.sleep(max(0.0, phase.started + rounds * every - time.monotonic()))
        for result in sent:
            try:
                value = result.get(timeout=20)
            except Exception as exc:  # the task raised, or never finished
                phase.record(None, f"{type(exc).__name__}: {exc}")
                continue
            status = value["status"]
            phase.record(value["pid"], None if status == 200 else f"API said {status}")
        phase.ended = time.monotonic()
        return phase


@contextmanager
def celery_worker(env: dict[str, str], broker: str, log: Path) -> Iterator[CeleryFleet]:
    """Start ``celery worker --pool prefork`` on the example app; yield once its pool is up and
    it answers a ping. Always stopped by PID afterwards, pool children included."""
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "examples.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(WORKERS),
        "--loglevel",
        "INFO",
        # Cluster chatter we do not need: mingle alone adds a second to every start.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--hostname",
        f"k2-fleet-{os.getpid()}@localhost",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = Celery("k2_fleet_test", broker=broker, backend=broker)
    client.conf.broker_connection_retry_on_startup = True
    seen: set[int] = set()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"celery exited with {proc.returncode}:\n{log_tail(log)}")
        seen.update(live_children(proc.pid))
        if len(live_children(proc.pid)) < WORKERS:
            return False
        return bool(client.control.ping(timeout=0.5))

    try:
        wait_until(ready, 30, "the celery pool and a ping reply")
        yield CeleryFleet(proc, client, log)
    finally:
        seen.update(live_children(proc.pid))
        stop_processes(proc, seen, grace=15)
        client.close()


def test_celery_prefork_fleet_makes_one_exchange_per_period(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, tmp_path: Path
) -> None:
    fake_k2.expires_in = TOKEN_LIFETIME
    # No CELERY_BROKER_URL: the example falls back to K2_REDIS_URL, our redis-server.
    env = fleet_env(redis_server.url, fake_k2.base_url)
    name = "celery prefork"
    with celery_worker(env, redis_server.url, tmp_path / "celery.log") as fleet:
        phases = [fleet.load(LOAD_SECONDS, TASK_BURST, BURST_EVERY)]
        assert phases[0].failures == [], log_tail(fleet.log)
        wait_for_quiet_lock(redis_server.url, fake_k2.base_url)
        victim = max(phases[0].pids, key=lambda pid: phases[0].pids[pid])
        new = respawn_one(fleet.proc.pid, victim)
        phases.append(fleet.load(LOAD_SECONDS, TASK_BURST, BURST_EVERY))
        print(
            f"\n[{name}] killed pool process {victim}, respawned as {new}, "
            f"which ran {phases[1].pids[new]} tasks"
        )
        assert victim not in phases[1].pids
        assert phases[1].pids[new] > 0, "the respawned pool process never ran a task"
    check_and_report(name, phases, fake_k2)
    # Every pool process took part: the token was really shared, not used by one busy process.
    assert len(phases[0].pids) == WORKERS
