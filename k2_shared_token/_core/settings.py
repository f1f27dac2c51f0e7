"""Provider settings: validated once, at construction, so bad configuration fails fast.

Everything that changes which token is right (the normalised base URL and the client id) goes
into the namespace hash, so two applications, or sandbox and production, can never share a token.
The secret does not: it never leaves the process, and rotating it must not orphan the cache.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .._redis import crypto
from .errors import ConfigurationError

SANDBOX_URL = "https://sandbox.kopokopo.com"
PRODUCTION_URL = "https://api.kopokopo.com"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalise_base_url(url: str, *, allow_insecure_http: bool = False) -> str:
    """Canonical form of a K2 base URL: lower-case scheme and host, no default port, no slash.

    Plain ``http`` is refused unless the host is loopback (the fake server, a local proxy) or
    the caller explicitly allows it: client secrets must not cross a network in clear text.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("base_url must be a non-empty URL such as " + SANDBOX_URL)
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigurationError(f"base_url must start with https:// (got scheme {scheme!r})")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigurationError("base_url must not carry credentials, a query or a fragment")
    try:
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"base_url has an invalid port: {exc}") from None
    if not host:
        raise ConfigurationError("base_url has no host")
    if scheme == "http" and not (allow_insecure_http or _is_loopback(host)):
        raise ConfigurationError(
            "base_url uses plain http:// for a non-loopback host; use https:// "
            "or pass allow_insecure_http=True"
        )
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    return f"{scheme}://{netloc}{path}"


def namespace_for(base_url: str, client_id: str) -> str:
    """64 bits of SHA-256 over (normalised base URL, client id): no identifier in clear."""
    digest = hashlib.sha256(f"{base_url}\n{client_id}".encode()).hexdigest()
    return digest[:16]


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a number of seconds (got {value!r})")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if allow_zero else '> 0'} (got {value})")
    return float(value)


