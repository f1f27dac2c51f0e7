"""Worker processes for the Doorkeeper fleet tests: importable, so 'spawn' children run them."""

from __future__ import annotations

import time
from typing import Any

import requests

from k2_shared_token import SharedTokenProvider


def ping_worker(
    kwargs: dict[str, Any],
    url: str,
    barrier: Any,
    stop: Any,
    results: Any,
    pause: float,
) -> None:
    """Call ``url`` through ``provider.auth()`` from the barrier until ``stop`` is set; report
    the calls made, the ones that did not end in a 200 (with why), and the 401s retried."""
    provider = SharedTokenProvider(**kwargs)
    session = requests.Session()
    session.auth = provider.auth()
    calls = retried = 0
    failures: list[str] = []
    tokens: set[str] = set()
    barrier.wait(60)
    while not stop.is_set():
        calls += 1
        try:
            reply = session.get(url, timeout=10)
        except Exception as exc:  # reported to the test, which fails on it
            failures.append(f"{type(exc).__name__}: {exc}")
        else:
            retried += len(reply.history)
            if reply.status_code != 200:
                failures.append(f"HTTP {reply.status_code}: {reply.text[:200]}")
            auth = reply.request.headers.get("Authorization", "")
            tokens.add(str(auth).partition(" ")[2])
        if pause:
            time.sleep(pause)
    session.close()
    provider.close()
    results.put(
        {
            "calls": calls,
            "failures": failures,
            "retried_401": retried,
            "tokens": len(tokens),
        }
    )
