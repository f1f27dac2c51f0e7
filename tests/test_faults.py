"""Fault injection under load: a multi-process fleet against real redis-servers and the fake K2.

Each scenario runs 4 worker processes x 4 threads (``tests/fault_fleet.py``) that call
``get()`` every 10 ms and the fake server's protected API every few calls, and breaks something
underneath them: Redis killed and restarted, Redis black-holed, the lock holder killed or frozen
mid-exchange, the auth server failing in every way, tokens revoked at each rollover. Tokens are
short (seconds) so rollovers happen during the faults.

Every scenario then checks the same three promises from the callers' side, using what each
worker recorded per call (token fingerprints and times) against the fake server's issue records:

- no error reached a caller while a valid token existed;
- no caller was handed an expired token, and every API call through ``auth()`` ended 200 (a 401
  from a revoked token recovered by the one retry is allowed);
- the exchange attempts K2 saw stayed within a bound derived from the schedule (stated per test);

and scans for secrets: the client secret and every token K2 issued must not appear in any log
record a worker captured (DEBUG and up, tracebacks included), any exception text, any repr, the
rest of the worker's report, or any Redis value (a token only under the token key).

Steps are ordered by conditions (counters the workers bump, the fake server's request count,
Redis notifications), each with a deadline; the only timed pauses are the workers' load pacing.
A summary line per scenario is printed (``-s``) and appended as JSON to ``$K2_FAULT_REPORT``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
import redis

from k2_shared_token import SharedTokenProvider
from k2_shared_token._core.flow import LAST_RESORT_MARGIN
from k2_shared_token._core.tokens import fingerprint_of
from k2_shared_token._redis import codec, crypto
from k2_shared_token._redis.layout import Keys
from k2_shared_token.testing.fake_k2 import FakeK2Server, Fault
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.fault_fleet import (
    ERRORS,
    FALLBACK,
    LAST_TOKEN,
    REDIS_BACK,
    REDIS_BACK_TEXT,
    REDIS_DOWN,
    REDIS_DOWN_TEXT,
    CallRecord,
    Fleet,
    WorkerReport,
    fingerprint_number,
)

pytestmark = pytest.mark.fleet

API_PATH = "/api/v1/ping"
PROCESSES = 4
THREADS = 4
# The short schedule: K2 grants 4 s, a worker refreshes 2 s before expiry (one exchange every
# ~2 s fleet-wide), nobody is handed a token with under 0.5 s left.
LIFETIME = 4
REFRESH_AHEAD = 2.0
PERIOD = LIFETIME - REFRESH_AHEAD
LEASE = 2.0
# Arrival and announcement times are both observed by threads of this (busy) test process.
OBSERVATION_SLACK = 0.05
# The library counts a token's lifetime from when it sent the request, before K2 stamped it, and
# keeps LAST_RESORT_MARGIN for the last token it hands out to reach K2: it retires a token that
# much before its own horizon, by design, and that horizon is ahead of K2's by the exchange's
# transit (which a loaded machine can stretch past 100 ms). The judge takes the horizon the
# workers were handed, so an error in that sliver is not an error "while a valid token existed";
# what is left is the time between a call's start and the library reading its clock.
VALIDITY_SLACK = LAST_RESORT_MARGIN + 0.1


def fleet_kwargs(redis_url: str, base_url: str, **overrides: Any) -> dict[str, Any]:
    """Provider settings scaled down so faults and rollovers fit in seconds: a 2 s lease, Redis
    calls bounded at 0.25 s with a 0.5 s circuit cooldown, and K2 timeouts well inside the
    exchange deadline (0.8 x lease)."""
    kwargs: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "base_url": base_url,
        "redis": redis_url,
        "refresh_ahead": REFRESH_AHEAD,
        "min_validity": 0.5,
        "lock_lease": LEASE,
        "wait_timeout": 10,
        "redis_timeout": 0.25,
        "redis_cooldown": 0.5,
        "connect_timeout": 0.5,
        "read_timeout": 1.0,
        "max_attempts": 3,
    }
    kwargs.update(overrides)
    return kwargs


def run_fleet(kwargs: dict[str, Any], fake: FakeK2Server, **options: Any) -> Fleet:
    """The standard fleet (PROCESSES x THREADS), calling the fake server's protected API."""
    return Fleet(kwargs, fake.base_url + API_PATH, processes=PROCESSES, threads=THREADS, **options)


def keys_of(kwargs: dict[str, Any]) -> Keys:
    """The namespace's keys (building a provider does no I/O)."""
    with SharedTokenProvider(**kwargs) as probe:
        return probe.keys


# ------------------------------------------------------------------------------ observers


class RequestClock:
    """When each token request reached the fake K2 server, on this process's monotonic clock.

    Woken by the server's own condition on every arrival (``wait_for_token_requests``), so the
    times are as good as this busy process's scheduling allows, without polling.
    """

    def __init__(self, fake: FakeK2Server) -> None:
        self.fake = fake
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-clock", daemon=True)

    def _run(self) -> None:
        n = self.fake.token_requests + 1
        while not self._stop.is_set():
            if self.fake.wait_for_token_requests(n, timeout=0.2):
                now = time.monotonic()
                while self.fake.token_requests >= n:
                    self.times.append(now)
                    n += 1

    def __enter__(self) -> RequestClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Heard(NamedTuple):
    at: float  # time.monotonic() when this process received it
    key: str  # "channel", or the key a keyspace notification is about
    kind: str  # "T" (token announced), "E" (holder failed), "R" (lock given back), or the
    # keyspace event (set, del...)
    code: str = ""  # E: the error code
    holdoff_ms: int = 0  # E: the fleet's hold-off
    fence: int = 0  # T: the writer's fencing number
    fingerprint: str = ""  # T: of the announced token


