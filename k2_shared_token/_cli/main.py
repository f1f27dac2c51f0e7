"""``k2-token``: the command line (also ``python -m k2_shared_token``).

Configuration comes from flags or the variables ``SharedTokenProvider.from_env`` reads:
K2_CLIENT_ID, K2_CLIENT_SECRET, K2_BASE_URL, K2_REDIS_URL (else REDIS_URL) and
K2_TOKEN_ENCRYPTION_KEYS. ``get``, ``revoke``, ``introspect`` and ``info`` need the secret;
``status`` and ``invalidate`` work from the namespace (base URL and client id). No command
prints a token except ``get``: the others show its ``sha256:`` fingerprint.

Exit codes: 0 ok, 1 an invariant or a K2 error, 2 missing or bad configuration, 3 Redis
unreachable, 4 K2 rejected the credentials.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core.errors import (
    ConfigurationError,
    InvalidCredentialsError,
    K2TokenError,
    SharedCacheError,
)
from .._core.settings import (
    DEFAULT_REDIS_URL,
    IDENTITY,
    SANDBOX_URL,
    env_name,
    knobs,
    namespace_for,
    normalise_base_url,
    setting_from_env,
)
from .._redis import crypto
from .._version import __version__

if TYPE_CHECKING:
    from datetime import datetime

    from .._sync.provider import SharedTokenProvider
    from .._sync.store import RedisStore

# Commands whose module (and its imports: the test kit, an embedded Redis, the demo) loads
# only when the command runs, so ``k2-token --help`` and the token commands stay quick.
_DELEGATED = {
    "fake-server": ("..testing.fake_k2", "run the fake K2 auth server"),
    "demo": (".demo", "run a worker fleet on embedded Redis and a fake K2"),
}

EXIT_CODES: tuple[tuple[type[K2TokenError], int], ...] = (
    (ConfigurationError, 2),
    (SharedCacheError, 3),
    (InvalidCredentialsError, 4),
    (K2TokenError, 1),
)


def _config_flags(parser: argparse.ArgumentParser, *, secret: bool) -> None:
    env = os.environ.get
    parser.add_argument("--client-id", default=env("K2_CLIENT_ID"), help="default: $K2_CLIENT_ID")
    if secret:
        parser.add_argument(
            "--client-secret", default=env("K2_CLIENT_SECRET"), help="default: $K2_CLIENT_SECRET"
        )
    parser.add_argument(
        "--base-url", default=env("K2_BASE_URL") or SANDBOX_URL, help="default: $K2_BASE_URL"
    )
    parser.add_argument(
        "--redis-url",
        default=env("K2_REDIS_URL") or env("REDIS_URL") or DEFAULT_REDIS_URL,
        help="default: $K2_REDIS_URL, else $REDIS_URL",
    )
    parser.add_argument("--key-prefix", default=None, help="default: $K2_KEY_PREFIX, else k2")


def _store(args: argparse.Namespace) -> RedisStore:
    from .._redis.clients import redis_client  # noqa: PLC0415
    from .._redis.commands import Namespace  # noqa: PLC0415
    from .._redis.layout import Keys  # noqa: PLC0415
    from .._sync.store import RedisStore  # noqa: PLC0415

    if not args.client_id:
        raise ConfigurationError("K2_CLIENT_ID (or --client-id) must be set")
    base_url = normalise_base_url(args.base_url, allow_insecure_http=True)
    namespace = namespace_for(base_url, args.client_id)
    prefix = args.key_prefix or setting_from_env("key_prefix", os.environ)
    keys = Keys.for_namespace(prefix, namespace)
    keys_env = crypto.keys_from_env(os.environ.get(crypto.ENV_KEYS, ""))
    cipher = crypto.TokenCipher(keys_env, keys.token) if keys_env else None
    return RedisStore(
        redis_client(args.redis_url, 2.0), Namespace(keys, namespace, 15, cipher=cipher)
    )


def _provider(args: argparse.Namespace) -> SharedTokenProvider:
    """The provider the token commands use: the environment, then the flags."""
    from .._sync.provider import SharedTokenProvider  # noqa: PLC0415

    given = {f.name: getattr(args, f.name, None) for f in knobs()}
    given |= {
        "client_id": args.client_id,
        "client_secret": args.client_secret,
        "base_url": args.base_url,
        "redis": args.redis_url,
        "key_prefix": args.key_prefix,
        "on_redis_error": "raise",  # a command reports an unreachable Redis rather than hide it
    }
    overrides = {name: value for name, value in given.items() if value is not None}
    return SharedTokenProvider.from_env(os.environ, **overrides)


def _get(args: argparse.Namespace) -> int:
    with _provider(args) as provider:
        print(provider.get_token())
    return 0


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _revoke(args: argparse.Namespace) -> int:
    from .._core.tokens import fingerprint_of  # noqa: PLC0415

    with _provider(args) as provider:
        token = provider.get_token() if args.token is None else args.token
        dropped = provider.revoke(token)
    if args.json:
        out = {"revoked": True, "token": fingerprint_of(token), "shared_token_dropped": dropped}
        print(json.dumps(out, indent=2))
    else:
        shared = "dropped from Redis" if dropped else "it was not the shared token"
        print(f"revoked {fingerprint_of(token)} ({shared})")
    return 0


def _introspect(args: argparse.Namespace) -> int:
    from .._core.tokens import fingerprint_of  # noqa: PLC0415

    with _provider(args) as provider:
        token = provider.get_token() if args.token is None else args.token
        result = provider.introspect(token)
    out: dict[str, Any] = {
        "token": fingerprint_of(token),
        "active": result.active,
        "scope": result.scope,
        "client_id": result.client_id,
        "token_type": result.token_type,
        "exp": _when(result.exp),
        "iat": _when(result.iat),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        rows = [("token", out["token"]), ("active", "yes" if result.active else "no")]
        shown = ("scope", "client_id", "token_type", "exp", "iat")
        rows += [(k, str(out[k]) or "(none)") for k in shown if out[k] is not None]
        _rows(rows)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .._core.tokens import fingerprint_of  # noqa: PLC0415

    with _provider(args) as provider:
        info = provider.token_info()
        token = provider.get_token()  # the one asked about (after a 401 and the retry, the new one)
    fingerprint, created = fingerprint_of(token), _when(info.created_at)
    out: dict[str, Any] = {
        "token": fingerprint,
        "expires_in": info.expires_in,
        "scope": list(info.scope),
        "application_uid": info.application_uid,
        "created_at": created,
        "resource_owner_id": info.resource_owner_id,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        left = "-" if info.expires_in is None else f"{info.expires_in} s"
        _rows([
            ("token", fingerprint),
            ("expires in", left),
            ("scope", " ".join(info.scope) or "(none)"),
            ("application", info.application_uid or "-"),
            ("created at", created or "-"),
            ("resource owner", "-" if info.resource_owner_id is None
             else str(info.resource_owner_id)),
        ])  # fmt: skip
    return 0


def _tuning_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per setting, from its declaration (``--refresh-ahead`` for ``refresh_ahead``)."""
    for f in knobs():
        if f.name in IDENTITY or f.name in ("key_prefix", "on_redis_error", "encryption_keys"):
            continue
        kind = f.metadata["kind"]

        def parse(raw: str, kind: Any = kind) -> Any:
            try:
                return kind.parse(raw)
            except ConfigurationError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=parse,
            help=f"{f.metadata['doc']} (default: {kind.show(f.default)}; ${env_name(f)})",
        )


