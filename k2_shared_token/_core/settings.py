"""Provider settings, each declared once (:class:`Settings`), validated at construction so bad
configuration fails fast.

Everything that changes which token is right (the normalised base URL and the client id) goes
into the namespace hash, so two applications, or sandbox and production, can never share a token.
The secret does not: it never leaves the process, and rotating it must not orphan the cache.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
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
class Kind:
    """How a knob's value is checked, read from its environment variable, and shown."""

    check: Callable[[str, Any], Any]
    parse: Callable[[str], Any]
    show: Callable[[Any], str] = str


def _seconds(*, allow_zero: bool = False) -> Kind:
    def parse(raw: str) -> float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigurationError(f"{raw!r} is not a number of seconds") from None

    return Kind(lambda n, v: _positive(n, v, allow_zero=allow_zero), parse, lambda v: f"{v:g} s")


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1 (got {value!r})")
    return value


def _parse_count(raw: str) -> int:
    if not raw.strip().isdigit():
        raise ConfigurationError(f"{raw!r} is not a whole number")
    return int(raw)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{name} must be a non-empty string")
    return value


def _prefix(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _PREFIX_RE.fullmatch(value):
        raise ConfigurationError(
            f"{name} must be 1-64 characters of letters, digits, '_', '.', ':' or '-' "
            "(no braces: the namespace supplies the Redis Cluster hash tag)"
        )
    return value


def _choice(*choices: str) -> Kind:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ConfigurationError(
                f"{name} must be {' or '.join(repr(c) for c in choices)} (got {value!r})"
            )
        return str(value)

    return Kind(check, str.strip, lambda v: f"`{v}`")


def _keys(name: str, value: Any) -> tuple[str | bytes, ...]:
    if isinstance(value, (str, bytes)):
        raise ConfigurationError(f"{name} must be a list of keys, not one string")
    return tuple(value)


SECONDS = _seconds()
SECONDS_OR_ZERO = _seconds(allow_zero=True)
# Left out (None): derived from the lock lease, in Settings.build.
DERIVED_SECONDS = Kind(
    lambda n, v: None if v is None else _positive(n, v),
    SECONDS.parse,
    lambda v: "0.8 x `lock_lease`",
)
COUNT = Kind(_count, _parse_count)
FLAG = Kind(
    lambda n, v: bool(v), lambda raw: raw.strip().lower() in ("1", "true", "yes", "on"),
    lambda v: "on" if v else "off",
)  # fmt: skip
REQUIRED = Kind(_text, str.strip, lambda v: "required")
TEXT = Kind(_text, str.strip, lambda v: f"`{v}`")
PREFIX = Kind(_prefix, str.strip, lambda v: f"`{v}`")
KEYS = Kind(_keys, crypto.keys_from_env, lambda v: "none")


def knob(default: Any, doc: str, kind: Kind, *, env: str = "", secret: bool = False) -> Any:
    """One setting, declared once: its name and type are the field's, the rest is here. The
    environment variable is ``K2_<NAME>`` unless ``env`` says otherwise."""
    return field(default=default, repr=not secret, metadata={"doc": doc, "kind": kind, "env": env})


@dataclass(frozen=True)
class Settings:
    """Every setting of a provider, validated once, at construction.

    Each field below is one knob: its name, type, default, validation (its :class:`Kind`),
    environment variable and one line of doc. The providers, the registry, ``from_env``, the
    command line and the README's configuration table are all derived from these fields.
    """

    client_id: str = knob("", "the K2 application's client id", REQUIRED)
    client_secret: str = knob("", "its secret (never leaves the process)", REQUIRED, secret=True)
    base_url: str = knob(SANDBOX_URL, "K2's base URL (`PRODUCTION_URL` for production)", TEXT)
    refresh_ahead: float = knob(
        300.0,
        "below this much lifetime left, one worker in the fleet refreshes in the background; "
        "everyone keeps getting the current token",
        SECONDS,
    )
    min_validity: float = knob(
        30.0, "a token with less left is never handed out; callers wait for a new one",
        SECONDS_OR_ZERO,
    )  # fmt: skip
    lock_lease: float = knob(15.0, "how long the refresh lock lives if its holder dies", SECONDS)
    wait_timeout: float = knob(
        20.0, "how long a caller waits for another worker's exchange before "
        "`TokenUnavailableError`", SECONDS,
    )  # fmt: skip
    exchange_deadline: float = knob(
        None, "the exchange with all its retries ends by then, inside the lease", DERIVED_SECONDS
    )
    connect_timeout: float = knob(3.05, "connect timeout per attempt, clipped to the deadline",
                                  SECONDS)  # fmt: skip
    read_timeout: float = knob(10.0, "read timeout per attempt, clipped to the deadline", SECONDS)
    max_attempts: int = knob(
        4, "exchange attempts (5xx, 429, 408, timeouts, garbage replies are retried)", COUNT
    )
    max_exchanges: int = knob(
        8, "at most this many token requests in flight at once in this process, all namespaces "
        "together (per event loop for asyncio); more wait their turn inside their deadline", COUNT,
    )  # fmt: skip
    local_cache: bool = knob(True, "per-process copy; off means one Redis round trip per call",
                             FLAG)  # fmt: skip
    local_max_age: float = knob(
        60.0, "longest a warm worker trusts its copy before re-reading Redis (in the background)",
        SECONDS,
    )  # fmt: skip
    local_idle: float = knob(
        900.0, "a namespace's copy unused this long is dropped (memory stays bounded with many "
        "tenants); its next call re-reads Redis", SECONDS,
    )  # fmt: skip
    redis_timeout: float = knob(1.0, "connect and socket timeout of the Redis client we create",
                                SECONDS)  # fmt: skip
    on_redis_error: str = knob(
        "fallback", "Redis failing: `fallback` serves a process-local token (see Failure "
        "behaviour); `raise` raises `SharedCacheError`", _choice("fallback", "raise"),
    )  # fmt: skip
    redis_cooldown: float = knob(
        5.0, "after a Redis failure, how long the circuit breaker skips Redis before one call "
        "probes it again", SECONDS,
    )  # fmt: skip
    invalid_client_holdoff: float = knob(
        60.0, "after `invalid_client`, how long the whole fleet raises without asking K2 (not for "
        "a different secret)", SECONDS_OR_ZERO,
    )  # fmt: skip
    failure_backoff: float = knob(
        1.0, "fleet-wide hold-off after a failed exchange, doubling per failure in a row, at "
        "least `Retry-After` (capped at 1 h)", SECONDS,
    )  # fmt: skip
    failure_backoff_max: float = knob(60.0, "the longest such hold-off", SECONDS)
    encryption_keys: tuple[str | bytes, ...] = knob(
        (), "AES-256-GCM keys for the token at rest (first encrypts, all decrypt; "
        "comma-separated in the environment); the `encryption` extra", KEYS,
        env=crypto.ENV_KEYS, secret=True,
    )  # fmt: skip
    backplane: bool = knob(
        True, "one subscription per Redis per process to the namespaces' announcements: every "
        "copy follows a new, invalidated or revoked token within milliseconds (off: copies are "
        "re-checked every `local_max_age`)", FLAG,
    )  # fmt: skip
    key_prefix: str = knob("k2", "first part of every key", PREFIX)
    allow_insecure_http: bool = knob(
        False, "`http://` is refused except for loopback hosts", FLAG
    )
    namespace: str = field(default="")  # derived: the hash of base URL and client id

    @property
    def fallback(self) -> bool:
        """Carry on without Redis (process-local token) when it fails, rather than raise."""
        return self.on_redis_error == "fallback"

    @property
    def token_url(self) -> str:
        return self.base_url + "/oauth/token"

    @classmethod
    def build(cls, **options: Any) -> Settings:
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise ConfigurationError(f"unknown setting(s): {', '.join(unknown)}")
        v = {f.name: _kind(f).check(f.name, options.get(f.name, f.default)) for f in knobs()}
        v["base_url"] = normalise_base_url(
            v["base_url"], allow_insecure_http=v["allow_insecure_http"]
        )
        if v["min_validity"] >= v["refresh_ahead"]:
            raise ConfigurationError(
                f"min_validity ({v['min_validity']}) must be smaller than refresh_ahead "
                f"({v['refresh_ahead']}): the early-refresh window lies between them"
            )
        # The exchange, retries included, must end inside the lease; otherwise a second worker
        # takes the lock while the first is still talking to K2 and the fleet exchanges twice.
        if v["exchange_deadline"] is None:
            v["exchange_deadline"] = v["lock_lease"] * 0.8
        if v["exchange_deadline"] >= v["lock_lease"]:
            raise ConfigurationError(
                f"exchange_deadline ({v['exchange_deadline']}) must be shorter than lock_lease "
                f"({v['lock_lease']})"
            )
        if v["failure_backoff_max"] < v["failure_backoff"]:
            raise ConfigurationError(
                f"failure_backoff_max ({v['failure_backoff_max']}) must be at least "
                f"failure_backoff ({v['failure_backoff']})"
            )
        return cls(**v, namespace=namespace_for(v["base_url"], v["client_id"]))


def knobs() -> tuple[Field[Any], ...]:
    """The settings' declarations, in the README's order."""
    return tuple(f for f in fields(Settings) if "kind" in f.metadata)


def _kind(f: Field[Any]) -> Kind:
    kind: Kind = f.metadata["kind"]
    return kind


def env_name(f: Field[Any]) -> str:
    return str(f.metadata["env"] or f"K2_{f.name.upper()}")


OPTION_NAMES = frozenset(f.name for f in knobs())
IDENTITY = frozenset({"client_id", "client_secret", "base_url"})


def options_from_env(env: Mapping[str, str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A provider's keyword arguments from the environment (every setting's variable, and
    ``K2_REDIS_URL``, else ``REDIS_URL``), then ``overrides``."""
    kwargs: dict[str, Any] = {
        "redis": env.get("K2_REDIS_URL") or env.get("REDIS_URL") or DEFAULT_REDIS_URL,
    }
    for f in knobs():
        raw = env.get(env_name(f), "")
        if raw.strip():
            kwargs[f.name] = _parse_env(f, raw)
    kwargs.update(overrides)
    missing = [n for n in ("client_id", "client_secret") if not kwargs.get(n)]
    if missing:
        names = " and ".join(env_name(Settings.__dataclass_fields__[n]) for n in missing)
        raise ConfigurationError(f"{names} must be set (environment or keyword argument)")
    return kwargs


def setting_from_env(name: str, env: Mapping[str, str]) -> Any:
    """One setting as :func:`options_from_env` reads it (its variable, else its default), for
    a command that needs it without the credentials."""
    f = Settings.__dataclass_fields__[name]
    raw = env.get(env_name(f), "")
    return _parse_env(f, raw) if raw.strip() else f.default


def _parse_env(f: Field[Any], raw: str) -> Any:
    try:
        return _kind(f).parse(raw)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{env_name(f)}: {exc}") from None


def configuration_table() -> str:
    """The README's configuration table, made from the declarations (a test keeps it equal)."""
    rows = ["| keyword | environment | default | meaning |", "|---|---|---|---|"]
    rows += [
        f"| `{f.name}` | `{env_name(f)}` | {_kind(f).show(f.default)} | {f.metadata['doc']} |"
        for f in knobs()
    ]
    return "\n".join(rows)
