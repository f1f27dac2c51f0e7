"""k2_shared_token.contrib.django: configured from ``settings.K2_SHARED_TOKEN``, reusing a Django
Redis cache's connection, a lazy provider per process and a system check; through Django's test
client (tests/django_project) and a real 4-worker gunicorn fleet on a cold cache."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import django
import pytest
import redis
import requests
from django.conf import settings
from django.core.cache import caches
from django.core.checks import Error, run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import Client, override_settings
from django_redis import get_redis_connection

from k2_shared_token._core.settings import knobs
from k2_shared_token.contrib import django as k2django
from k2_shared_token.contrib.django.apps import CHECK_ID
from k2_shared_token.testing.fake_k2 import FakeK2Server
from k2_shared_token.testing.redis_server import EmbeddedRedis, free_port
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_until
from tests.deploy_helpers import (
    ROOT,
    TOKEN_LIFETIME,
    fleet_env,
    http_load,
    live_children,
    log_tail,
    stop_processes,
)

if not settings.configured:
    from tests.django_project import settings as project_settings

    settings.configure(**{k: v for k, v in vars(project_settings).items() if k.isupper()})
    django.setup()

DJANGO_REDIS = "django_redis.cache.RedisCache"


@pytest.fixture(autouse=True)
def _fresh_provider() -> Iterator[None]:
    k2django.close_provider()
    yield
    k2django.close_provider()


def k2_config(fake_k2: FakeK2Server, **extra: Any) -> dict[str, Any]:
    return {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "base_url": fake_k2.base_url, "lock_lease": 5, "wait_timeout": 10, **extra}  # fmt: skip


def cache_settings(redis_url: str, backend: str = k2django.DJANGO_REDIS_CACHE) -> dict[str, Any]:
    return {"default": {"BACKEND": backend, "LOCATION": redis_url}}


def _store_client(provider: Any) -> Any:
    return provider._store.client


# ---------------------------------------------------------------------------- test client


@pytest.mark.parametrize("backend", [k2django.DJANGO_REDIS_CACHE, DJANGO_REDIS])
def test_view_calls_k2_with_the_cache_connection(
    backend: str, redis_server: EmbeddedRedis, fake_k2: FakeK2Server, redis_client: redis.Redis
) -> None:
    config = k2_config(fake_k2, cache="default")
    with override_settings(CACHES=cache_settings(redis_server.url, backend),
                           K2_SHARED_TOKEN=config):  # fmt: skip
        client = Client()
        for _ in range(5):
            response = client.get("/pay")
            assert response.status_code == 200, response.content
        provider = k2django.get_provider()
        assert k2django.get_provider() is provider  # one per process
        if backend == DJANGO_REDIS:
            pool = get_redis_connection("default", write=True).connection_pool
        else:
            pool = caches["default"]._cache._get_connection_pool(True)
        assert _store_client(provider).connection_pool is pool  # the cache's own pool
        assert redis_client.exists(provider.keys.token)
        caches["default"].set("beside", 1)  # the cache still works beside the token
        assert caches["default"].get("beside") == 1
    assert fake_k2.exchanges == 1
    assert fake_k2.api_requests == 5
    assert fake_k2.api_unauthorized == 0


def test_redis_url_and_string_values(redis_server: EmbeddedRedis, fake_k2: FakeK2Server) -> None:
    config = k2_config(fake_k2, redis=redis_server.url, refresh_ahead="2.5", min_validity="0.5",
                       local_cache="off", max_attempts="2")  # fmt: skip
    with override_settings(K2_SHARED_TOKEN=config):
        assert Client().get("/pay").status_code == 200
        s = k2django.get_provider().settings
        assert (s.refresh_ahead, s.min_validity, s.local_cache, s.max_attempts) == (2.5, 0.5,
                                                                                   False, 2)
    assert fake_k2.exchanges == 1


def test_provider_is_lazy_and_follows_setting_changes(
    redis_server: EmbeddedRedis, fake_k2: FakeK2Server
) -> None:
    with override_settings(K2_SHARED_TOKEN=k2_config(fake_k2, redis=redis_server.url)):
        assert k2django._provider is None  # nothing built until asked
        first = k2django.get_provider()
        with override_settings(
            K2_SHARED_TOKEN=k2_config(fake_k2, redis=redis_server.url, key_prefix="other")
        ):
            second = k2django.get_provider()
            assert second is not first and second.keys.token.startswith("other:")
    assert fake_k2.exchanges == 0


# ---------------------------------------------------------------------------- system check


def test_accepted_keys_are_the_settings_declarations() -> None:
    assert {f.name for f in knobs()} | {"redis", "cache"} == k2django.ACCEPTED_KEYS


def test_every_knob_at_its_default_passes_the_check(fake_k2: FakeK2Server) -> None:
    config = {f.name: f.default for f in knobs() if f.default is not None}
    config.update(k2_config(fake_k2, redis="redis://127.0.0.1:1/0"))
    with override_settings(K2_SHARED_TOKEN=config):
        assert [m for m in run_checks() if m.id == CHECK_ID] == []


@pytest.mark.parametrize(
    ("change", "caches_setting", "says"),
    [
        ({"refresh_ahaed": 60}, None, "unknown key(s) in settings.K2_SHARED_TOKEN: refresh_ahaed"),
        ({"refresh_ahead": -1}, None, "refresh_ahead must be > 0"),
        ({"max_attempts": "many"}, None, "['max_attempts']: 'many' is not a whole number"),
        ({"min_validity": 400}, None, "must be smaller than refresh_ahead"),
        ({"on_redis_error": "ignore"}, None, "on_redis_error must be 'fallback' or 'raise'"),
        ({"client_secret": ""}, None, "must give 'client_secret'"),
        ({"cache": "sessions"}, None, "'sessions' is not a cache alias in settings.CACHES"),
        ({"cache": "default"}, "locmem", "not a Redis cache"),
        ({"cache": "default", "redis": "redis://127.0.0.1:1/0"}, None, "not both"),
        ({"redis": "http://127.0.0.1:1/"}, None, "redis URL is not valid"),
        ({"base_url": "http://k2.example"}, None, "plain http://"),
    ],
)
def test_check_reports_a_bad_configuration(
    change: dict[str, Any], caches_setting: str | None, says: str, fake_k2: FakeK2Server
) -> None:
    config = {**k2_config(fake_k2), **change}
    caches_value = (
        {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
        if caches_setting == "locmem"
        else cache_settings("redis://127.0.0.1:1/0")
    )
    with override_settings(K2_SHARED_TOKEN=config, CACHES=caches_value):
        errors = [m for m in run_checks() if m.id == CHECK_ID]
    assert len(errors) == 1, errors
    assert isinstance(errors[0], Error)
    assert says in errors[0].msg, errors[0].msg
    assert CLIENT_SECRET not in errors[0].msg


def test_check_fails_startup_and_not_a_dict() -> None:
    with override_settings(K2_SHARED_TOKEN=["client_id"]), pytest.raises(SystemCheckError) as e:
        call_command("check")
    assert "K2_SHARED_TOKEN must be a dict" in str(e.value)


# ---------------------------------------------------------------------------- gunicorn fleet

WORKERS = 4
LOAD_SECONDS = 7.0  # three refresh periods of 2 s, not a multiple of one


@contextmanager
def django_gunicorn(env: dict[str, str], log: Path) -> Iterator[tuple[int, str]]:
    """gunicorn (examples/gunicorn.conf.py, 4 sync workers) on the test project; yields once all
    workers are up and /health answers; stopped by PID, workers included."""
    port = free_port()
    env = {**env, "GUNICORN_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(WORKERS)}
    args = [sys.executable, "-m", "gunicorn", "-c", "examples/gunicorn.conf.py",
            "tests.django_project.wsgi:application"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: set[int] = set()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {proc.returncode}:\n{log_tail(log)}")
        seen.update(live_children(proc.pid))
        if len(live_children(proc.pid)) < WORKERS:
            return False
        try:
            return requests.get(f"{base}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(ready, 30, "gunicorn workers and GET /health")
        yield proc.pid, base
    finally:
        seen.update(live_children(proc.pid))
        stop_processes(proc, seen, grace=10)


@pytest.mark.fleet
@pytest.mark.parametrize("backend", [k2django.DJANGO_REDIS_CACHE, DJANGO_REDIS])
def test_django_gunicorn_fleet_makes_one_exchange_per_period(
    backend: str, redis_server: EmbeddedRedis, fake_k2: FakeK2Server, tmp_path: Path
) -> None:
    from tests.test_deploy_fleets import check_and_report  # noqa: PLC0415

    fake_k2.expires_in = TOKEN_LIFETIME
    # The project's settings read K2_* and the cache backend from the environment.
    env = fleet_env(redis_server.url, fake_k2.base_url, DJANGO_CACHE_BACKEND=backend)
    with django_gunicorn(env, tmp_path / "gunicorn.log") as (_master, base):
        phase = http_load(f"{base}/pay", 4, LOAD_SECONDS, 50.0)
    check_and_report(f"django gunicorn sync x4, cache {backend}", [phase], fake_k2)
    assert len(phase.pids) == WORKERS
