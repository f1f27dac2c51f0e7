"""Shared plumbing for every section: results, tables, verdicts, statistics and child processes.

Kept free of matplotlib and of the contenders' libraries: spawned workers import this module,
and on a 2-core machine every import in 64 children is seconds of start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"

# Spawn, not fork: a clean interpreter per worker, like separate pods, with none of the
# coordinator's threads (fake server, Redis log drain) or sockets inherited.
CTX: SpawnContext = multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------- results


@dataclass
class Verdict:
    """One target and whether this run met it, with the figure that decided it."""

    target: str
    met: bool
    figure: str

    def line(self, section: str) -> str:
        outcome = "met" if self.met else "MISSED"
        return f"VERDICT [{section}] {self.target}: {outcome} ({self.figure})"


@dataclass
class SectionResult:
    """What a section hands back to the runner: markdown, verdicts and the files it wrote."""

    name: str
    title: str
    markdown: str
    verdicts: list[Verdict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def verdict_lines(self) -> list[str]:
        return [v.line(self.name) for v in self.verdicts]

    def document(self, provenance: str) -> str:
        """The section's own .md file: where it came from, body, then the verdicts."""
        verdicts = "\n".join(f"- {v.line(self.name)}" for v in self.verdicts)
        return (
            f"# {self.title}\n\n{provenance}\n\n{self.markdown.rstrip()}\n\n"
            f"## Verdicts\n\n{verdicts}\n"
        )


@dataclass(frozen=True)
class RunConfig:
    """Options every section sees."""

    quick: bool
    out_dir: Path


def load_average() -> str:
    """The 1/5/15-minute load averages: on a shared 2-core machine, the context of every
    number in the run (other processes' CPU shows up as our latency)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def run_standalone(
    name: str,
    run: Callable[[RunConfig, argparse.Namespace], SectionResult],
    argv: list[str] | None = None,
    *,
    quick_help: str = "a shorter run",
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """A section's standalone entry, ``python -m benchmarks.<name> [--quick] ...``: parse the
    arguments (``--quick`` and whatever ``add_arguments`` adds), run the section alone and
    write it to ``benchmarks/results/<name>.md`` with its provenance; the index, README.md,
    is left to ``python -m benchmarks``. ``run`` gets the config and the parsed arguments."""
    prog = f"python -m benchmarks.{name}"
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    load_at_start = load_average()
    result = run(RunConfig(quick=args.quick, out_dir=RESULTS_DIR), args)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    shown = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    provenance = (
        f"Written {stamp} by `{shown}` (this section alone); machine: [README.md](README.md); "
        f"load average 1/5/15 min at start {load_at_start}, at end {load_average()} (the "
        "machine is shared: other processes' CPU shows up in every figure here)."
    )
    (RESULTS_DIR / f"{name}.md").write_text(result.document(provenance))
    print(result.markdown)
    print("\n".join(result.verdict_lines()))
    return 0


# --------------------------------------------------------------------------- formatting


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` holds one of l/r per column (default: first l)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


def fmt_ms(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.{digits}f}"


def fmt_us(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1e6:.{digits}f}"


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values; NaN for none.

    Nearest rank, not interpolation: p99 of 256 stampede callers must be a latency one of
    them actually saw.
    """
    if not sorted_values:
        return math.nan
    rank = min(len(sorted_values), max(1, math.ceil(q * len(sorted_values))))
    return sorted_values[rank - 1]


