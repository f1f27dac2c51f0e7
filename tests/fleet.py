"""Worker processes for the fleet tests: importable, so 'spawn' children can run them.

Children are started with the 'spawn' method: a clean interpreter per worker, like separate
pods, with nothing inherited from the test process's threads.
"""

from __future__ import annotations

import multiprocessing
import threading
from multiprocessing.context import SpawnContext
from typing import Any

from k2_shared_token import SharedTokenProvider

CTX: SpawnContext = multiprocessing.get_context("spawn")


def stampede_worker(kwargs: dict[str, Any], barrier: Any, results: Any, threads: int) -> None:
    """Build a provider, then let ``threads`` threads ask for a token at the barrier."""
    provider = SharedTokenProvider(**kwargs)
    outcomes: list[tuple[str, str]] = []

    def ask() -> None:
        barrier.wait(60)
        try:
            outcomes.append(("ok", provider.get_token()))
        except Exception as exc:  # reported to the test, which fails on it
            outcomes.append(("error", f"{type(exc).__name__}: {exc}"))

    workers = [threading.Thread(target=ask) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    provider.close()
    results.put(outcomes)


def holder_worker(kwargs: dict[str, Any]) -> None:
    """Ask for a token and never get to finish: the test kills this process mid-exchange."""
    SharedTokenProvider(**kwargs).get_token()