class ChannelMonitor:
    """Listens to the namespace's announcement channel and, optionally, keyspace notifications
    for our keys: who wrote a token and when, who failed and which hold-off they set, and every
    write or delete of the lock, as Redis itself saw them. Keeps fingerprints, never tokens."""

    def __init__(self, url: str, keys: Keys, *, keyspace: bool = False) -> None:
        self.keys = keys
        self.heard: list[Heard] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        self._names = {keys.channel: "channel"}
        if keyspace:
            self._client.config_set("notify-keyspace-events", "Kg$x")
            for key in (keys.token, keys.lock, keys.backoff):
                self._names[f"__keyspace@0__:{key}"] = key
        self._thread = threading.Thread(target=self._run, name="channel-monitor", daemon=True)

    def __enter__(self) -> ChannelMonitor:
        self._pubsub.subscribe(*self._names)
        confirmed = 0
        deadline = time.monotonic() + 5
        while confirmed < len(self._names) and time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=1)
            if message is not None and message["type"] == "subscribe":
                confirmed += 1
        assert confirmed == len(self._names), "the monitor could not subscribe"
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.2)
            except redis.RedisError:
                return
            if message is None or message["type"] != "message":
                continue
            heard = self._parse(message["channel"].decode(), message["data"])
            with self._cond:
                self.heard.append(heard)
                self._cond.notify_all()

    def _parse(self, channel: str, data: bytes) -> Heard:
        now = time.monotonic()
        key = self._names[channel]
        if key != "channel":
            return Heard(now, key, data.decode())
        ann = codec.decode_announcement(data)
        if ann.released:
            return Heard(now, key, "R")
        if ann.stored is None:
            return Heard(now, key, "E", ann.error_code or "", ann.holdoff_ms)
        stored = ann.stored
        return Heard(now, key, "T", fence=stored.fence, fingerprint=fingerprint_of(stored.value))

    def wait_for(self, match: Callable[[Heard], bool], timeout: float) -> Heard | None:
        """The first message heard so far or within ``timeout`` that ``match`` accepts."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for heard in self.heard:
                    if match(heard):
                        return heard
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    @staticmethod
    def token_after(since: float) -> Callable[[Heard], bool]:
        return lambda h: h.kind == "T" and h.at > since

    @staticmethod
    def failure_after(since: float, min_holdoff_ms: int = 0) -> Callable[[Heard], bool]:
        return lambda h: h.kind == "E" and h.at > since and h.holdoff_ms >= min_holdoff_ms

    def announcements(self) -> list[Heard]:
        with self._cond:
            return [h for h in self.heard if h.key == "channel"]


def unread_bytes_from(pid: int, remote_port: int) -> int:
    """Bytes waiting unread in ``pid``'s TCP sockets connected to ``remote_port`` (Linux procfs).

    Tells the test that a reply has landed in a stopped process's socket buffer, which is the
    only way a process resumed past its read deadline still reads it (its poll sees data).
    """
    inodes: set[str] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                cols = row.split()
                if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == remote_port:
                    total += int(cols[4].split(":")[1], 16)
    return total


# ------------------------------------------------------------------------------ verdicts


@dataclass
class Verdict:
    """What the callers saw, judged against what K2 issued."""

    calls: int = 0
    api_calls: int = 0
    api_retried: int = 0
    errors: list[str] = field(default_factory=list)
    errors_while_valid: list[str] = field(default_factory=list)
    bad_tokens: list[str] = field(default_factory=list)  # expired or unknown when handed out
    bad_api: list[str] = field(default_factory=list)  # final status not 200
    revoked_handed_out: int = 0
    max_get_ms: float = 0.0

    def figures(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "api_calls": self.api_calls,
            "api_401_recovered": self.api_retried,
            "caller_errors": len(self.errors),
            "errors_while_valid": len(self.errors_while_valid),
            "bad_tokens": len(self.bad_tokens),
            "bad_api": len(self.bad_api),
            "max_get_ms": round(self.max_get_ms, 1),
        }

    def problems(self) -> list[str]:
        return [
            *(f"error while a valid token existed: {e}" for e in self.errors_while_valid[:10]),
            *self.bad_tokens[:10],
            *self.bad_api[:10],
        ]


class Life(NamedTuple):
    issued_at: float
    expires_at: float
    revoked_at: float  # math.inf unless K2 revoked it (revoke_previous mode)


def token_lives(fake: FakeK2Server, *, revoke_previous: bool) -> dict[str, Life]:
    """Fingerprint -> when the token was valid, from the fake server's own records (its
    ``issued_at`` is ``time.monotonic()``, the machine-wide clock the workers use too)."""
    records = fake.issued
    lives: dict[str, Life] = {}
    for i, record in enumerate(records):
        later = [r.issued_at for r in records[i + 1 :] if not r.reused]
        revoked = later[0] if revoke_previous and later else math.inf
        lives[fingerprint_of(record.token)] = Life(
            record.issued_at, record.issued_at + record.expires_in, revoked
        )
    return lives


def judge(
    reports: list[WorkerReport], fake: FakeK2Server, *, revoke_previous: bool = False
) -> Verdict:
    lives = token_lives(fake, revoke_previous=revoke_previous)
    verdict = Verdict()
    horizons: dict[str, float] = {}
    for report in reports:
        for fingerprint, horizon in report.horizons.items():
            horizons[fingerprint] = min(horizon, horizons.get(fingerprint, math.inf))
    # When the callers could hold each token: from its publication (a token K2 has just issued is
    # not one the callers can have yet: the holder still has to publish it, and the announcement
    # to arrive) to the earlier of K2's end for it and the library's own horizon.
    windows = [
        (
            life.issued_at + OBSERVATION_SLACK,
            min(life.expires_at, life.revoked_at, horizons.get(fingerprint, math.inf))
            - VALIDITY_SLACK,
        )
        for fingerprint, life in lives.items()
    ]

    def valid_at(t: float) -> bool:
        return any(start <= t < end for start, end in windows)

    for report in reports:
        for call in report.calls:
            where = f"pid {report.pid} {call.kind} at {call.started:.3f}"
            if call.outcome != "ok":
                verdict.errors.append(f"{where}: {call.outcome}")
                if valid_at(call.started):
                    verdict.errors_while_valid.append(f"{where}: {call.outcome}")
                continue
            if call.kind == "get":
                verdict.calls += 1
                verdict.max_get_ms = max(verdict.max_get_ms, (call.ended - call.started) * 1000)
                judge_token(verdict, lives, call, where)
            else:
                verdict.api_calls += 1
                verdict.api_retried += call.retried
                if call.status != 200:
                    verdict.bad_api.append(
                        f"{where}: final HTTP {call.status} (retried: {call.retried}, "
                        f"token {call.fingerprint}, first {call.first_fingerprint})"
                    )
    return verdict


def judge_token(verdict: Verdict, lives: dict[str, Life], call: CallRecord, where: str) -> None:
    life = lives.get(call.fingerprint)
    if life is None:
        verdict.bad_tokens.append(f"{where}: token {call.fingerprint} was never issued by K2")
    elif call.ended > life.expires_at:
        verdict.bad_tokens.append(
            f"{where}: token {call.fingerprint} handed out {call.ended - life.expires_at:.3f} s "
            "after it expired"
        )
    elif call.ended > life.revoked_at:
        verdict.revoked_handed_out += 1


def worker_leaks(reports: list[WorkerReport], secrets: dict[str, str]) -> list[str]:
    """Where any secret appears in what the workers logged, saw raised, repr'd or reported."""
    found: list[str] = []
    for report in reports:
        places = {
            "log records": "\n".join(f"{line.message}\n{line.text}" for line in report.logs),
            "exception texts": "\n".join(report.tracebacks + report.crashes),
            "reprs": "\n".join(report.reprs),
        }
        for what, text in places.items():
            found += [
                f"{name} in pid {report.pid}'s {what}" for name, s in secrets.items() if s in text
            ]
        blob = pickle.dumps(report)
        found += [
            f"{name} somewhere in pid {report.pid}'s report"
            for name, s in secrets.items()
            if s.encode() in blob
        ]
    return found


