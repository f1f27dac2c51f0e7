"""Helpers shared by the fault tests (Redis outages, hold-offs, bad input, encryption).

Kept out of conftest.py on purpose: conftest is shared with other suites, and these helpers are
plain functions and classes the fault tests import by name, so what a test relies on is visible
in its imports.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import redis

# Modules whose clock must not move with the provider's: the fake K2 server decides expiry on
# its own clock (a real server does not care about our clock), and the embedded Redis helpers
# only wait for a child process.
_CLOCK_UNTOUCHED = ("k2_shared_token.testing",)


class _ShiftedTime:
    """A stand-in for the ``time`` module whose ``monotonic()`` runs ``offset`` seconds ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class ShiftedClock:
    """Moves the library's monotonic clock forward without sleeping.

    Cooldowns and cache ages are real durations (seconds); waiting them out would make the tests
    slow and, worse, tempt anyone to shorten them until the test depends on scheduling. Instead
    every ``k2_shared_token`` module that reads ``time.monotonic()`` sees a clock that
    :meth:`advance` jumps forward, consistently for the provider, its store, the flow core and
    the background thread. Undone by ``monkeypatch`` at teardown.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._time = _ShiftedTime()
        patched = 0
        for name, module in list(sys.modules.items()):
            if not name.startswith("k2_shared_token") or name.startswith(_CLOCK_UNTOUCHED):
                continue
            if getattr(module, "time", None) is time:
                monkeypatch.setattr(module, "time", self._time)
                patched += 1
        assert patched, "no k2_shared_token module reads time.monotonic(): nothing to shift"

    def advance(self, seconds: float) -> None:
        self._time.offset += seconds


class LogCapture(logging.Handler):
    """Every record of the ``k2_shared_token`` loggers, for tests that cannot use ``caplog``
    (hypothesis runs many examples inside one test call, and needs them kept apart)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
        return "\n".join(formatter.format(r) for r in self.records)


@contextlib.contextmanager
def capture_logs() -> Iterator[LogCapture]:
    logger = logging.getLogger("k2_shared_token")
    handler = LogCapture()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    # Not also to pytest's capture: a failing property test would print every example's logs.
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


class KeyEvents:
    """Keyspace notifications for one key: what happened to it, in Redis's own order."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        client.config_set("notify-keyspace-events", "Kg$x")
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(f"__keyspace@0__:{key}")
        first = self._pubsub.get_message(timeout=5)
        assert first is not None and first["type"] == "subscribe"

    def until(self, *events: bytes, timeout: float = 10.0) -> list[bytes]:
        """Events up to and including the first of ``events`` (``set``, ``expire``, ``del``,
        ``expired``...); blocks on the socket, no polling."""
        seen: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=deadline - time.monotonic())
            if message is None or message["type"] != "message":
                continue
            seen.append(message["data"])
            if message["data"] in events:
                return seen
        raise AssertionError(f"none of {events} within {timeout} s; saw {seen}")

    def close(self) -> None:
        self._pubsub.close()


def maybe_bytes(client: redis.Redis, key: str) -> bytes | None:
    """A string key's bytes, or None if absent (the client returns bytes: no decode_responses)."""
    raw = client.get(key)
    assert raw is None or isinstance(raw, bytes)
    return raw


def stored_bytes(client: redis.Redis, key: str) -> bytes:
    """A string key's bytes; the key must exist."""
    raw = maybe_bytes(client, key)
    assert raw is not None, f"nothing under {key}"
    return raw


def warnings_with(records: Iterable[logging.LogRecord], fragment: str) -> list[str]:
    """The WARNING (or worse) messages that contain ``fragment``."""
    return [
        r.getMessage()
        for r in records
        if r.levelno >= logging.WARNING and fragment in r.getMessage()
    ]


def log_texts(records: Iterable[logging.LogRecord]) -> list[str]:
    """Everything a log handler could print: messages and formatted tracebacks."""
    formatter = logging.Formatter()
    out: list[str] = []
    for record in records:
        out.append(record.getMessage())
        if record.exc_info:
            out.append(formatter.formatException(record.exc_info))
    return out


def exception_texts(exc: BaseException | None) -> list[str]:
    """``str`` and ``repr`` of an exception and of every exception chained to it: a traceback
    prints the whole chain, so a secret in a ``__cause__`` leaks as surely as one on top."""
    out: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out += [str(exc), repr(exc), *(str(a) for a in exc.args)]
        # What a traceback shows: the cause, else the context unless ``from None`` hid it.
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def _as_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode()


def redis_contents(client: redis.Redis) -> list[bytes]:
    """Every key name and every stored byte string in the database, whatever the key's type."""
    out: list[bytes] = []
    for key in client.scan_iter(count=1000):
        items: list[Any] = [key]
        kind = client.type(key)
        if kind == b"string":
            items.append(client.get(key))
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                items += [field, value]
        elif kind == b"list":
            items += client.lrange(key, 0, -1)
        elif kind == b"set":
            items += client.smembers(key)
        elif kind == b"zset":
            items += client.zrange(key, 0, -1)
        out += [_as_bytes(item) for item in items if item is not None]
    return out


def assert_no_leak(
    *,
    secret: str,
    tokens: Iterable[str] = (),
    logs: Iterable[logging.LogRecord] = (),
    errors: Iterable[BaseException | None] = (),
    objects: Iterable[object] = (),
    client: redis.Redis | None = None,
) -> None:
    """The client secret and whole access tokens appear in no log record, no exception (or its
    chain) and no ``repr`` of ``objects``; the secret appears nowhere in Redis either.

    Tokens are allowed in Redis (that is the cache) but nowhere a human or a log pipeline reads.
    """
    texts = log_texts(logs)
    for error in errors:
        texts += exception_texts(error)
    for obj in objects:
        texts += [repr(obj), str(obj)]
    secrets = [secret, *(t for t in tokens if t)]
    for text in texts:
        for value in secrets:
            # A plain bool: pytest's rewritten ``x not in y`` would print the secret it found.
            found = value in text
            assert not found, "a secret or a whole token appears in a log, error or repr"
    if client is not None:
        needle = secret.encode()
        leaked = [blob[:40] for blob in redis_contents(client) if needle in blob]
        assert not leaked, f"the client secret is stored in Redis: {len(leaked)} value(s)"


def sweep(*items: Any) -> None:
    """Close whatever a test built, ignoring what was never started."""
    for item in items:
        close = getattr(item, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


__all__ = [
    "KeyEvents",
    "LogCapture",
    "ShiftedClock",
    "assert_no_leak",
    "capture_logs",
    "exception_texts",
    "log_texts",
    "maybe_bytes",
    "redis_contents",
    "stored_bytes",
    "sweep",
    "warnings_with",
]
