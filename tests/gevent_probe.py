"""Run by tests/test_deploy_fleets.py in a child process: the blocking provider under gevent's
monkey-patching, as a gunicorn ``-k gevent`` worker runs it, watched from inside.

``python -m tests.gevent_probe CALLERS`` with the ``K2_*`` environment of the fleet tests.
``CALLERS`` greenlets ask a cold provider for a token at once (the fake K2 answers slowly), then,
once the token is in its refresh-ahead window, one more call kicks the background refresh. The
OS thread count (/proc/self/task) is sampled by a greenlet all along. Prints one JSON line.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402 - after patching, as in a gevent worker
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from k2_shared_token import SharedTokenProvider  # noqa: E402


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main(callers: int) -> None:
    before = os_threads()
    peak = before
    sampling = True

    def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, os_threads())
            gevent.sleep(0.005)

    sampler = gevent.spawn(sample)
    with SharedTokenProvider.from_env() as provider:
        started = time.monotonic()
        cold = [gevent.spawn(provider.get) for _ in range(callers)]
        gevent.joinall(cold, timeout=20, raise_error=True)
        cold_seconds = time.monotonic() - started
        tokens = {g.value.value for g in cold}
        first = cold[0].value
        # Into the refresh-ahead window (min_validity < left <= refresh_ahead): a caller gets
        # the held token at once and kicks the background refresher.
        gevent.sleep(max(0.0, first.seconds_left() - provider.settings.refresh_ahead + 0.2))
        kicked = provider.get()
        deadline = time.monotonic() + 10
        while provider.stats().get("exchange_ok", 0) < 2 and time.monotonic() < deadline:
            gevent.sleep(0.01)
        refreshed = provider.get()
        stats = provider.stats()
    sampling = False
    sampler.join(1)
    print(
        json.dumps(
            {
                "callers": callers,
                "distinct_tokens": len(tokens),
                "cold_seconds": round(cold_seconds, 3),
                "kicked_got_held": kicked.value == first.value,
                "refreshed_new": refreshed.value != first.value,
                "exchange_ok": stats.get("exchange_ok", 0),
                "threads_before": before,
                "threads_peak": peak,
                "patched": monkey.is_module_patched("threading"),
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
