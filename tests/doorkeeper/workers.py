"""Worker processes for the Doorkeeper fleet tests: importable, so 'spawn' children run them.

A worker calls ``/api/ping`` through ``provider.auth()`` in a loop and reports, at the end, what
it saw: never a token, only its fingerprint (``fingerprint_of``, as the library logs it), with
wall-clock times (``time.time()``: the same clock as the Doorkeeper app's ``/__issued``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from k2_shared_token import SharedTokenProvider
from k2_shared_token._core.tokens import fingerprint_of

# What a malformed-reply warning says (k2_shared_token._k2.wire, and any future wording).
MALFORMED_TEXTS = ("invalid token reply", "malformed")
_MAX_FAILURES = 200
_MAX_MESSAGES = 40
_MAX_ERRORS = 500


class _WarningTally(logging.Handler):
    """Counts the library's WARNING+ records: those that call a reply malformed, and each
    distinct message (a few kept, for the test's output)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.malformed = 0
        self.total = 0
        self.messages: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad record must not kill the worker
            text = str(record.msg)
        self.total += 1
        if any(fragment in text for fragment in MALFORMED_TEXTS):
            self.malformed += 1
        if text in self.messages or len(self.messages) < _MAX_MESSAGES:
            self.messages[text] = self.messages.get(text, 0) + 1


def _fingerprint(header: object, cache: dict[str, str]) -> str:
    """The fingerprint of the bearer token in an Authorization header ('' for none)."""
    token = str(header or "").partition(" ")[2]
    if not token:
        return ""
    fp = cache.get(token)
    if fp is None:
        cache.clear()  # a handful of tokens per run: keep only the latest
        fp = cache[token] = fingerprint_of(token)
    return fp


class _SendLog(HTTPAdapter):
    """The session's adapter, which notes each request as it goes out (a retry by ``auth()``
    too: it is sent through ``response.connection``, this adapter): per token fingerprint,
    ``[first sent, last sent, requests, start of the last call that sent it]``."""

    def __init__(self, cache: dict[str, str]) -> None:
        super().__init__()
        self.cache = cache
        self.call_began = 0.0  # set by the worker before each call
        self.sent: dict[str, list[Any]] = {}

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        now = time.time()
        fp = _fingerprint(request.headers.get("Authorization"), self.cache)
        seen = self.sent.get(fp)
        if seen is None:
            self.sent[fp] = [now, now, 1, self.call_began]
        else:
            seen[1], seen[3] = now, self.call_began
            seen[2] += 1
        return super().send(request, *args, **kwargs)


def ping_worker(
    kwargs: dict[str, Any],
    url: str,
    barrier: Any,
    stop: Any,
    results: Any,
    warm: Any,
    pause: float,
    delay: float = 0.0,
) -> None:
    """Call ``url`` through ``provider.auth()`` from the barrier (plus ``delay`` seconds) until
    ``stop`` is set, release ``warm`` (a semaphore) once a call has ended 200 with the fleet
    backplane listening (so an announcement from now on reaches this process), and put one
    report on ``results``:

    - ``calls``, ``failures`` (calls that did not end in a 200, with why), ``retried_401``
      (first answers that were 401s, which ``auth()`` retried once);
    - ``runs``: consecutive calls that ended 200 with the same token, as ``[fingerprint, first
      start, last end, calls]`` (enough to tell which token a process used when);
    - ``retried``: ``[start, failed fingerprint, final fingerprint, final status]`` per retried
      call; ``ended_401``: ``[start, fingerprint]`` per call whose final answer was a 401;
    - ``sent``: per fingerprint, every request that carried it (retries too), as ``[first
      sent, last sent, requests, start of the last call that sent it]`` (``_SendLog``);
    - ``errors``: the exceptions (the first few hundred), with their type, OAuth ``error`` and
      ``retry_after``; ``error_summary``: per ``type/error``, their count and longest
      ``retry_after``;
    - ``malformed`` and ``warnings``: the library's WARNING+ log records (see ``_WarningTally``);
    - ``stats``: the provider's counters; ``started``/``ended``: this worker's load phase.
    """
    tally = _WarningTally()
    logger = logging.getLogger("k2_shared_token")
    logger.addHandler(tally)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    provider = SharedTokenProvider(**kwargs)
    session = requests.Session()
    session.auth = provider.auth()
    cache: dict[str, str] = {}
    send_log = _SendLog(cache)
    session.mount("http://", send_log)
    calls = retried = 0
    failures: list[str] = []
    runs: list[list[Any]] = []
    retried_calls: list[list[Any]] = []
    ended_401: list[list[Any]] = []
    errors: list[dict[str, Any]] = []
    error_summary: dict[str, list[Any]] = {}  # "type/error" -> [count, longest retry_after]
    warmed, listening = False, not provider.settings.backplane
    barrier.wait(60)
    if delay > 0:
        stop.wait(delay)  # a staggered start: this process begins its load later
    started = time.time()
    while not stop.is_set():
        calls += 1
        began = send_log.call_began = time.time()
        try:
            reply = session.get(url, timeout=10)
        except Exception as exc:  # reported to the test, which decides
            if len(failures) < _MAX_FAILURES:
                failures.append(f"{type(exc).__name__}: {exc}")
            code, after = getattr(exc, "error", None), getattr(exc, "retry_after", None)
            seen = error_summary.setdefault(f"{type(exc).__name__}/{code}", [0, None])
            seen[0] += 1
            if isinstance(after, (int, float)) and (seen[1] is None or after > seen[1]):
                seen[1] = after
            if len(errors) < _MAX_ERRORS:
                errors.append(
                    {
                        "at": began,
                        "type": type(exc).__name__,
                        "error": code,
                        "retry_after": after,
                        "message": str(exc)[:200],
                    }
                )
        else:
            ended = time.time()
            status = reply.status_code
            fp = _fingerprint(reply.request.headers.get("Authorization"), cache)
            if reply.history:
                retried += len(reply.history)
                first = _fingerprint(reply.history[0].request.headers.get("Authorization"), cache)
                retried_calls.append([began, first, fp, status])
            if status == 200:
                if not warmed and (listening or provider.stats()["backplane"]):
                    warm.release()
                    warmed = True
                if runs and runs[-1][0] == fp:
                    runs[-1][2] = ended
                    runs[-1][3] += 1
                else:
                    runs.append([fp, began, ended, 1])
            else:
                if len(failures) < _MAX_FAILURES:
                    failures.append(f"HTTP {status}: {reply.text[:200]}")
                if status == 401:
                    ended_401.append([began, fp])
        if pause and stop.wait(pause):  # the load's pace; a stop ends it at once
            break
    ended_at = time.time()
    session.close()
    stats = provider.stats()
    provider.close()
    logger.removeHandler(tally)
    results.put(
        {
            "calls": calls,
            "failures": failures,
            "failed": calls - sum(r[3] for r in runs),
            "retried_401": retried,
            "tokens": len({r[0] for r in runs}),
            "runs": runs,
            "retried": retried_calls,
            "ended_401": ended_401,
            "sent": send_log.sent,
            "errors": errors,
            "error_summary": error_summary,
            "malformed": tally.malformed,
            "warning_records": tally.total,
            "warnings": tally.messages,
            "stats": stats,
            "started": started,
            "ended": ended_at,
            "delay": delay,
        }
    )