@dataclass(frozen=True)
class Settings:
    """Validated, immutable settings shared by the sync and asyncio providers."""

    client_id: str
    client_secret: str = field(repr=False)
    base_url: str
    key_prefix: str
    refresh_ahead: float
    min_validity: float
    lock_lease: float
    wait_timeout: float
    exchange_deadline: float
    connect_timeout: float
    read_timeout: float
    max_attempts: int
    local_cache: bool
    local_max_age: float
    namespace: str
    on_redis_error: str = "fallback"
    redis_timeout: float = 1.0
    redis_cooldown: float = 5.0
    invalid_client_holdoff: float = 60.0
    failure_backoff: float = 1.0
    failure_backoff_max: float = 60.0

    @property
    def fallback(self) -> bool:
        """Carry on without Redis (process-local token) when it fails, rather than raise."""
        return self.on_redis_error == "fallback"

    @classmethod
    def build(
        cls,
        *,
        client_id: str,
        client_secret: str,
        base_url: str = SANDBOX_URL,
        key_prefix: str = "k2",
        refresh_ahead: float = 300,
        min_validity: float = 30,
        lock_lease: float = 15,
        wait_timeout: float = 20,
        exchange_deadline: float | None = None,
        connect_timeout: float = 3.05,
        read_timeout: float = 10,
        max_attempts: int = 4,
        local_cache: bool = True,
        local_max_age: float = 60,
        allow_insecure_http: bool = False,
        on_redis_error: str = "fallback",
        redis_timeout: float = 1.0,
        redis_cooldown: float = 5.0,
        invalid_client_holdoff: float = 60.0,
        failure_backoff: float = 1.0,
        failure_backoff_max: float = 60.0,
    ) -> Settings:
        for name, value in (("client_id", client_id), ("client_secret", client_secret)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigurationError(f"{name} must be a non-empty string")
        url = normalise_base_url(base_url, allow_insecure_http=allow_insecure_http)
        if not isinstance(key_prefix, str) or not _PREFIX_RE.fullmatch(key_prefix):
            raise ConfigurationError(
                "key_prefix must be 1-64 characters of letters, digits, '_', '.', ':' or '-' "
                "(no braces: the namespace supplies the Redis Cluster hash tag)"
            )
        refresh_ahead = _positive("refresh_ahead", refresh_ahead)
        min_validity = _positive("min_validity", min_validity, allow_zero=True)
        if min_validity >= refresh_ahead:
            raise ConfigurationError(
                f"min_validity ({min_validity}) must be smaller than refresh_ahead "
                f"({refresh_ahead}): the early-refresh window lies between them"
            )
        lock_lease = _positive("lock_lease", lock_lease)
        wait_timeout = _positive("wait_timeout", wait_timeout)
        # The exchange, retries included, must end inside the lease; otherwise a second worker
        # takes the lock while the first is still talking to K2 and the fleet exchanges twice.
        deadline = lock_lease * 0.8 if exchange_deadline is None else exchange_deadline
        deadline = _positive("exchange_deadline", deadline)
        if deadline >= lock_lease:
            raise ConfigurationError(
                f"exchange_deadline ({deadline}) must be shorter than lock_lease ({lock_lease})"
            )
        connect_timeout = _positive("connect_timeout", connect_timeout)
        read_timeout = _positive("read_timeout", read_timeout)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be an integer >= 1 (got {max_attempts!r})")
        local_max_age = _positive("local_max_age", local_max_age)
        if on_redis_error not in ("fallback", "raise"):
            raise ConfigurationError(
                f"on_redis_error must be 'fallback' or 'raise' (got {on_redis_error!r})"
            )
        redis_timeout = _positive("redis_timeout", redis_timeout)
        redis_cooldown = _positive("redis_cooldown", redis_cooldown)
        invalid_client_holdoff = _positive(
            "invalid_client_holdoff", invalid_client_holdoff, allow_zero=True
        )
        failure_backoff = _positive("failure_backoff", failure_backoff)
        failure_backoff_max = _positive("failure_backoff_max", failure_backoff_max)
        if failure_backoff_max < failure_backoff:
            raise ConfigurationError(
                f"failure_backoff_max ({failure_backoff_max}) must be at least "
                f"failure_backoff ({failure_backoff})"
            )
        return cls(
            client_id=client_id,
            client_secret=client_secret,
            base_url=url,
            key_prefix=key_prefix,
            refresh_ahead=refresh_ahead,
            min_validity=min_validity,
            lock_lease=lock_lease,
            wait_timeout=wait_timeout,
            exchange_deadline=deadline,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            local_cache=bool(local_cache),
            local_max_age=local_max_age,
            namespace=namespace_for(url, client_id),
            on_redis_error=on_redis_error,
            redis_timeout=redis_timeout,
            redis_cooldown=redis_cooldown,
            invalid_client_holdoff=invalid_client_holdoff,
            failure_backoff=failure_backoff,
            failure_backoff_max=failure_backoff_max,
        )

    @property
    def token_url(self) -> str:
        return self.base_url + "/oauth/token"


def options_from_env(env: Mapping[str, str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A provider's keyword arguments from the ``K2_*`` environment, then ``overrides``.

    Required: ``K2_CLIENT_ID``, ``K2_CLIENT_SECRET``. Optional: ``K2_BASE_URL`` (default:
    sandbox), ``K2_REDIS_URL`` (else ``REDIS_URL``), ``K2_TOKEN_ENCRYPTION_KEYS``
    (comma-separated, the encrypting key first), and the tuning knobs ``K2_REFRESH_AHEAD``,
    ``K2_MIN_VALIDITY``, ``K2_LOCK_LEASE``, ``K2_WAIT_TIMEOUT``, ``K2_REDIS_TIMEOUT``,
    ``K2_INVALID_CLIENT_HOLDOFF`` (seconds), ``K2_ON_REDIS_ERROR`` (``fallback`` or
    ``raise``), ``K2_KEY_PREFIX`` and ``K2_ALLOW_INSECURE_HTTP=1``.
    """
    kwargs: dict[str, Any] = {
        "client_id": env.get("K2_CLIENT_ID", ""),
        "client_secret": env.get("K2_CLIENT_SECRET", ""),
        "base_url": env.get("K2_BASE_URL") or SANDBOX_URL,
        "redis": env.get("K2_REDIS_URL") or env.get("REDIS_URL") or DEFAULT_REDIS_URL,
    }
    for name in (
        "refresh_ahead",
        "min_validity",
        "lock_lease",
        "wait_timeout",
        "redis_timeout",
        "invalid_client_holdoff",
    ):
        raw = env.get(f"K2_{name.upper()}")
        if raw:
            try:
                kwargs[name] = float(raw)
            except ValueError:
                raise ConfigurationError(f"K2_{name.upper()} must be seconds") from None
    if env.get("K2_KEY_PREFIX"):
        kwargs["key_prefix"] = env["K2_KEY_PREFIX"]
    if env.get("K2_ON_REDIS_ERROR"):
        kwargs["on_redis_error"] = env["K2_ON_REDIS_ERROR"]
    if env.get(crypto.ENV_KEYS):
        kwargs["encryption_keys"] = crypto.keys_from_env(env[crypto.ENV_KEYS])
    if env.get("K2_ALLOW_INSECURE_HTTP", "").lower() in ("1", "true", "yes"):
        kwargs["allow_insecure_http"] = True
    kwargs.update(overrides)
    missing = [n for n in ("client_id", "client_secret") if not kwargs[n]]
    if missing:
        names = " and ".join(f"K2_{n.upper()}" for n in missing)
        raise ConfigurationError(f"{names} must be set (environment or keyword argument)")
    return kwargs
