"""``k2-token`` subcommands against real Redis and the fake K2 server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from k2_shared_token import SharedTokenProvider
from k2_shared_token._cli.main import main
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis, free_port
from tests.conftest import CLIENT_ID, CLIENT_SECRET

Make = Callable[..., SharedTokenProvider]


def flags(redis_server: EmbeddedRedis, fake_k2: FakeK2Server, *, secret: bool = True) -> list[str]:
    out = ["--client-id", CLIENT_ID, "--base-url", fake_k2.base_url,
           "--redis-url", redis_server.url]  # fmt: skip
    return [*out, "--client-secret", CLIENT_SECRET] if secret else out


def test_get_prints_the_shared_token(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, make_provider: Make,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert main(["get", *flags(redis_server, fake_k2)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == make_provider().get_token()
    assert fake_k2.exchanges == 1


def test_status_shows_token_lock_and_last_exchange(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, make_provider: Make,
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    provider = make_provider()
    token = provider.get_token()
    redis_client.set(provider.keys.lock, b"web-7:4242:1700000000000:abcd", px=5000)
    assert main(["status", "--json", *flags(redis_server, fake_k2, secret=False)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["namespace"] == provider.namespace
    assert 3590 < status["token"]["seconds_left"] <= 3600
    assert status["token"]["exchange_seconds"] >= 0
    assert status["token"]["issued_at"] > 1.7e9
    assert status["lock"]["host"] == "web-7"
    assert status["lock"]["pid"] == 4242
    assert 0 < status["lock"]["lease_left_seconds"] <= 5
    assert status["lock_acquisitions"] == 1
    assert main(["status", *flags(redis_server, fake_k2, secret=False)]) == 0
    table = capsys.readouterr().out
    assert "held by web-7 pid 4242" in table
    assert token not in table + json.dumps(status)


def test_the_key_prefix_comes_from_the_environment_unless_a_flag_says_otherwise(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, make_provider: Make,
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``K2_KEY_PREFIX`` names the keys every command works on, as it does for ``from_env()``:
    a CLI looking at the default prefix would see an empty namespace and exchange anew."""
    monkeypatch.setenv("K2_KEY_PREFIX", "tenant-a")
    provider = make_provider(key_prefix="tenant-a")
    token = provider.get_token()
    assert main(["get", *flags(redis_server, fake_k2)]) == 0
    assert capsys.readouterr().out.strip() == token
    assert fake_k2.exchanges == 1
    status = ["status", "--json", *flags(redis_server, fake_k2, secret=False)]
    assert main(status) == 0
    assert json.loads(capsys.readouterr().out)["token"] is not None
    # The flag wins: the default prefix's namespace holds nothing.
    assert main([*status, "--key-prefix", "k2"]) == 0
    assert json.loads(capsys.readouterr().out)["token"] is None
    assert not redis_client.keys("k2:*")


def test_invalidate_compare_and_delete_then_force(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server, make_provider: Make,
    redis_client: redis.Redis, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    provider = make_provider()
    token = provider.get_token()
    base = flags(redis_server, fake_k2, secret=False)
    assert main(["invalidate", "--token", "not-the-token", *base]) == 0
    assert "not deleted" in capsys.readouterr().out
    assert redis_client.exists(provider.keys.token)
    # "--token=..." form: a token may start with "-", which argparse takes for an option.
    assert main(["invalidate", f"--token={token}", *base]) == 0
    assert capsys.readouterr().out.startswith("deleted")
    assert not redis_client.exists(provider.keys.token)
    provider.invalidate(token)
    provider.get_token()
    assert main(["invalidate", "--force", *base]) == 0
    assert not redis_client.exists(provider.keys.token)
    assert main(["invalidate", *base]) == 2  # neither --token nor --force


def test_exit_codes_name_the_problem(
    fake_k2: FakeK2Server, redis_server: EmbeddedRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"]
    assert main(["status", "--client-id", CLIENT_ID, *unreachable]) == 3
    assert "SharedCacheError" in capsys.readouterr().err
    bad = ["--client-id", CLIENT_ID, "--client-secret", "wrong", "--base-url", fake_k2.base_url,
           "--redis-url", redis_server.url]  # fmt: skip
    assert main(["get", *bad]) == 4
    err = capsys.readouterr().err
    assert "InvalidCredentialsError" in err
    assert "wrong" not in err
    assert main(["status", "--client-id", ""]) == 2


def test_console_script_help_lists_every_subcommand() -> None:
    script = Path(sys.executable).parent / "k2-token"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    names = ("get", "revoke", "introspect", "info", "status", "invalidate", "fake-server", "demo")
    for name in names:
        assert name in result.stdout
    for name in names:
        sub = subprocess.run([str(script), name, "--help"], capture_output=True, text=True,
                             timeout=60, check=True)  # fmt: skip
        assert "usage: k2-token" in sub.stdout
