"""matplotlib, set up once for files only (Agg): benchmarks run headless and in CI."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

__all__ = ["plt"]