def _status(args: argparse.Namespace) -> int:
    status = _store(args).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    token, lock = status["token"], status["lock"]
    rows: list[tuple[str, str]] = [("namespace", status["namespace"])]
    if token is None:
        rows.append(("token", "none shared"))
    else:
        issued = token["issued_at"]
        rows += [
            ("token", token["fingerprint"]),
            ("seconds left", f"{token['seconds_left']:.1f} of {token['lifetime']:g}"),
            ("last exchange", "-" if not issued else
             time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(issued))
             + f", took {token['exchange_seconds']:.3f} s"),
        ]  # fmt: skip
    if lock is None:
        rows.append(("refresh lock", "free"))
    else:
        held = lock["held_for_seconds"]
        rows.append((
            "refresh lock",
            f"held by {lock['host']} pid {lock['pid']}"
            + (f" for {held:.1f} s" if held is not None else "")
            + f", lease ends in {lock['lease_left_seconds']:.1f} s",
        ))  # fmt: skip
    holdoff = status["holdoff"]
    if holdoff is not None:
        rows.append((
            "fleet hold-off",
            f"{holdoff['error']}, {holdoff['seconds_left']:.1f} s left, "
            f"{holdoff['failed_exchanges']} failed exchanges in a row",
        ))  # fmt: skip
    rows.append(("lock acquisitions", str(status["lock_acquisitions"])))
    rows.append(("server learned", ", ".join(status["server"]) or "nothing yet"))
    listening = status["listening"]
    rows.append((
        "processes listening",
        "unknown (PUBSUB not allowed)" if listening is None else
        f"{listening} (fleet backplane up; the others re-check every local_max_age)",
    ))  # fmt: skip
    _rows(rows)
    return 0


def _invalidate(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.force:
        deleted = store.clear()
    elif args.token:
        deleted = store.invalidate(args.token) == 1
    else:
        raise ConfigurationError("invalidate needs --token TOKEN (compare-and-delete) or --force")
    print("deleted" if deleted else "not deleted (no such shared token)")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    print(crypto.new_key())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2-token",
        description="Share one Kopo Kopo K2 access token across a fleet through Redis.",
        epilog="exit codes: 0 ok, 1 error, 2 configuration, 3 Redis unreachable, "
        "4 credentials rejected",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], text: str) -> Any:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(run=run)
        return sub

    p = command("get", _get, 'print a valid token, e.g. for curl -H "Authorization: Bearer ..."')
    _config_flags(p, secret=True)
    _tuning_flags(p)
    p = command("revoke", _revoke, "revoke a token at K2 (default: the shared one) and drop it")
    _config_flags(p, secret=True)
    _tuning_flags(p)
    p.add_argument("--token", help="the token to revoke (default: the current shared token)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command("introspect", _introspect, "ask K2 whether a token is active, and until when")
    _config_flags(p, secret=True)
    _tuning_flags(p)
    p.add_argument("--token", help="the token to introspect (default: the current shared token)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command("info", _info, "K2's token info for the current shared token")
    _config_flags(p, secret=True)
    _tuning_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command("status", _status, "show the shared token, the refresh lock and counters")
    _config_flags(p, secret=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command("invalidate", _invalidate, "drop the shared token")
    _config_flags(p, secret=False)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--token", help="delete only if this is still the shared token")
    group.add_argument("--force", action="store_true", help="delete whatever is shared")
    command("keygen", _keygen, f"print a new key for {crypto.ENV_KEYS} (token encryption)")
    for name, (_, text) in _DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)  # parsed by its own module
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of a whole command line, a delegated command's own included."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        module_name, text = _DELEGATED[argv[0]]
        module = importlib.import_module(module_name, __package__)
        parser = argparse.ArgumentParser(prog=f"k2-token {argv[0]}", description=text)
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        args.run = module.run_from_args
        return args
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.run(args))
    except K2TokenError as exc:
        print(f"k2-token: {type(exc).__name__}: {exc}", file=sys.stderr)
        return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))
    except KeyboardInterrupt:
        return 130
