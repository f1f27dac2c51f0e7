"""URL forms for the Redis topologies that redis-py has no URL for.

redis-py's ``from_url`` knows one server (``redis://``, ``rediss://``, ``unix://``). A fleet
configured by one string (``K2_REDIS_URL``) also needs to reach a Redis Cluster, where any
startup node may be down when a process starts, and a Sentinel-managed primary, which is found
through the sentinels by name rather than by address. These two forms carry that:

    redis+cluster://host:port[,host:port...][/]
    redis+sentinel://host:port[,host:port...]/<primary name>[/<db>]

Every address needs its port (cluster nodes and sentinels have different defaults, and guessing
one hides a typo); IPv6 hosts go in brackets, ``[::1]:7000``. A cluster has only database 0, so
its path is empty, ``/`` or ``/0``. Credentials, TLS and query options are not part of these
forms: for a password-protected or TLS deployment pass a redis-py client built with them.

Error messages never quote the URL, which might carry a secret the caller put there anyway.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

__all__ = [
    "CLUSTER_SCHEME",
    "SENTINEL_SCHEME",
    "Address",
    "parse_cluster_url",
    "parse_sentinel_url",
    "scheme_of",
]

CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"

Address = tuple[str, int]


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased ('' if it has none)."""
    scheme, sep, _rest = url.strip().partition("://")
    return scheme.lower() if sep else ""


def _addresses(netloc: str) -> list[Address]:
    if "@" in netloc:
        raise ValueError(
            "credentials are not part of this URL form; pass a redis-py client built with them"
        )
    addresses: list[Address] = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isascii() or not port.isdigit():
            raise ValueError(f"address {item!r} is not host:port")
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(f"port {number} in address {item!r} is out of range")
        addresses.append((host, number))
    return addresses


def _split(url: str, scheme: str) -> tuple[list[Address], list[str]]:
    """Addresses and non-empty path segments of a ``<scheme>://`` URL."""
    if scheme_of(url) != scheme:
        raise ValueError(f"not a {scheme}:// URL (scheme {scheme_of(url)!r})")
    parts = urlsplit(url.strip())
    if parts.query or parts.fragment:
        raise ValueError(f"query options are not part of the {scheme}:// URL form")
    return _addresses(parts.netloc), [unquote(s) for s in parts.path.split("/") if s]


def parse_cluster_url(url: str) -> list[Address]:
    """The startup nodes of ``redis+cluster://h1:p1,h2:p2[/]``."""
    addresses, path = _split(url, CLUSTER_SCHEME)
    if path not in ([], ["0"]):
        raise ValueError("a cluster URL has no path but an optional /0 (cluster mode has db 0)")
    return addresses


def parse_sentinel_url(url: str) -> tuple[list[Address], str, int]:
    """The sentinels, primary name and db of ``redis+sentinel://h1:p1,h2:p2/<name>[/<db>]``."""
    addresses, path = _split(url, SENTINEL_SCHEME)
    if not path or len(path) > 2:
        raise ValueError("expected /<master name>[/<db>] after the sentinel addresses")
    db = path[1] if len(path) == 2 else "0"
    if not db.isascii() or not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    return addresses, path[0], int(db)
