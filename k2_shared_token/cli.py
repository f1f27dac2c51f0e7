"""``k2-token``: the command line (also ``python -m k2_shared_token``)."""

from __future__ import annotations

import argparse
import sys

from . import demo, fake_server
from ._version import __version__
from .errors import K2TokenError
from .provider import SharedTokenProvider


def _get(args: argparse.Namespace) -> int:
    with SharedTokenProvider.from_env() as provider:
        print(provider.get_token())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2-token",
        description="Share one Kopo Kopo K2 access token across a fleet through Redis.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="run a worker fleet on embedded Redis and a fake K2")
    demo.add_arguments(p)
    p.set_defaults(run=demo.run_from_args)
    p = commands.add_parser("fake-server", help="run the fake K2 auth server in the foreground")
    fake_server.add_arguments(p)
    p.set_defaults(run=fake_server.run_from_args)
    p = commands.add_parser(
        "get", help="print a valid token (configuration from K2_* and REDIS_URL variables)"
    )
    p.set_defaults(run=_get)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except K2TokenError as exc:
        print(f"k2-token: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
