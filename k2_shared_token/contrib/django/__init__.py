"""Django integration: one shared K2 token per process, configured from Django's settings.

Add the app and a ``K2_SHARED_TOKEN`` setting::

    INSTALLED_APPS = [..., "k2_shared_token.contrib.django"]
    K2_SHARED_TOKEN = {
        "client_id": os.environ["K2_CLIENT_ID"],
        "client_secret": os.environ["K2_CLIENT_SECRET"],
        "base_url": "https://sandbox.kopokopo.com",
        "cache": "default",        # reuse that Django Redis cache's connection pool, or:
        # "redis": "redis://localhost:6379/0",
    }

then, in a view: ``requests.get(url, auth=get_provider().auth())``.

The accepted keys are the provider's settings (the README's configuration table; they are the
:class:`~k2_shared_token._core.settings.Settings` declarations, so a new knob is accepted here
the day it is declared) plus ``redis`` (a URL or a redis-py client; ``redis://localhost:6379/0``
when neither it nor ``cache`` is given) and ``cache`` (the alias of a Django cache whose client
to reuse: ``django.core.cache.backends.redis.RedisCache`` or django-redis). A value may also be
given as a string, read the way ``from_env`` reads the environment (``"2.5"``, ``"off"``,
comma-separated keys), so settings built from ``os.environ`` need no conversions.

:func:`get_provider` builds the process's provider on first use, not at import, so ``manage.py``
commands that never call K2 need neither Redis nor the credentials. It is fork-safe: a provider
built before gunicorn forks its workers is reset in each child by the library itself. The app's
system check (``manage.py check``, and every ``runserver`` and ``migrate``) reports a wrong key,
a bad value or an unknown cache alias as an Error, without connecting to Redis or K2.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from ..._core.errors import ConfigurationError
from ..._core.settings import (
    DEFAULT_REDIS_URL,
    OPTION_NAMES,
    Settings,
    _kind,
    knobs,
)
from ..._redis.clients import connect
from ..._sync.provider import SharedTokenProvider

__all__ = [
    "ACCEPTED_KEYS",
    "SETTING",
    "close_provider",
    "get_provider",
    "provider_options",
]

SETTING = "K2_SHARED_TOKEN"
# The provider's settings, from their declarations, plus where Redis is.
ACCEPTED_KEYS = frozenset(OPTION_NAMES | {"redis", "cache"})

# The Django cache backends whose Redis client we know how to reuse.
DJANGO_REDIS_CACHE = "django.core.cache.backends.redis.RedisCache"
DJANGO_REDIS_PREFIX = "django_redis."

_KNOBS = {f.name: f for f in knobs()}


def _config(config: Any = None) -> Mapping[str, Any]:
    if config is None:
        from django.conf import settings  # noqa: PLC0415

        if not hasattr(settings, SETTING):
            raise ConfigurationError(f"settings.{SETTING} is not set (a dict of the provider's "
                                     "settings: client_id, client_secret, ...)")  # fmt: skip
        config = getattr(settings, SETTING)
    if not isinstance(config, Mapping):
        raise ConfigurationError(f"settings.{SETTING} must be a dict (got {type(config).__name__})")
    return config


def _options(config: Mapping[str, Any]) -> tuple[dict[str, Any], Any, str | None]:
    """The provider's settings (strings parsed as from the environment), the redis value and
    the cache alias, each checked; raises :class:`ConfigurationError` naming the key."""
    unknown = sorted(str(k) for k in config if k not in ACCEPTED_KEYS)
    if unknown:
        raise ConfigurationError(
            f"unknown key(s) in settings.{SETTING}: {', '.join(unknown)} "
            f"(accepted: {', '.join(sorted(ACCEPTED_KEYS))})"
        )
    options: dict[str, Any] = {}
    for name, given in config.items():
        if name not in _KNOBS:
            continue
        try:
            options[name] = _kind(_KNOBS[name]).parse(given) if isinstance(given, str) else given
        except ConfigurationError as exc:
            raise ConfigurationError(f"settings.{SETTING}[{name!r}]: {exc}") from None
    missing = [n for n in ("client_id", "client_secret") if not options.get(n)]
    if missing:
        raise ConfigurationError(
            f"settings.{SETTING} must give {' and '.join(repr(n) for n in missing)}"
        )
    Settings.build(**options)  # every value and every relation between them
    alias = config.get("cache")
    if "redis" in config and alias is not None:
        raise ConfigurationError(f"settings.{SETTING}: give 'redis' or 'cache', not both")
    if alias is not None:
        _cache_backend(alias)
    return options, config.get("redis", DEFAULT_REDIS_URL), alias


def _cache_backend(alias: Any) -> str:
    """The BACKEND of Django cache ``alias``, which must be a Redis cache we can reuse."""
    from django.conf import settings  # noqa: PLC0415

    caches = getattr(settings, "CACHES", {})
    if not isinstance(alias, str) or alias not in caches:
        raise ConfigurationError(
            f"settings.{SETTING}['cache']: {alias!r} is not a cache alias in settings.CACHES "
            f"(have: {', '.join(sorted(caches)) or 'none'})"
        )
    backend = str(caches[alias].get("BACKEND", ""))
    if backend != DJANGO_REDIS_CACHE and not backend.startswith(DJANGO_REDIS_PREFIX):
        raise ConfigurationError(
            f"settings.{SETTING}['cache']: cache {alias!r} uses {backend or 'no backend'}, not "
            f"a Redis cache ({DJANGO_REDIS_CACHE} or django-redis)"
        )
    if backend.startswith(DJANGO_REDIS_PREFIX):
        try:
            import django_redis  # noqa: F401, PLC0415
        except ImportError:
            raise ConfigurationError(
                f"settings.{SETTING}['cache']: cache {alias!r} uses django-redis, which is not "
                "installed"
            ) from None
    return backend


def cache_client(alias: str) -> Any:
    """The redis-py client of Django cache ``alias`` (the primary, with its connection pool)."""
    backend = _cache_backend(alias)
    if backend.startswith(DJANGO_REDIS_PREFIX):
        from django_redis import get_redis_connection  # noqa: PLC0415

        return get_redis_connection(alias, write=True)
    from django.core.cache import caches  # noqa: PLC0415

    # RedisCache's client: one redis.Redis per call, all on the cache's own connection pool.
    return caches[alias]._cache.get_client(write=True)


def provider_options(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of the provider that ``settings.K2_SHARED_TOKEN`` (or ``config``)
    describes, ``redis`` included (the cache's client when ``cache`` is given)."""
    options, redis, alias = _options(_config(config))
    options["redis"] = cache_client(alias) if alias is not None else redis
    return options


