"""The Doorkeeper fleet tests' harness: a fleet of ``ping_worker`` processes calling the real
server's ``/api/ping`` through ``auth()``, and what to read from their reports.

Every time here is wall-clock epoch seconds (``time.time()``): the workers' per-call records and
the Doorkeeper app's ``/__issued`` use the same clock (one machine).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from tests.doorkeeper.server import DoorkeeperServer
from tests.doorkeeper.workers import ping_worker
from tests.fleet import CTX


@dataclass(frozen=True)
class TokenRequest:
    """One ``POST /oauth/token`` as Doorkeeper answered it (from ``/__issued``)."""

    began: float
    at: float
    status: int
    fp: str | None  # the issued token's fingerprint (a 200), never the token
    error: str | None  # the OAuth error code of a refusal


@dataclass
class FleetRun:
    reports: list[dict[str, Any]]
    started: float  # every worker had built its provider; the load began
    ended: float  # the workers were told to stop
    counts: dict[str, int]
    requests: list[TokenRequest]
    during: Any = None  # what the ``during`` callable returned

    @property
    def duration(self) -> float:
        return self.ended - self.started

    @property
    def issued(self) -> list[float]:
        return [r.at for r in self.requests if r.status == 200]

    def total(self, key: str) -> int:
        return sum(int(r[key]) for r in self.reports)

    def each(self, key: str) -> list[Any]:
        return [r[key] for r in self.reports]

    @property
    def failed(self) -> int:
        """Calls that did not end in a 200 (an exception or a final non-200 status)."""
        return self.total("failed")

    @property
    def ended_401(self) -> int:
        return sum(len(r["ended_401"]) for r in self.reports)

    @property
    def worker_tokens(self) -> set[str]:
        """Fingerprints of the tokens the workers' successful calls carried."""
        return {run[0] for r in self.reports for run in r["runs"]}

    @property
    def malformed(self) -> int:
        return self.total("malformed")

    def requests_between(self, since: float, until: float) -> list[TokenRequest]:
        return [r for r in self.requests if since <= r.at <= until]


def token_requests(dk: DoorkeeperServer) -> list[TokenRequest]:
    """Every token request the server answered, oldest first."""
    reply = dk.request("GET", "/__issued")
    if reply.status != 200:
        raise RuntimeError(f"/__issued answered {reply.status}")
    rows = reply.json()["requests"]
    out = [
        TokenRequest(
            float(r["began"]), float(r["at"]), int(r["status"]), r.get("fp"), r.get("error")
        )
        for r in rows
    ]
    return sorted(out, key=lambda r: r.at)


def requests_per_token(requests: Iterable[TokenRequest]) -> list[tuple[str, int]]:
    """``[(fingerprint, requests)]`` in the order the tokens were first issued. A request
    counts for the token its reply carried; a refused one for the next token issued (what it
    was trying to get); refusals after the last token are left out."""
    order: list[str] = []
    count: dict[str, int] = {}
    pending = 0
    for r in sorted(requests, key=lambda r: r.at):
        if r.status != 200 or r.fp is None:
            pending += 1
            continue
        if r.fp not in count:
            order.append(r.fp)
            count[r.fp] = 0
        count[r.fp] += 1 + pending
        pending = 0
    return [(fp, count[fp]) for fp in order]


def run_ping_fleet(
    dk: DoorkeeperServer,
    kwargs: dict[str, Any],
    *,
    seconds: float = 20.0,
    processes: int = 4,
    pause: float = 0.002,
    stagger: float = 0.0,
    during: Callable[[float], Any] | None = None,
) -> FleetRun:
    """Start ``processes`` ``ping_worker`` children (spawned: clean interpreters, like pods) on
    ``dk``'s ``/api/ping``, let them load it for ``seconds`` (worker ``i`` starting ``i *
    stagger`` seconds after the others are ready) or, if given, for as long as
    ``during(started)`` runs in this process, called once every worker has had a call end 200
    (the fleet is warm), then stop them and collect their reports and the server's counters.
    Every child is joined, and killed (by its PID) if it hangs."""
    barrier = CTX.Barrier(processes + 1)
    stop = CTX.Event()
    results = CTX.Queue()
    warm = CTX.Semaphore(0)
    url = f"{dk.base_url}/api/ping"
    children = [
        CTX.Process(
            target=ping_worker,
            args=(kwargs, url, barrier, stop, results, warm, pause, i * stagger),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    extra: Any = None
    try:
        barrier.wait(60)  # every worker has built its provider; the cache is cold
        started = time.time()
        if during is None:
            time.sleep(seconds)  # the load phase itself, not an ordering
        else:
            for _ in children:
                if not warm.acquire(timeout=60):
                    raise AssertionError("a worker never had a call end 200 within 60 s")
            extra = during(started)
        stop.set()
        ended = time.time()
        reports = [results.get(timeout=60) for _ in children]
    finally:
        stop.set()
        for child in children:
            child.join(30)
            if child.is_alive():  # pragma: no cover - only on a hang
                child.kill()
                child.join(10)
    return FleetRun(reports, started, ended, dk.counts(), token_requests(dk), extra)


def converged_at(reports: list[dict[str, Any]], since: float, recent: float = 0.5) -> float | None:
    """The first instant at or after ``since`` at which every process's latest successful call
    carried the same token (and that process made one within ``recent`` seconds), or None.
    Candidate instants are the starts of the workers' runs of calls on one token."""
    runs = [sorted(r["runs"], key=lambda run: run[1]) for r in reports]
    candidates = sorted({run[1] for rs in runs for run in rs if run[1] >= since} | {since})
    for t in candidates:
        current: set[str | None] = set()
        for rs in runs:
            latest = None
            for fp, first, last, _ in rs:
                if first > t:
                    break
                latest = fp if last >= t - recent else None
            current.add(latest)
        if len(current) == 1 and None not in current:
            return t
    return None


@dataclass
class HoldoffWatch:
    """Polls the namespace's ``backoff`` key (a fleet hold-off: ``<code>:<fp>`` with a PTTL)
    from a thread, every ``interval`` seconds, and keeps the longest one seen per code. Redis
    errors (it is down on purpose) are ignored."""

    url: str
    key: str
    interval: float = 0.02
    longest: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> HoldoffWatch:
        self._thread = threading.Thread(target=self._run, name="holdoff-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            while not self._stop.wait(self.interval):
                with contextlib.suppress(redis.RedisError, OSError):
                    pipe = client.pipeline(transaction=False)
                    pipe.get(self.key)
                    pipe.pttl(self.key)
                    value, pttl = pipe.execute()
                    if value is not None and int(pttl) > 0:
                        code = bytes(value).decode(errors="replace").partition(":")[0]
                        self.seen += 1
                        self.longest[code] = max(self.longest.get(code, 0.0), int(pttl) / 1000)
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
