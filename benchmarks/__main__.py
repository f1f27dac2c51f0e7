"""``python -m benchmarks [--quick] [hot] [stampede] [rollover] [scaling] [namespaces] [tenants]``.

Runs the selected sections (all by default) one after another, each on its own embedded
redis-server and fake K2 server, prints their markdown tables and verdicts, and writes one .md
per section, PNG plots and an index with the machine's description to ``benchmarks/results/``.
Sections are imported only when selected, so a smoke run of one section stays fast.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, RunConfig, SectionResult, load_average

SECTIONS: dict[str, tuple[str, str]] = {
    "hot": ("bench_hot_path", "hot_path.md"),
    "stampede": ("stampede", "stampede.md"),
    "rollover": ("rollover", "rollover.md"),
    "scaling": ("scaling", "scaling.md"),
    "namespaces": ("namespaces", "namespaces.md"),
    "tenants": ("tenants", "tenants.md"),
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _redis_version() -> str:
    from k2_shared_token.testing.redis_server import find_redis_server  # noqa: PLC0415

    try:
        out = subprocess.run(
            [find_redis_server(), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or "unknown"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    names = ("k2-shared-token", "redis", "requests", "python-redis-lock", "dogpile.cache")
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def machine_info() -> list[tuple[str, str]]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", _cpu_model()),
        ("cores", f"{os.cpu_count()} (usable by this run: {affinity or os.cpu_count()})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("redis-server", _redis_version()),
        ("packages", _versions()),
        ("OS", platform.platform()),
    ]


def write_index(
    out_dir: Path,
    results: list[SectionResult],
    quick: bool,
    seconds: float,
    argv: list[str],
    loads: tuple[str, str],
) -> Path:
    lines = ["# Benchmark results", ""]
    lines.append(
        "Written by `python -m benchmarks` "
        f"(`{' '.join(['python -m benchmarks', *argv]).strip()}`); "
        f"{'QUICK smoke run: small fleets, short loads' if quick else 'full run'}, "
        f"{seconds:.0f} s wall time. What each section measures: `benchmarks/README.md`."
    )
    lines += ["", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine_info()]
    lines.append(f"| load average 1/5/15 min, at start | {loads[0]} |")
    lines.append(
        f"| load average 1/5/15 min, at end (includes this run's own workers) | {loads[1]} |"
    )
    lines += ["", "| section | file | time (s) | targets met |", "|---|---|---:|---:|"]
    for r in results:
        met = sum(v.met for v in r.verdicts)
        lines.append(
            f"| {r.title} | [{SECTIONS[r.name][1]}]({SECTIONS[r.name][1]}) | {r.seconds:.0f} | "
            f"{met}/{len(r.verdicts)} |"
        )
    ran = {r.name for r in results}
    older = [f for name, (_, f) in SECTIONS.items() if name not in ran and (out_dir / f).exists()]
    if older:
        links = ", ".join(f"[{f}]({f})" for f in older)
        lines += ["", f"Not run this time; left from an earlier run (see their dates): {links}."]
    if (out_dir / "stampede_profile.md").exists():
        lines += [
            "",
            "Supplementary: [stampede_profile.md](stampede_profile.md), where the library's "
            "time goes in a cold stampede (findings), from instrumented rounds written "
            "separately by `python -m benchmarks.profile_stampede` (see their own date and "
            "load): [stampede_profile_data.md](stampede_profile_data.md).",
        ]
    lines += ["", "## Verdicts", ""]
    lines += [f"- {line}" for r in results for line in r.verdict_lines()]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        help=f"any of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small fleets and short loads (< 60 s), a smoke run"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results directory (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    selected = list(dict.fromkeys(args.sections)) or list(SECTIONS)
    args.out.mkdir(parents=True, exist_ok=True)
    config = RunConfig(quick=args.quick, out_dir=args.out)
    started = time.monotonic()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    provenance = (
        f"Written {when} by `{' '.join(['python -m benchmarks', *argv])}` "
        f"({'QUICK smoke run' if args.quick else 'full run'}); machine: [README.md](README.md)."
    )
    load_at_start = load_average()
    print(f"load average at start: {load_at_start}", file=sys.stderr)
    results: list[SectionResult] = []
    for name in selected:
        module = importlib.import_module(f".{SECTIONS[name][0]}", __package__)
        print(f"\n## {name}: running...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        result: SectionResult = module.run(config)
        result.seconds = time.monotonic() - t0
        (args.out / SECTIONS[name][1]).write_text(result.document(provenance))
        results.append(result)
        print(f"\n# {result.title} ({result.seconds:.1f} s)\n")
        print(result.markdown.rstrip())
        print()
        for line in result.verdict_lines():
            print(line)
        sys.stdout.flush()
    total = time.monotonic() - started
    loads = (load_at_start, load_average())
    index = write_index(args.out, results, args.quick, total, argv, loads)
    print(f"\nTotal {total:.1f} s; results in {index.parent}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