def redis_leaks(url: str, keys: Keys, tokens: list[str], *, encrypted: bool = False) -> list[str]:
    """Scan every key and value in Redis: the secret (and client id) never; a token only as the
    value of the token key, and with encryption on, nowhere in clear."""
    found: list[str] = []
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(count=1000):
            name = key.decode(errors="replace")
            if CLIENT_SECRET.encode() in key or CLIENT_ID.encode() in key:
                found.append(f"a credential in the key name {name!r}")
            values = redis_values(client, key)
            for value in values:
                if CLIENT_SECRET.encode() in value:
                    found.append(f"the client secret in the value of {name}")
                if CLIENT_ID.encode() in value:
                    found.append(f"the client id in the value of {name}")
                if name != keys.token or encrypted:
                    found += [
                        f"token {fingerprint_of(t)} in the value of {name}"
                        for t in tokens
                        if t.encode() in value
                    ]
    finally:
        client.close()
    return found


def redis_values(client: redis.Redis, key: bytes) -> list[bytes]:
    """Everything stored under ``key``, whatever its type (we only write strings, but the scan
    must not assume what it is looking for is absent)."""
    kind = as_bytes(client.type(key))
    found: list[Any] = []
    if kind == b"string":
        found = [client.get(key)]
    elif kind == b"hash":
        found = [b for kv in client.hgetall(key).items() for b in kv]
    elif kind == b"list":
        found = list(client.lrange(key, 0, -1))
    elif kind == b"set":
        found = list(client.smembers(key))
    elif kind == b"zset":
        found = list(client.zrange(key, 0, -1))
    return [as_bytes(v) for v in found if v is not None]


