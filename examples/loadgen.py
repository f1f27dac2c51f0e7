"""Bounded load against the example web service: a fixed number of requests, then exit.

    python examples/loadgen.py --url http://web:8000/pay --requests 200 --concurrency 8

Prints how many requests succeeded and which worker pids answered (several gunicorn workers,
several containers with ``--scale web=3``, one shared token). Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    args = parser.parse_args(argv)

    def one(_: int) -> str:
        try:
            reply = requests.get(args.url, timeout=args.timeout)
        except requests.RequestException as exc:
            return f"error {type(exc).__name__}"
        return f"pid {reply.json().get('pid')}" if reply.status_code == 200 else "failed"

    started = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        outcomes = collections.Counter(pool.map(one, range(args.requests)))
    failed = sum(n for what, n in outcomes.items() if not what.startswith("pid"))
    print(f"{args.requests} requests in {time.monotonic() - started:.1f} s, {failed} failed")
    for what, n in sorted(outcomes.items()):
        print(f"  {what}: {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
