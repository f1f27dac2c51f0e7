"""Benchmarks of k2_shared_token, run with ``python -m benchmarks`` (``make bench``).

Four sections, each selectable by name: ``hot`` (per-call cost), ``stampede`` (a cold fleet
asking at once, against four other ways of sharing a token), ``rollover`` (a fleet under load
while tokens are replaced) and ``scaling`` (Redis commands per call as the fleet grows). See
``benchmarks/README.md`` for what each one measures and why.

This package is imported by the spawned worker processes, so it imports nothing heavy itself.
"""
