"""Hot path: microseconds per get_token(), against baselines measured in the same run.

- L1 on: a warm worker answering from its per-process copy;
- L1 off: one Redis round trip per call (the read script);
- baseline "dict + monotonic": the floor for an in-process cache lookup;
- baseline "raw GET": one redis-py GET on the same Redis, the floor for a shared read.

Each figure is the median of several timed rounds. Runs on an embedded redis-server and the
fake K2 server; prints a markdown table and writes it to benchmarks/results/hot_path.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from k2_shared_token import SharedTokenProvider
from k2_shared_token.embedded_redis import EmbeddedRedis
from k2_shared_token.fake_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeK2Server

ROUNDS = 7


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> int:
    with EmbeddedRedis() as server, FakeK2Server() as k2:
        common = {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "base_url": k2.base_url,
            "redis": server.url,
        }
        warm = SharedTokenProvider(**common)
        cold = SharedTokenProvider(local_cache=False, **common)
        warm.get_token()
        raw = redis.Redis.from_url(server.url)
        raw.set("bench:key", b"x" * 200)
        table: dict[str, float] = {}
        cache = {"token": ("value", time.monotonic() + 3600)}

        def dict_lookup() -> str:
            value, until = cache["token"]
            if time.monotonic() < until:
                return value
            raise AssertionError

        table["dict + monotonic (baseline)"] = per_call_us(dict_lookup, 200_000)
        table["get_token(), L1 on"] = per_call_us(warm.get_token, 200_000)
        table["raw redis-py GET (baseline)"] = per_call_us(lambda: raw.get("bench:key"), 5_000)
        table["get_token(), L1 off"] = per_call_us(cold.get_token, 5_000)
        warm.close()
        cold.close()
        raw.close()
    floor_local = table["dict + monotonic (baseline)"]
    floor_redis = table["raw redis-py GET (baseline)"]
    lines = [
        "| what | µs per call | ratio to its baseline |",
        "|---|---:|---:|",
        f"| dict + monotonic (baseline) | {floor_local:.3f} | 1.00 |",
        f"| get_token(), L1 on | {table['get_token(), L1 on']:.3f} | "
        f"{table['get_token(), L1 on'] / floor_local:.2f} |",
        f"| raw redis-py GET (baseline) | {floor_redis:.1f} | 1.00 |",
        f"| get_token(), L1 off | {table['get_token(), L1 off']:.1f} | "
        f"{table['get_token(), L1 off'] / floor_redis:.2f} |",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "hot_path.md"
    out.write_text(f"Python {sys.version.split()[0]}, median of {ROUNDS} rounds\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