class LogHistogram:
    """Latencies in buckets 2 % wide, so a worker sends a few hundred counts, not every sample.

    Histograms from many processes merge exactly (counts add), which per-process percentiles
    cannot; a percentile read back is the upper edge of its bucket (at most 2 % high), and the
    maximum is kept exactly.
    """

    GROWTH = 1.02
    FLOOR = 50e-9  # 50 ns: below anything a Python call can take
    THRESHOLDS = (1e-3, 5e-3)  # exact counts above these, for the verdicts

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.max = 0.0
        self.over = [0] * len(self.THRESHOLDS)
        self._log_growth = math.log(self.GROWTH)

    def add(self, seconds: float) -> None:
        if seconds <= self.FLOOR:
            index = 0
        else:
            index = int(math.log(seconds / self.FLOOR) / self._log_growth)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.n += 1
        if seconds > self.max:
            self.max = seconds
        for i, threshold in enumerate(self.THRESHOLDS):
            if seconds > threshold:
                self.over[i] += 1

    def merge(self, other: LogHistogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.n += other.n
        self.max = max(self.max, other.max)
        self.over = [a + b for a, b in zip(self.over, other.over, strict=True)]

    def percentile(self, q: float) -> float:
        if self.n == 0:
            return math.nan
        rank = min(self.n, max(1, math.ceil(q * self.n)))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(self.max, self.FLOOR * self.GROWTH ** (index + 1))
        return self.max  # pragma: no cover - ranks never exceed n

    def count_over(self, threshold: float) -> int:
        """Exact number of samples above one of :attr:`THRESHOLDS`."""
        return self.over[self.THRESHOLDS.index(threshold)]

    def __getstate__(self) -> dict[str, Any]:
        return {"counts": self.counts, "n": self.n, "max": self.max, "over": self.over}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.counts, self.n, self.max = state["counts"], state["n"], state["max"]
        self.over = state["over"]
        self._log_growth = math.log(self.GROWTH)


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def spawned(
    target: Callable[..., None], args_for: Iterable[tuple[Any, ...]], grace: float = 10.0
) -> Iterator[list[SpawnProcess]]:
    """Start one spawned process per argument tuple; on exit, none of them outlives the block.

    Each is joined for ``grace`` seconds in total, then terminated, then killed: only these
    processes, by their own handles, never anything matched by name.
    """
    procs = [CTX.Process(target=target, args=args, daemon=True) for args in args_for]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        deadline = time.monotonic() + grace
        for proc in procs:
            if proc.pid is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            if proc.pid is not None:
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)


START_MARGIN = 0.030  # s before the common start instant, plus START_PER_PARTY per thread
START_PER_PARTY = 0.0005


def start_round(
    barrier: Any,
    go: Any,
    parties: int,
    timeout: float,
    prepare: Callable[[], object] | None = None,
) -> float:
    """Coordinator side of the two-phase start; returns the common start instant.

    Phase one: every thread is ready (clients built). Then ``prepare`` runs (e.g. warming the
    cache just before the load, so a short-lived token is fresh when it starts), the start
    instant is written, far enough ahead that phase two (which wakes parties one after
    another; measured well under 0.5 ms per party here) has let every thread through before
    it, and phase two hands it over. Threads then sleep until that instant, so they begin
    together instead of in the barrier's wake-up order. ``time.monotonic`` is one clock for
    all processes on Linux, so the instant means the same everywhere.
    """
    barrier.wait(timeout)
    if prepare is not None:
        prepare()
    go.value = start = time.monotonic() + START_MARGIN + START_PER_PARTY * parties
    barrier.wait(timeout)
    return start


def wait_for_start(barrier: Any, go: Any, timeout: float) -> float | None:
    """Worker side of :func:`start_round`: the instant this thread started, or None if the
    coordinator broke the barrier (it gave up; the worker should leave)."""
    try:
        barrier.wait(timeout)
        barrier.wait(timeout)
    except threading.BrokenBarrierError:
        return None
    pause = go.value - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    return time.monotonic()


def collect(queue: Any, expected: int, timeout: float, alive: Callable[[], bool]) -> list[Any]:
    """Up to ``expected`` messages from ``queue`` within ``timeout``; stops early if the
    workers are gone, so a crashed fleet costs seconds, not the whole budget."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < expected:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            out.append(queue.get(timeout=min(left, 1.0)))
        except Exception:  # queue.Empty; multiprocessing re-exports it from queue
            if not alive():
                break
    return out


def unique_prefix(label: str) -> str:
    """A key prefix nobody used before on this Redis: every measurement starts cold."""
    return f"bench-{label}-{os.getpid()}-{time.monotonic_ns()}"


# --------------------------------------------------------------------------- redis


def command_stats(client: Any) -> dict[str, int]:
    """``calls`` per command from ``INFO commandstats`` (one INFO command)."""
    info = client.info("commandstats")
    out: dict[str, int] = {}
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            calls = value["calls"] if isinstance(value, dict) else int(str(value).split("=")[1])
            out[key.removeprefix("cmdstat_")] = int(calls)
    return out


def stats_delta(
    before: dict[str, int], after: dict[str, int], own_info_calls: int
) -> dict[str, int]:
    """Commands run between two snapshots, minus the INFO calls the benchmark made itself."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    delta["info"] = delta.get("info", 0) - own_info_calls
    return {k: v for k, v in delta.items() if v}