def as_bytes(value: object) -> bytes:
    """redis-py's replies are typed ``bytes | str``; our clients never decode, so bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


def owner_pid(owner: object) -> int:
    """The pid in a lock owner id (``host:pid:since_ms:random``)."""
    return int(as_bytes(owner).split(b":")[1])


def secrets_of(fake: FakeK2Server, extra: dict[str, str] | None = None) -> dict[str, str]:
    out = {"the client secret": CLIENT_SECRET, **(extra or {})}
    out.update({f"token {fingerprint_of(r.token)}": r.token for r in fake.issued})
    return out


def summarise(name: str, figures: dict[str, Any]) -> None:
    """One line per scenario on stdout (``-s``) and, if asked, as JSON in $K2_FAULT_REPORT."""
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    path = os.environ.get("K2_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"scenario": name, **figures}) + "\n")


def lines_of(reports: list[WorkerReport], text: str) -> dict[int, list[float]]:
    """Per worker index: when it logged a line containing ``text``."""
    return {r.index: [line.at for line in r.logs if text in line.message] for r in reports}


def exchanged_fingerprints(report: WorkerReport) -> list[str]:
    """Tokens this worker got from K2 itself, from its own INFO lines (fingerprints only)."""
    found = (
        re.search(r"exchanged a new token (sha256:[0-9a-f]+)", line.message) for line in report.logs
    )
    return [m.group(1) for m in found if m]


def check_common(
    name: str,
    reports: list[WorkerReport],
    fake: FakeK2Server,
    verdict: Verdict,
    figures: dict[str, Any],
    leaks: list[str],
    bound: int,
    extra_secrets: dict[str, str] | None = None,
) -> None:
    """Print the figures, then assert what every scenario promises."""
    leaks = leaks + worker_leaks(reports, secrets_of(fake, extra_secrets))
    figures = {
        **verdict.figures(),
        "exchange_attempts": fake.token_requests,
        "exchanges": fake.exchanges,
        "attempt_bound": bound,
        **figures,
        "leaks": len(leaks),
    }
    summarise(name, figures)
    crashes = [c for r in reports for c in r.crashes]
    assert not crashes, "uncaught exceptions in the workers:\n" + "\n".join(crashes[:5])
    assert not leaks, leaks
    assert not verdict.problems(), "\n".join(verdict.problems())
    assert verdict.calls > 0 and verdict.api_calls > 0
    assert fake.token_requests <= bound, f"{fake.token_requests} exchange attempts, bound {bound}"


# ------------------------------------------------------------------------------ scenarios


class Outage(NamedTuple):
    down_at: float
    up_at: float  # Redis answers again (restarted, or the partition healed)
    back_at: float  # every worker has logged that Redis answers again
    shared_at: float  # every worker serves the token Redis holds


def ride_out_outage(
    fleet: Fleet,
    break_redis: Callable[[], object],
    heal_redis: Callable[[], object],
    redis_url: str,
    keys: Keys,
) -> Outage:
    """Break Redis, wait until every worker noticed and served a token it exchanged itself,
    heal it, and wait until every worker has logged its recovery and serves the shared token
    again. Load runs throughout."""
    down0, fallback0 = fleet.per_process(REDIS_DOWN), fleet.per_process(FALLBACK)
    back0 = fleet.per_process(REDIS_BACK)
    break_redis()
    down_at = time.monotonic()

    def all_fell_back() -> bool:
        down, fallback = fleet.per_process(REDIS_DOWN), fleet.per_process(FALLBACK)
        pairs = zip(down, down0, fallback, fallback0, strict=True)
        return all(d > d0 and f > f0 for d, d0, f, f0 in pairs)

    assert fleet.wait_until(all_fell_back, 15), (
        f"not every worker fell back: logs {fleet.per_process(REDIS_DOWN)} (before {down0}), "
        f"fallback exchanges {fleet.per_process(FALLBACK)} (before {fallback0})"
    )
    assert fleet.wait_calls(300, 15), "the fleet stopped serving during the outage"
    heal_redis()
    up_at = time.monotonic()
    assert fleet.wait_until(
        lambda: all(b > b0 for b, b0 in zip(fleet.per_process(REDIS_BACK), back0, strict=True)),
        15,
    ), f"not every worker came back to Redis: {fleet.per_process(REDIS_BACK)} (before {back0})"
    back_at = time.monotonic()
    with SharedToken(redis_url, keys) as shared:
        assert fleet.wait_until(
            lambda: (
                (n := shared.number()) is not None
                and all(last == n for last in fleet.per_process(LAST_TOKEN))
            ),
            15,
        ), "the workers did not converge on the shared token after the outage"
    shared_at = time.monotonic()
    return Outage(down_at, up_at, back_at, shared_at)


class SharedToken:
    """Reads which token Redis shares right now (as a fingerprint number), on a direct
    connection that does not go through any fault the workers are put through."""

    def __init__(self, url: str, keys: Keys) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self._key = keys.token

    def __enter__(self) -> SharedToken:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def number(self) -> int | None:
        try:
            raw = self._client.get(self._key)
        except redis.RedisError:
            return None
        if raw is None:
            return None
        return fingerprint_number(fingerprint_of(codec.decode(as_bytes(raw)).value))


def outage_figures(reports: list[WorkerReport], outages: list[Outage]) -> dict[str, Any]:
    """Per outage: how long Redis was away, then from Redis answering until the last worker
    logged it was back, and until every worker served the shared token again."""
    back = lines_of(reports, REDIS_BACK_TEXT)
    recovery = [
        max(min(t for t in times if t >= o.up_at) - o.up_at for times in back.values())
        for o in outages
    ]
    return {
        "outages": len(outages),
        "outage_s": [round(o.up_at - o.down_at, 2) for o in outages],
        "recovery_s": [round(r, 2) for r in recovery],
        "shared_again_s": [round(o.shared_at - o.up_at, 2) for o in outages],
    }


def check_outage_logs(reports: list[WorkerReport], outages: list[Outage]) -> None:
    """One 'unavailable' and one 'answers again' warning per worker and outage, in its window."""
    down, back = lines_of(reports, REDIS_DOWN_TEXT), lines_of(reports, REDIS_BACK_TEXT)
    for report in reports:
        for o in outages:
            downs = [t for t in down[report.index] if o.down_at <= t <= o.up_at]
            backs = [t for t in back[report.index] if o.up_at <= t <= o.back_at + 0.5]
            assert len(downs) == 1 and len(backs) == 1, (
                f"pid {report.pid}: {len(downs)} 'unavailable' and {len(backs)} 'answers again' "
                f"warnings in one outage (expected one each)"
            )
        assert len(down[report.index]) == len(outages), (report.pid, down[report.index])
        assert len(back[report.index]) == len(outages), (report.pid, back[report.index])


def outage_bound(started: float, ended: float, outages: list[Outage]) -> int:
    """Exchanges allowed. Shared: one to start each stretch with Redis (the first, and one after
    each outage) and then one per refresh period. Own: while Redis is away, each process
    exchanges for itself when its copy goes stale, at most once per period, from the moment the
    outage begins until Redis answers (its next stale copy then finds Redis again)."""
    shared = len(outages) + 1 + math.ceil((ended - started) / PERIOD)
    own = sum(PROCESSES * (math.floor((o.up_at - o.down_at) / PERIOD) + 1) for o in outages)
    return shared + own


@pytest.mark.timeout(120)
def test_redis_killed_and_restarted_three_times_under_load(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    """Redis crashes (SIGKILL, every key lost) and comes back on the same port, three times.

    Each worker must notice, keep serving (its own token, exchanged once per period while the
    circuit is open), log the outage once and its end once, and return to the shared token by
    itself. Redis is scanned before each crash, since a crash loses what it held.
    """
    fake_k2.expires_in = LIFETIME
    kwargs = fleet_kwargs(redis_server.url, fake_k2.base_url)
    keys = keys_of(kwargs)
    leaks: list[str] = []
    outages: list[Outage] = []
    with run_fleet(kwargs, fake_k2) as fleet:
        assert fleet.wait_calls(500, 30)
        for _ in range(3):
            leaks += redis_leaks(redis_server.url, keys, [r.token for r in fake_k2.issued])
            outage = ride_out_outage(
                fleet, redis_server.kill, redis_server.start, redis_server.url, keys
            )
            outages.append(outage)
            assert fleet.wait_calls(300, 15)
        leaks += redis_leaks(redis_server.url, keys, [r.token for r in fake_k2.issued])
        reports = fleet.stop()
        ended = time.monotonic()
    verdict = judge(reports, fake_k2)
    figures = {**outage_figures(reports, outages), "fallback_exchanges": fallbacks(reports)}
    bound = outage_bound(fleet.started_at, ended, outages)
    check_common("redis-killed-x3", reports, fake_k2, verdict, figures, leaks, bound)
    assert not verdict.errors, verdict.errors[:10]
    check_outage_logs(reports, outages)


def fallbacks(reports: list[WorkerReport]) -> int:
    """Exchanges the workers made for themselves while the circuit was open."""
    return sum(int(r.stats.get("fallback", 0)) for r in reports)


def import_tcp_proxy() -> Any:
    """The shared loopback proxy (tests/netproxy.py), written alongside this suite."""
    from tests.netproxy import TcpProxy  # noqa: PLC0415 - a sibling module that may be absent

    return TcpProxy


@pytest.mark.timeout(90)
def test_black_holed_redis_port_under_load(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    """A partition: TCP to Redis still connects but nothing answers, for a few seconds.

    Only the socket timeout ends each Redis call, so this is where ``redis_timeout`` and the
    circuit breaker earn their keep: callers must keep getting tokens, the outage is logged
    once per worker, and after the partition heals (the commands queued meanwhile are then
    delivered late) every worker returns to the shared token.
    """
    fake_k2.expires_in = LIFETIME
    with import_tcp_proxy()(redis_server.port) as proxy:
        kwargs = fleet_kwargs(f"redis://127.0.0.1:{proxy.port}/0", fake_k2.base_url)
        keys = keys_of(kwargs)
        with run_fleet(kwargs, fake_k2) as fleet:
            assert fleet.wait_calls(500, 30)
            outage = ride_out_outage(fleet, proxy.blackhole, proxy.forward, redis_server.url, keys)
            assert fleet.wait_calls(300, 15)
            reports = fleet.stop()
            ended = time.monotonic()
    leaks = redis_leaks(redis_server.url, keys, [r.token for r in fake_k2.issued])
    verdict = judge(reports, fake_k2)
    in_outage = [
        (c.ended - c.started) * 1000
        for r in reports
        for c in r.calls
        if c.kind == "get" and outage.down_at <= c.started <= outage.shared_at
    ]
    figures = {
        **outage_figures(reports, [outage]),
        "max_get_ms_in_outage": round(max(in_outage), 1),
        "fallback_exchanges": fallbacks(reports),
    }
    bound = outage_bound(fleet.started_at, ended, [outage])
    check_common("redis-blackholed", reports, fake_k2, verdict, figures, leaks, bound)
    assert not verdict.errors, verdict.errors[:10]
    check_outage_logs(reports, [outage])


# The holder scenarios use 10 s tokens refreshed 5 s early: the holder is hit as the refresh
# starts, and the survivor's takeover (a lease and one refresh-retry pause later) still finds
# the old token usable, so no caller has to wait for it.
HOLDER_LIFETIME = 10
HOLDER_REFRESH_AHEAD = 5.0
SURVIVOR_STALL = 0.6  # the survivor's exchange is held this long inside K2 (stopped holder)
TAKEOVER_SLACK = 0.5


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_lock_holder_killed_or_frozen_mid_exchange(
    fault: str, redis_server: EmbeddedRedis, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    """The worker holding the refresh lock dies (SIGKILL) or freezes (SIGSTOP) inside K2.

    A survivor must take the lock over once the lease ends and publish its token with a newer
    fencing number. The frozen holder, continued while the survivor still holds the lock and
    with its own K2 reply waiting in its socket, must neither delete the survivor's lock nor
    overwrite the survivor's token, nor set a hold-off: Redis's keyspace notifications show
    who wrote and deleted what, in order.
    """
    fake_k2.expires_in = HOLDER_LIFETIME
    kwargs = fleet_kwargs(
        redis_server.url,
        fake_k2.base_url,
        refresh_ahead=HOLDER_REFRESH_AHEAD,
        max_attempts=2,
        read_timeout=1.5,
    )
    keys = keys_of(kwargs)
    stopped = fault == "sigstop"
    continued_at = math.inf
    with (
        ChannelMonitor(redis_server.url, keys, keyspace=True) as monitor,
        run_fleet(kwargs, fake_k2) as fleet,
    ):
        assert fleet.wait_calls(300, 30)
        fake_k2.pause_tokens()
        try:
            before = fake_k2.token_requests
            # The rollover's lock holder is inside K2 now.
            assert fake_k2.wait_for_token_requests(before + 1, timeout=HOLDER_LIFETIME + 5)
            owner = redis_client.get(keys.lock)
            assert owner is not None
            holder = fleet.index_of(owner_pid(owner))
            holder_pid = fleet.pids[holder]
            holder_fence = int(redis_client.get(keys.fence) or 0)
            if stopped:
                fake_k2.inject(Fault.slow(SURVIVOR_STALL))  # for the survivor's request
            fleet.signal(holder, signal.SIGSTOP if stopped else signal.SIGKILL)
            hit_at = time.monotonic()
            lease_left = redis_client.pttl(keys.lock) / 1000
            assert fake_k2.wait_for_token_requests(before + 2, timeout=LEASE + 10)
            takeover = time.monotonic() - hit_at
            new_owner = redis_client.get(keys.lock)
            assert new_owner is not None and new_owner != owner
            survivor = fleet.index_of(owner_pid(new_owner))
            survivor_fence = int(redis_client.get(keys.fence) or 0)
            assert survivor_fence > holder_fence
            unread = unread_bytes_from(holder_pid, fake_k2.port) if stopped else 0
        finally:
            fake_k2.resume_tokens()
        if stopped:
            # Continue the holder only once its K2 reply sits in its socket: past its read
            # deadline, that is what makes it go on and try to publish a stale token.
            assert fleet.wait_until(
                lambda: unread_bytes_from(holder_pid, fake_k2.port) > unread, 5
            ), "the stopped holder's K2 reply never reached its socket"
            fleet.signal(holder, signal.SIGCONT)
            continued_at = time.monotonic()
        published = monitor.wait_for(monitor.token_after(hit_at), timeout=10)
        assert published is not None, "nobody published a token after the takeover"
        stored = codec.decode(as_bytes(redis_client.get(keys.token) or b""))
        shared_fingerprint, shared_fence = fingerprint_of(stored.value), stored.fence
        lock_after = redis_client.get(keys.lock)
        holdoff_after = redis_client.get(keys.backoff)
        assert fleet.wait_calls(500, 20, among=set(range(PROCESSES)) - fleet.killed)
        reports = fleet.stop()
    by_index = {r.index: r for r in reports}
    leaks = redis_leaks(redis_server.url, keys, [r.token for r in fake_k2.issued])
    verdict = judge(reports, fake_k2)
    figures = {
        "holder_fault": fault,
        "lease_left_s": round(lease_left, 2),
        "takeover_s": round(takeover, 2),
        "takeover_after_lease_s": round(takeover - lease_left, 2),
        "published_after_hit_s": round(published.at - hit_at, 2),
        "lock_takeovers": sum(int(r.stats.get("lock_takeover", 0)) for r in reports),
    }
    # Every attempt: the first ones, the holder's (lost or stale), the survivor's, and one per
    # refresh period of the run for the rollovers around them.
    bound = 2 + math.ceil(
        (time.monotonic() - fleet.started_at) / (HOLDER_LIFETIME - HOLDER_REFRESH_AHEAD)
    )
    check_common(f"lock-holder-{fault}", reports, fake_k2, verdict, figures, leaks, bound)
    assert not verdict.errors, verdict.errors[:10]

    # The shared token is the survivor's, written under its (newer) fencing number.
    assert published.fence == survivor_fence == shared_fence
    assert shared_fingerprint == published.fingerprint
    assert shared_fingerprint in exchanged_fingerprints(by_index[survivor])
    assert holdoff_after is None
    if stopped:
        check_resumed_holder(by_index[holder], shared_fingerprint, continued_at, monitor, keys)
        assert lock_after != owner
    else:
        assert holder not in by_index
    # Last, so that every other check above has run: the takeover came once the holder's lease
    # was over (never before) and promptly, as the README promises: "a waiter woken by the lease
    # end, not a poll, takes over". TAKEOVER_SLACK covers scheduling and the exchange's start.
    assert takeover >= lease_left - OBSERVATION_SLACK, figures
    assert takeover <= lease_left + TAKEOVER_SLACK, (
        f"the survivor took over {takeover - lease_left:.2f} s after the lease ended "
        f"(lease left at the {fault}: {lease_left:.2f} s, takeover {takeover:.2f} s); "
        f"a background refresh that waited out the lease pauses "
        f"{(HOLDER_REFRESH_AHEAD - 0.5) / 4:.3f} s (Windows.retry_interval) before trying the lock"
    )


def check_resumed_holder(
    holder_report: WorkerReport,
    shared_fingerprint: str,
    continued_at: float,
    monitor: ChannelMonitor,
    keys: Keys,
) -> None:
    """The stopped holder, continued with its own K2 reply in its socket while the survivor held
    the lock: it finished its exchange, tried to publish, and Redis shows it changed nothing."""
    holder_tokens = exchanged_fingerprints(holder_report)
    assert holder_tokens and shared_fingerprint not in holder_tokens, (
        "the stopped holder did not finish its own exchange after SIGCONT"
    )
    stale_publish = [
        line.at
        for line in holder_report.logs
        if "a newer lock holder exists" in line.message and line.at >= continued_at
    ]
    assert stale_publish, (
        "the resumed holder never tried to publish its stale token; it logged: "
        f"{[line.message for line in holder_report.logs if line.at >= continued_at][:10]}"
    )
    # Redis's own account, from SIGCONT on: the first token write is the survivor's, and the
    # lock was neither deleted nor expired before it (the holder's publish touched neither).
    after = [h for h in monitor.heard if h.at >= continued_at and h.key != "channel"]
    first_write = next(i for i, h in enumerate(after) if h.key == keys.token and h.kind == "set")
    assert stale_publish[0] < after[first_write].at, (
        "the holder published after the survivor: the lock check proves nothing"
    )
    touched = [(h.key, h.kind) for h in after[:first_write]]
    assert touched == [], f"before the survivor's write, Redis saw {touched}"


# The auth-fault scenario: 10 s tokens refreshed 5 s early leave a 4.5 s window in which the
# refresh may fail while callers keep the current token; two failed rounds and a success fit.
FAULT_LIFETIME = 10
FAULT_ATTEMPTS = 2  # the per-holder retry budget (max_attempts)
RETRY_AFTER = 2  # seconds, on the 429
BACKOFF, BACKOFF_MAX = 0.25, 2.0  # failure_backoff, failure_backoff_max


@pytest.mark.timeout(120)
def test_auth_server_faults_while_a_token_is_alive(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    """K2 answers 503, then 429 with Retry-After, then garbage, then nothing in time; then it
    stays down until the token is gone, and comes back.

    Rollovers 1 and 2 each meet two failed refresh rounds before a success, with bodies that
    echo the client secret (an error description, a proxy page) to prove messages never quote
    them: callers must see no error at all, since the current token is alive throughout. Then
    K2 fails every request until callers do get errors (the token expired: nothing valid is
    left to hand out, which makes the "no error while a valid token existed" check bite), and
    the test brings K2 back: the fleet must recover by itself.

    Throughout, fleet-wide: a round costs at most one holder's retry budget (never one per
    worker), nobody asks K2 before the announced hold-off ends, hold-offs double per failure in
    a row up to the cap, and the 429's Retry-After holds the whole fleet off that long.
    """
    fake_k2.expires_in = FAULT_LIFETIME
    kwargs = fleet_kwargs(
        redis_server.url,
        fake_k2.base_url,
        refresh_ahead=FAULT_LIFETIME / 2,
        max_attempts=FAULT_ATTEMPTS,
        connect_timeout=0.3,
        read_timeout=0.3,
        failure_backoff=BACKOFF,
        failure_backoff_max=BACKOFF_MAX,
    )
    keys = keys_of(kwargs)
    echo = {"error": "server_error", "error_description": f"bad client_secret={CLIENT_SECRET}"}
    page = f"<html><body>Bad gateway; upstream said client_secret={CLIENT_SECRET}</body></html>"
    # Per rollover: the faults, and the hold-off to wait for (Redis is scanned while it is set).
    first = [Fault.status(503, echo), Fault.status(503, echo)]
    first.append(Fault.status(429, retry_after=RETRY_AFTER))
    second = [Fault.garbage(page), Fault.garbage(page), Fault.slow(1.0), Fault.slow(1.0)]
    rollovers = [(first, RETRY_AFTER * 1000), (second, 1)]
    leaks: list[str] = []
    with (
        RequestClock(fake_k2) as clock,
        ChannelMonitor(redis_server.url, keys) as monitor,
        run_fleet(kwargs, fake_k2) as fleet,
    ):
        assert fleet.wait_calls(300, 30)
        for faults, holdoff_ms in rollovers:
            since = time.monotonic()
            fake_k2.inject(*faults)
            failed = monitor.wait_for(monitor.failure_after(since, holdoff_ms), 15)
            assert failed is not None, "the refresh never failed"
            # A hold-off is in Redis now: it must not carry anything secret either.
            holding_off = redis_client.exists(keys.backoff)
            leaks += redis_leaks(redis_server.url, keys, [r.token for r in fake_k2.issued])
            assert holding_off or holdoff_ms < 1000, "the 429's hold-off is not in Redis"
            done = monitor.wait_for(monitor.token_after(since), 15)
            assert done is not None, "no token after the faults"
            assert fake_k2.pending_faults == 0
        down_at = time.monotonic()
        fake_k2.inject(*[Fault.status(503, echo)] * 1000)  # more than the run can consume
        errors = fleet.count(ERRORS)
        assert fleet.wait_until(lambda: fleet.count(ERRORS) > errors, FAULT_LIFETIME + 10), (
            "callers never saw an error although K2 was down past the token's expiry"
        )
        leaks += redis_leaks(redis_server.url, keys, [r.token for r in fake_k2.issued])
        fake_k2.clear_faults()
        up_at = time.monotonic()
        recovered = monitor.wait_for(monitor.token_after(up_at), 15)
        assert recovered is not None, "the fleet did not recover once K2 answered again"
        assert fleet.wait_calls(300, 20)
        reports = fleet.stop()
    leaks += redis_leaks(redis_server.url, keys, [r.token for r in fake_k2.issued])
    verdict = judge(reports, fake_k2)
    heard = monitor.announcements()
    rounds = rounds_of(clock.times, heard)
    failures = [(h.code, h.holdoff_ms) for h in heard if h.kind == "E"]
    attempts = exchange_attempts(reports)
    gaps = holdoff_gaps(clock.times, heard)
    lives = token_lives(fake_k2, revoke_previous=False)
    written = [h for h in heard if h.kind == "T"]
    errors_at = [c.ended for r in reports for c in r.calls if c.outcome != "ok"]
    figures = {
        "rounds": [n for n, _ in rounds],
        "failures": failures,
        "refresh_failed": sum(int(r.stats.get("refresh_failed", 0)) for r in reports),
        "max_attempts_per_exchange": max(len(a) for a in attempts),
        "old_token_left_at_rollover_s": [
            round(lives[old.fingerprint].expires_at - new.at, 2)
            for old, new in itertools.pairwise(written[:3])
        ],
        "gap_after_429_s": next((round(g, 2) for h, g in gaps if h >= RETRY_AFTER), None),
        "k2_down_s": round(up_at - down_at, 2),
        "first_error_after_expiry_s": round(
            min(errors_at) - lives[written[-2].fingerprint].expires_at, 3
        ),
        "recovery_after_k2_returns_s": round(recovered.at - up_at, 2),
        "last_error_after_k2_returns_s": round(max(errors_at) - up_at, 2),
    }
    # Every successful exchange (the cold one, two rollovers and the recovery) took one attempt;
    # every failed round, at most the retry budget.
    bound = 4 + FAULT_ATTEMPTS * len(failures)
    check_common("auth-server-faults", reports, fake_k2, verdict, figures, leaks, bound)
    assert verdict.errors, "the down phase produced no caller error: the check proves nothing"

    codes = [code for code, _ in failures]
    assert codes[:4] == ["unavailable", "unavailable", "invalid_response", "unavailable"]
    assert set(codes[4:]) == {"unavailable"}, failures
    # Hold-offs: failure_backoff doubling per failure in a row (a token ends the streak) up to
    # failure_backoff_max, and never shorter than the 429's Retry-After.
    doubling = [int(min(BACKOFF_MAX, BACKOFF * 2**i) * 1000) for i in range(len(failures))]
    expected = [doubling[0], RETRY_AFTER * 1000, *doubling[:2], *doubling[: len(failures) - 4]]
    assert [ms for _, ms in failures] == expected, failures
    # Fleet-wide, a round (up to its announcement) never costs more than one holder's budget,
    # and nobody asks K2 before the hold-off it announced has run out.
    assert all(n <= FAULT_ATTEMPTS for n, _ in rounds), rounds
    assert all(len(a) <= FAULT_ATTEMPTS for a in attempts), attempts
    assert sum(len(a) for a in attempts) == fake_k2.token_requests, attempts
    for holdoff, gap in gaps:
        assert gap >= holdoff - OBSERVATION_SLACK, (holdoff, gap, gaps)


def rounds_of(arrivals: list[float], heard: list[Heard]) -> list[tuple[int, str]]:
    """Token requests per round; a round ends with its announcement (a token, or a failure).
    An arrival observed just after its round's announcement (both are seen by threads of this
    process) still counts for that round: the next round starts a hold-off later at the soonest.
    """
    rounds: list[tuple[int, str]] = []
    previous = -math.inf
    for h in sorted(heard, key=lambda h: h.at):
        n = sum(1 for t in arrivals if previous < t <= h.at + OBSERVATION_SLACK)
        rounds.append((n, h.kind))
        previous = h.at + OBSERVATION_SLACK
    return rounds


def holdoff_gaps(arrivals: list[float], heard: list[Heard]) -> list[tuple[float, float]]:
    """For each failure announcement: (the hold-off it set, the time until the next request)."""
    gaps: list[tuple[float, float]] = []
    for h in heard:
        if h.kind != "E":
            continue
        later = [t for t in arrivals if t > h.at + OBSERVATION_SLACK]
        gaps.append((h.holdoff_ms / 1000, (later[0] - h.at) if later else math.inf))
    return gaps


def exchange_attempts(reports: list[WorkerReport]) -> list[list[float]]:
    """Every exchange made in the fleet, as the times of its attempts, from the workers' own
    per-attempt log lines (attempt numbers restart at 1 with each exchange)."""
    pattern = re.compile(r"token exchange attempt (\d+)")
    exchanges: list[list[float]] = []
    for report in reports:
        current: list[float] | None = None
        for line in sorted(report.logs, key=lambda line: line.at):
            match = pattern.search(line.message)
            if line.logger != "k2_shared_token.exchange" or match is None:
                continue
            if int(match.group(1)) == 1 or current is None:
                current = []
                exchanges.append(current)
            current.append(line.at)
    return exchanges


ROLLOVERS = 6


@pytest.mark.timeout(90)
def test_revoke_previous_across_many_rollovers(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    """K2 revokes the previous token whenever it issues one; 4 s tokens, so a rollover every
    ~2 s. Workers still holding the old token get a 401 from the API; ``auth()`` must recover
    each with its one retry (never a final 401), and the fleet must not turn those 401s into
    extra exchanges: the compare-and-delete leaves the new token alone.

    The token is also encrypted at rest here, so the Redis scan must find no token in clear
    anywhere, not even under the token key, and the encryption key is one more secret to scan
    the workers' logs, tracebacks and reprs for.
    """
    fake_k2.expires_in = LIFETIME
    fake_k2.token_mode = "revoke_previous"
    encryption_key = crypto.new_key()
    kwargs = fleet_kwargs(redis_server.url, fake_k2.base_url, encryption_keys=[encryption_key])
    keys = keys_of(kwargs)
    with run_fleet(kwargs, fake_k2, api_every=3) as fleet:
        assert fake_k2.wait_for_token_requests(ROLLOVERS + 1, timeout=PERIOD * ROLLOVERS + 15)
        assert fleet.wait_calls(300, 20)
        reports = fleet.stop()
        ran = time.monotonic() - fleet.started_at
    tokens = [r.token for r in fake_k2.issued]
    leaks = redis_leaks(redis_server.url, keys, tokens, encrypted=True)
    verdict = judge(reports, fake_k2, revoke_previous=True)
    issued = [r.issued_at for r in fake_k2.issued]
    gaps = [b - a for a, b in itertools.pairwise(issued)]
    figures = {
        "run_s": round(ran, 1),
        "rollovers": len(issued) - 1,
        "min_gap_s": round(min(gaps), 2),
        "revoked_handed_out": verdict.revoked_handed_out,
        "api_unauthorized": fake_k2.api_unauthorized,
    }
    # One exchange to start, then at most one per refresh period: a token is not refreshed
    # before lifetime - refresh_ahead has passed since it was asked for, whatever the 401s do.
    bound = 1 + math.floor(ran / (PERIOD - 0.1))
    secret = {"the encryption key": encryption_key}
    check_common("revoke-previous", reports, fake_k2, verdict, figures, leaks, bound, secret)
    assert not verdict.errors, verdict.errors[:10]
    assert len(issued) - 1 >= ROLLOVERS
    assert min(gaps) >= PERIOD - 0.1, gaps
    assert verdict.api_retried <= fake_k2.api_unauthorized
