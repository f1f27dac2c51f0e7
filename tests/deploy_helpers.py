"""Plumbing for the deployment fleet tests: real servers as child processes, load, invariants.

Everything here works by PID: we find a server's workers from /proc, signal only processes this
test started (or their forked workers), and wait on conditions with deadlines, never on guesses.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.conftest import CLIENT_ID, CLIENT_SECRET

ROOT = Path(__file__).resolve().parent.parent

# The fleet's token schedule: K2 grants 4 s; one worker refreshes 2 s before expiry, so a new
# token is exchanged every ~2 s while load runs; nobody sends one with under 0.5 s left.
TOKEN_LIFETIME = 4
REFRESH_AHEAD = 2.0
MIN_VALIDITY = 0.5
PERIOD = TOKEN_LIFETIME - REFRESH_AHEAD


def fleet_env(redis_url: str, base_url: str, **extra: str) -> dict[str, str]:
    """The environment a deployed worker would get, plus PYTHONPATH so ``examples`` imports.

    Inherited variables that would change what the examples configure are dropped, so a
    developer's shell cannot make the tests pass or fail.
    """
    ignored = ("K2_", "CELERY_", "GUNICORN_", "REDIS_URL", "WEB_CONCURRENCY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ignored)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(
        K2_CLIENT_ID=CLIENT_ID,
        K2_CLIENT_SECRET=CLIENT_SECRET,
        K2_BASE_URL=base_url,
        K2_REDIS_URL=redis_url,
        K2_REFRESH_AHEAD=str(REFRESH_AHEAD),
        K2_MIN_VALIDITY=str(MIN_VALIDITY),
    )
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------ processes


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def live_children(pid: int) -> set[int]:
    """PIDs of ``pid``'s children that are running (a killed, unreaped worker is a zombie and
    does not count). /proc/<pid>/task/*/children needs CONFIG_PROC_CHILDREN, which some kernels
    lack, so we fall back to reading every process's parent from /proc/*/stat."""
    listed = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if listed:
        candidates: Iterable[int] = {
            int(c) for f in listed for c in f.read_text().split() if c.isdigit()
        }
    else:
        candidates = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    found = set()
    for child in candidates:
        info = _ppid_and_state(child)
        if info is not None and info[0] == pid and info[1] not in ("Z", "X"):
            found.add(child)
    return found


def stop_processes(main: subprocess.Popen[bytes], workers: Iterable[int], grace: float) -> None:
    """SIGTERM the server we started, SIGKILL it after ``grace``; then SIGKILL any of its
    workers still alive (an orphan from a master that died first), each by its PID."""
    known = set(workers)
    if main.poll() is None:
        known |= live_children(main.pid)
        main.send_signal(signal.SIGTERM)
        try:
            main.wait(grace)
        except subprocess.TimeoutExpired:
            main.kill()
            main.wait(5)
    for pid in known:
        info = _ppid_and_state(pid)
        if info is not None and info[1] not in ("Z", "X"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


# ------------------------------------------------------------------------------------ load


CLOSE = {"Connection": "close"}


@dataclass
class Phase:
    """What one load phase saw: requests made, failures (described), which workers served."""

    started: float = 0.0
    ended: float = 0.0
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    pids: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def record(self, pid: int | None, failure: str | None) -> None:
        with self.lock:
            self.requests += 1
            if failure is not None:
                self.failures.append(failure)
            if pid is not None:
                self.pids[pid] += 1


def http_load(url: str, clients: int, seconds: float, rate: float) -> Phase:
    """``clients`` threads each call ``url`` ``rate`` times a second (or as fast as answers come,
    if slower) for ``seconds``; every non-200 or error is a failure. Bounded: each request has
    a timeout, each thread stops at the deadline.

    Paced rather than flat out: the fake K2 server shares this process's GIL with the clients,
    and a saturated test process would delay its token replies by a large part of a refresh
    period, which is our latency, not the fleet's. A new connection per request, as from many
    independent callers: with keep-alive (gthread) each thread would stay pinned to whichever
    worker accepted it first, often the same one.
    """
    phase = Phase(started=time.monotonic())
    deadline = phase.started + seconds

    def client() -> None:
        sent = 0
        with requests.Session() as session:
            while time.monotonic() < deadline:
                time.sleep(max(0.0, phase.started + sent / rate - time.monotonic()))
                sent += 1
                try:
                    response = session.get(url, headers=CLOSE, timeout=(2, 15))
                    body = response.json() if response.ok else {}
                except (requests.RequestException, ValueError) as exc:
                    phase.record(None, f"{type(exc).__name__}: {exc}")
                    continue
                failure = None if response.status_code == 200 else f"HTTP {response.status_code}"
                phase.record(body.get("pid"), failure)

    threads = [threading.Thread(target=client, name=f"load-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    phase.ended = time.monotonic()
    return phase


# ------------------------------------------------------------------------------------ invariants


def expected_exchanges(duration: float) -> int:
    """Under continuous load: the first exchange, then one each time the token turns stale."""
    return 1 + math.floor(duration / PERIOD)


def exchanges_per_phase(issued_at: list[float], phases: list[Phase]) -> list[int]:
    """Attribute each exchange to the last phase that had started by then; it must fall inside
    that phase, with slack after its end for a background refresh kicked by its last request.
    Exchanges outside every phase are not counted (the caller compares the sum with the total).
    """
    counts = [0] * len(phases)
    for t in issued_at:
        started = [i for i, p in enumerate(phases) if p.started - 0.05 <= t]
        if started and t <= phases[started[-1]].ended + 0.5:
            counts[started[-1]] += 1
    return counts


def check_one_exchange_per_period(issued_at: list[float], phases: list[Phase]) -> None:
    """Assert the fleet exchanged exactly once per refresh period.

    No exchange may happen outside a load phase, each phase sees 1 + floor(duration / period)
    exchanges +- 1, and no two exchanges are closer than 0.8 periods: two workers refreshing the
    same stale token would show up as a pair a few milliseconds apart.
    """
    times = sorted(issued_at)
    per_phase = exchanges_per_phase(times, phases)
    assert sum(per_phase) == len(times), f"exchange outside a load phase: {times} {phases}"
    for count, phase in zip(per_phase, phases, strict=True):
        expected = expected_exchanges(phase.duration)
        assert abs(count - expected) <= 1, (
            f"{count} exchanges in a {phase.duration:.1f} s phase, expected {expected} +- 1"
        )
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert all(g >= 0.8 * PERIOD for g in gaps), f"exchanges too close: gaps {gaps}"
