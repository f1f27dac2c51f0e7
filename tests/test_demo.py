"""The demo and the command line as a user runs them: subprocesses, embedded Redis, fake K2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis
from tests.conftest import CLIENT_ID, CLIENT_SECRET

pytestmark = pytest.mark.fleet


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m k2_shared_token ARGS`` with no K2_* or REDIS_URL from the outer environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("K2_", "REDIS_URL"))}
    return subprocess.run(
        [sys.executable, "-m", "k2_shared_token", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env=clean if env is None else env,
    )  # fmt: skip


def demo_summary(*args: str) -> dict[str, Any]:
    result = run_cli("demo", "--json", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def test_demo_runs_a_fleet_through_several_refreshes() -> None:
    summary = demo_summary(
        "--processes", "3", "--threads", "2", "--duration", "5", "--expires-in", "4",
        "--refresh-ahead", "2", "--min-validity", "0.5", "--latency", "0.05",
    )  # fmt: skip
    assert summary["ok"] is True
    assert summary["errors"] == 0
    assert summary["api_failures"] == 0
    assert summary["calls"] > 1000
    # 5 s with a new token every 2 s: the first exchange plus two refreshes (three at most).
    assert summary["expected_exchanges"] == 3
    assert 2 <= summary["exchanges"] <= 4
    assert summary["min_gap_between_exchanges_s"] >= 1.6


def test_demo_against_a_given_k2_server_counts_exchanges_from_redis(
    fake_k2: FakeK2Server, redis_server: EmbeddedRedis
) -> None:
    """The 'real credentials' path, pointed at a fake server the test owns."""
    fake_k2.expires_in = 60
    summary = demo_summary(
        "--processes", "2", "--threads", "2", "--duration", "2", "--redis-url", redis_server.url,
        "--base-url", fake_k2.base_url, "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET,
    )  # fmt: skip
    assert summary["exchanges"] == fake_k2.exchanges == 1
    assert summary["token_lifetime_s"] == 60
    assert summary["api_calls"] == 0
    assert CLIENT_SECRET not in json.dumps(summary)


def test_cli_reports_missing_configuration_with_a_clear_error() -> None:
    result = run_cli("get", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "K2_CLIENT_ID" in result.stderr
