"""Many K2 applications in one process on one Redis client: what both registries share.

A multi-tenant service (a client id per merchant, or sandbox and production side by side) needs
one provider per (base URL, client id). Built one by one from a Redis URL, each provider makes
its own client, so 1,000 tenants cost 1,000 connection pools and as many idle connections to
Redis. The registry makes one client and hands it to every provider it builds
(``redis=<client>``: no provider closes it), so the whole process shares one pool.

It returns the same provider for the same pair, because two providers of one namespace in one
process would each keep their own copy and their own background refresh. The same pair with
another secret is refused: the registry cannot tell which secret is right, and silently keeping
either would hand out a token for credentials the caller did not pass. Rotating a secret in a
running process is :meth:`ProviderRegistry.remove`, then :meth:`ProviderRegistry.provider` with
the new one; the namespace, hence the shared token, stays the same.

:class:`.AsyncProviderRegistry` (written in :mod:`._async.registry`) and the generated
:class:`.ProviderRegistry` add what awaits: ``get_token``, ``remove`` and closing.
"""

from __future__ import annotations

import hmac
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ._core.errors import ConfigurationError
from ._core.settings import (
    DEFAULT_REDIS_URL,
    OPTION_NAMES,
    SANDBOX_URL,
    Settings,
    namespace_for,
    normalise_base_url,
)
from ._redis.clients import connect


class _Provider(Protocol):
    settings: Settings

    @property
    def namespace(self) -> str: ...


P = TypeVar("P", bound=_Provider)

# Keyword arguments a registry passes on to every provider: whatever the providers take, except
# what identifies one provider (given to provider()) and the Redis client (the registry's own).
_PER_PROVIDER = frozenset({"client_id", "client_secret"})
_OWN = frozenset({"self", "redis", "base_url"})
_SHARED = frozenset({"session", "hooks"}) | (OPTION_NAMES - _PER_PROVIDER - _OWN)
_SETTINGS = OPTION_NAMES - _PER_PROVIDER - _OWN

_KNOWN_URLS = 64  # distinct base URLs remembered in their normalised form (sandbox, production)

_live: weakref.WeakSet[RegistryBase[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A fork taken while another thread held the lock would leave the child's copy locked.
    for registry in list(_live):
        registry._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class RegistryBase(Generic[P]):
    """What both registries share: validation, the one client, lookup and creation."""

    _asyncio: ClassVar[bool] = False

    def __init__(
        self, *, redis: str | Any = DEFAULT_REDIS_URL, base_url: str = SANDBOX_URL, **shared: Any
    ) -> None:
        """``redis``: a URL (the registry makes the client and closes it) or a redis-py client
        (yours to close). ``base_url``: the default for :meth:`provider`. Any other keyword is a
        provider setting (``refresh_ahead``, ``key_prefix``, ``hooks``, ``session``...) given to
        every provider; it is validated now, so a typo fails here rather than at first use."""
        per_provider = sorted(_PER_PROVIDER & set(shared))
        if per_provider:
            raise ConfigurationError(
                f"{' and '.join(per_provider)} belong to provider(), not to the registry"
            )
        unknown = sorted(set(shared) - _SHARED)
        if unknown:
            raise ConfigurationError(f"unknown provider setting(s): {', '.join(unknown)}")
        settings = Settings.build(
            client_id="registry",
            client_secret="registry",
            base_url=base_url,
            **{name: value for name, value in shared.items() if name in _SETTINGS},
        )
        self.default_base_url = settings.base_url
        self._allow_insecure_http = bool(shared.get("allow_insecure_http", False))
        # Every provider iterates these: a generator would reach the first one only.
        for name in ("hooks", "encryption_keys"):
            if name in shared:
                shared[name] = tuple(shared[name])
        self._shared = shared
        self.client, self._owns_client = connect(
            redis, settings.redis_timeout, asyncio=self._asyncio
        )
        self._providers: dict[tuple[str, str], P] = {}
        self._urls: dict[str, str] = {}  # base URLs as given -> normalised
        self._lock = threading.Lock()
        self._closed = False
        _live.add(self)

    def _provider_class(self) -> Callable[..., P]:
        raise NotImplementedError

    # -- lookup and creation -----------------------------------------------------------------

    def _key(self, client_id: str, base_url: str | None) -> tuple[str, str]:
        if not isinstance(client_id, str) or not client_id.strip():
            raise ConfigurationError("client_id must be a non-empty string")
        if base_url is None:
            return self.default_base_url, client_id
        # The warm path of get_token(): parsing the URL would cost more than the token does.
        url = self._urls.get(base_url)
        if url is None:
            url = normalise_base_url(base_url, allow_insecure_http=self._allow_insecure_http)
            if len(self._urls) < _KNOWN_URLS:
                self._urls[base_url] = url
        return url, client_id

    def provider(
        self, client_id: str, client_secret: str | None = None, *, base_url: str | None = None
    ) -> P:
        """The provider of (``base_url``, ``client_id``), built on first use.

        The same normalised pair always returns the same provider. ``client_secret`` may be
        left out once the pair is registered; given, it must match the registered one, else
        :class:`.ConfigurationError` (which names the namespace, never a secret).
        """
        self._check_open()
        key = self._key(client_id, base_url)
        found = self._providers.get(key)  # a dict read is atomic: no lock on the warm path
        if found is None:
            if client_secret is None:
                raise ConfigurationError(
                    f"no provider for namespace {namespace_for(*key)} ({key[0]}) yet: "
                    "pass client_secret the first time"
                )
            with self._lock:
                self._check_open()
                found = self._providers.get(key)
                if found is None:
                    found = self._provider_class()(
                        client_id=client_id,
                        client_secret=client_secret,
                        base_url=key[0],
                        redis=self.client,
                        **self._shared,
                    )
                    self._providers[key] = found
                    return found
        if client_secret is not None and not hmac.compare_digest(
            found.settings.client_secret.encode(), client_secret.encode()
        ):
            raise ConfigurationError(
                f"namespace {found.namespace} ({key[0]}) is registered with another "
                "client_secret; to rotate it, remove() the provider first"
            )
        return found

    def _pop(self, client_id: str, base_url: str | None) -> P | None:
        key = self._key(client_id, base_url)
        with self._lock:
            return self._providers.pop(key, None)

    def _take_all(self) -> list[P] | None:
        """Mark closed and hand over every provider; None if already closed."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            providers = list(self._providers.values())
            self._providers.clear()
        _live.discard(self)
        return providers

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError(f"{type(self).__name__} is closed")

    def __len__(self) -> int:
        return len(self._providers)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(providers={len(self._providers)}, "
            f"default_base_url={self.default_base_url!r})"
        )