def check_configuration(config: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`ConfigurationError` if the configuration is wrong; connects to nothing
    (a Redis URL is parsed into a client that is closed before it ever connects)."""
    options, redis, _ = _options(_config(config))
    if isinstance(redis, str) or redis is None:
        client, owned = connect(redis, Settings.build(**options).redis_timeout)
        if owned:
            client.close()
    elif not hasattr(redis, "register_script"):
        raise ConfigurationError(f"settings.{SETTING}['redis'] must be a Redis URL or client")


_lock = threading.Lock()
_provider: SharedTokenProvider | None = None


def get_provider() -> SharedTokenProvider:
    """This process's provider, built from the settings on first use."""
    global _provider  # noqa: PLW0603
    provider = _provider
    if provider is None:
        with _lock:
            if _provider is None:
                _provider = SharedTokenProvider(**provider_options())
            provider = _provider
    return provider


def close_provider() -> None:
    """Close and forget the process's provider; the next :func:`get_provider` builds a new one
    (the app does this when a test changes ``K2_SHARED_TOKEN`` or ``CACHES``)."""
    global _provider
    with _lock:
        provider, _provider = _provider, None
    if provider is not None:
        provider.close()


def _after_fork() -> None:
    # The provider resets itself in a child; only our lock might have been held at the fork.
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
