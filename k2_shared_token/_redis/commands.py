"""What each store operation sends to Redis and how its reply is read, written once.

The stores (written once in :mod:`k2_shared_token._async.store`, generated for blocking
redis-py) only send and wait. Everything else (which script,
which keys, which arguments, what the reply means, what a pub/sub message means) lives here, so
sync and async workers of one deployment are guaranteed to speak the same protocol to the same
keys, and share one token and one lock.

Each operation is a :class:`Call`: a script with its keys and arguments, and the function that
turns the raw reply into the value the flow core expects.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis

from .._core.errors import SharedCacheError
from .._core.flow import LockAttempt, WaitOutcome, own_snapshot
from .._core.tokens import IssuedToken, Snapshot, StoredToken, fingerprint_of
from . import codec
from . import layout as redis_layout
from .crypto import TokenCipher
from .layout import Keys

log = logging.getLogger("k2_shared_token._redis.store")

R = TypeVar("R")


@dataclass(frozen=True)
class Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


_LOADED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def loaded_scripts(client: Any) -> set[str]:
    """SHA-1s of the scripts this client has run, shared by every store on the client.

    Scripts are sent whole on first use (EVAL), then by SHA (EVALSHA). redis-py's
    ``register_script`` starts with EVALSHA and, on the NOSCRIPT every fresh process gets, loads
    the script and calls again: three round trips on the cold path, where a stampeding fleet
    waits for them; EVAL caches the script as it runs it, so the first call costs one. Keyed by
    client, so a registry of a thousand namespaces on one client sends each script whole once,
    not a thousand times. After a Redis restart (empty script cache) one NOSCRIPT costs one more.
    """
    try:
        return _LOADED.setdefault(client, set())
    except TypeError:  # a client that cannot be weakly referenced: a cache of its own
        return set()


# A cluster client's own failures (no reachable node while it re-reads the slot map, a slot
# no node serves) are not RedisErrors; to a caller they are Redis failing like any other.
REDIS_FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException)


def cache_error(what: str, exc: BaseException) -> SharedCacheError:
    """The package's error for a failed Redis call: names the failure class, never its text
    (which can carry a URL with a password)."""
    return SharedCacheError(f"Redis failed during {what}: {type(exc).__name__}")


READ = Script.of(redis_layout.READ)
TRY_LOCK = Script.of(redis_layout.TRY_LOCK)
PUBLISH = Script.of(redis_layout.PUBLISH)
RELEASE = Script.of(redis_layout.RELEASE)
INVALIDATE = Script.of(redis_layout.INVALIDATE)
LEARN = Script.of(redis_layout.LEARN)


@dataclass(frozen=True)
class Call(Generic[R]):
    """One script run: ``what`` names it in errors, ``parse`` reads its reply."""

    what: str
    script: Script
    keys: list[str]
    args: list[Any]
    parse: Callable[[Any], R]


def lock_owner() -> str:
    """``host:pid:acquired_ms:random``: unique, and it tells an operator who holds the lock and
    since when (``k2-token status``)."""
    host = socket.gethostname()[:64].replace(":", "_")
    return f"{host}:{os.getpid()}:{int(time.time() * 1000)}:{secrets.token_hex(8)}"


def _text(raw: Any) -> str:
    return raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)


def _subscribers(reply: Any) -> int | None:
    """PUBSUB NUMSUB's count, or None where it is not allowed (a restricted ACL user)."""
    if isinstance(reply, list | tuple) and len(reply) == 2:
        return count(reply[1])
    return None


def count(raw: Any) -> int:
    """A counter read back for display; anything that is not one (foreign data) reads as 0."""
    text = _text(raw)
    return int(text) if text.isdigit() and len(text) <= 18 else 0


class Namespace:
    """The protocol of one namespace: keys, script calls, and decoding what comes back."""

    def __init__(
        self,
        keys: Keys,
        namespace: str,
        lock_lease: float,
        *,
        credentials: str = "",
        cipher: TokenCipher | None = None,
    ) -> None:
        """``credentials`` is the secret's fingerprint (:func:`backoff.credentials_fingerprint`):
        a credentials hold-off set by workers with another secret does not bind this one."""
        self.keys = keys
        self.namespace = namespace
        self.lease_ms = int(lock_lease * 1000)
        self.credentials = credentials
        self.cipher = cipher
        self._last_decoded: tuple[bytes, StoredToken] | None = None
        # Owners of lock attempts whose reply never came: Redis may still run them (a healed
        # partition delivers what it held back) and hold the lock a lease long for nobody.
        # Two threads can fail at once (a caller and the background refresh): the list is
        # read, changed and written under a lock, or one of them loses the other's entry.
        self._unanswered: list[str] = []
        self._unanswered_lock = threading.Lock()

    def snapshot(self, raw: bytes | str | None, ttl_ms: int) -> Snapshot | None:
        """Decode a raw value, treating anything unreadable or expiring as a miss."""
        if isinstance(raw, (bytes, str)) and ttl_ms == -1:
            log.warning(
                "namespace %s: ignoring unreadable token value (no expiry: not ours); "
                "it will be overwritten",
                self.namespace,
            )
            return None
        if not isinstance(raw, (bytes, str)) or ttl_ms <= 0:
            return None
        if isinstance(raw, str):  # a client built with decode_responses=True
            raw = raw.encode()
        last = self._last_decoded
        try:
            # Most reads return the bytes of the previous one: skip the JSON and digest work.
            stored = (
                last[1] if last is not None and last[0] == raw else codec.decode(raw, self.cipher)
            )
        except codec.CorruptValueError as exc:
            log.warning(
                "namespace %s: ignoring unreadable token value (%s); it will be overwritten",
                self.namespace,
                exc,
            )
            return None
        self._last_decoded = (raw, stored)
        return Snapshot(stored, ttl_ms, time.monotonic(), time.time())

    # -- script calls ------------------------------------------------------------------------

    def read(self) -> Call[tuple[Snapshot | None, int]]:
        """The token, and the lock's PTTL (a waiter's "has the holder finished?")."""
        return Call(
            "read",
            READ,
            [self.keys.token, self.keys.lock],
            [],
            lambda reply: self.read_reply(*reply),
        )

    def read_reply(self, raw: Any, ttl: Any, lock_ttl: Any) -> tuple[Snapshot | None, int]:
        return self.snapshot(raw, int(ttl)), int(lock_ttl)

    def try_lock(self, min_ttl_ms: int) -> Call[LockAttempt]:
        owner = lock_owner()
        k = self.keys

        def parse(reply: Any) -> LockAttempt:
            outcome, number, raw, ttl, extra, *server = reply
            traits = _text(server[0] if server else "").split(",")
            got = outcome == 1
            text = _text(extra)
            return LockAttempt(
                acquired=got,
                skipped=outcome == 2,
                fence=int(number) if got else 0,
                lock_ttl_ms=int(number) if outcome == 0 else 0,
                snapshot=self.snapshot(raw, int(ttl)),
                owner=owner,
                streak=count(text) if got else 0,
                holdoff_code=text if outcome == 3 else None,
                holdoff_ms=int(number) if outcome == 3 else 0,
                reuse="reuse" in traits,
                revoke="revoke" in traits,
            )

        return Call(
            "lock",
            TRY_LOCK,
            [k.token, k.lock, k.fence, k.backoff, k.failures, k.server],
            [owner, self.lease_ms, min_ttl_ms, self.credentials, k.channel],
            parse,
        )

    def publish(
        self,
        lock: LockAttempt,
        issued: IssuedToken,
        reuse: bool = False,
        keep: Snapshot | None = None,
    ) -> tuple[Snapshot, Call[bool]]:
        """The token as this holder will hold it, and the write: the lock given back instead if
        the token died since the flow judged it alive (nothing to share, and the waiters must
        not sit out the lease). ``reuse`` (see :class:`.flow.Publish`) is also recorded for the
        namespace, so the fleet remembers it past this token's life."""
        snap = own_snapshot(issued, lock.fence, time.monotonic(), reuse=reuse, keep=keep)
        stored, k = snap.stored, self.keys
        if snap.ttl_ms <= 0:
            return snap, self._release(lock.owner, codec.RELEASED, "", 0)
        value = codec.encode(
            stored.value,
            stored.token_type,
            stored.lifetime,
            stored.fence,
            issued_at=stored.issued_at,
            took_ms=stored.took_ms,
            reuse=stored.reuse,
            cipher=self.cipher,
        )

        def parse(written: Any) -> bool:
            if not written:
                log.warning(
                    "namespace %s: a newer lock holder exists; this token was kept "
                    "local and not shared",
                    self.namespace,
                )
            return bool(written)

        call = Call(
            "publish",
            PUBLISH,
            [k.token, k.lock, k.fence, k.backoff, k.failures, k.server],
            [lock.owner, lock.fence, value, snap.ttl_ms, k.channel, "reuse" if reuse else ""],
            parse,
        )
        return snap, call

    def release(
        self, lock: LockAttempt, error_code: str, holdoff_ms: int = 0, credentials: bool = False
    ) -> Call[bool]:
        # Announced either way: a waiter would otherwise sit out the rest of the lease for a
        # lock given back without a token (an interrupted holder, an expired reply).
        message = codec.announce_failure(error_code, holdoff_ms) if error_code else codec.RELEASED
        holdoff = ""
        if error_code and holdoff_ms > 0:
            holdoff = f"{error_code}:{self.credentials if credentials else ''}"
        return self._release(lock.owner, message, holdoff, holdoff_ms)

    def _release(self, owner: str, message: str, holdoff: str, holdoff_ms: int) -> Call[bool]:
        k = self.keys
        return Call(
            "release",
            RELEASE,
            [k.lock, k.backoff, k.failures],
            [owner, k.channel, message, holdoff, max(holdoff_ms, 1)],
            bool,
        )

    def unanswered(self, call: Call[Any]) -> None:
        """A call failed without a reply; if it was a lock attempt, release it later."""
        if call.script is TRY_LOCK:
            with self._unanswered_lock:
                self._unanswered = [*self._unanswered[-7:], call.args[0]]

    def cleanups(self) -> list[Call[bool]]:
        """Owner-only releases of unanswered lock attempts, for the store to send once Redis
        answers again: an orphaned lock would otherwise make the fleet wait out its lease."""
        if not self._unanswered:  # the common case, without the lock
            return []
        with self._unanswered_lock:
            owners, self._unanswered = self._unanswered, []
        return [self._release(owner, codec.RELEASED, "", 0) for owner in owners]

    def orphaned(self, releases: list[Call[bool]]) -> None:
        """Releases from :meth:`cleanups` that were not sent: kept for the next chance."""
        with self._unanswered_lock:
            owners = [call.args[0] for call in releases]
            self._unanswered = [*owners, *self._unanswered][-8:]  # older first: keep the newest

    def learn(self, trait: str) -> Call[Any]:
        """Record a trait of K2's server for the namespace (see :data:`redis_layout.LEARN`)."""
        return Call("learn", LEARN, [self.keys.server], [trait], lambda reply: reply)

    def invalidate(self, token: str) -> Call[int]:
        k = self.keys
        return Call(
            "invalidate", INVALIDATE, [k.token, k.lock], [codec.digest(token), k.channel], int
        )

    # -- the waiter's subscription -----------------------------------------------------------

    @staticmethod
    def after_subscribe(
        snap: Snapshot | None, lock_ttl: int, min_ttl_ms: int, replacing: bool = False
    ) -> WaitOutcome | None:
        """The re-read right after subscribing: done already, or keep listening (None).

        It closes the gap in which a token written (or a lock released) between the caller's
        last look and the subscription would otherwise be missed: the caller would sit out the
        rest of the lease for nothing. ``replacing``: the token Redis has is being revoked by
        the holder's exchange, so only the holder's announcement (or its end) will do.
        """
        if lock_ttl == -2:  # the holder finished before we listened: try again now
            return WaitOutcome(snap if snap is not None and snap.ttl_ms > min_ttl_ms else None)
        if snap is not None and snap.ttl_ms > min_ttl_ms and not replacing:
            return WaitOutcome(snap)
        return None

    def announcement(self, data: bytes | str) -> codec.Announcement | None:
        """A message on the namespace channel, decoded; None (logged) if it is not ours."""
        try:
            raw = data.encode() if isinstance(data, str) else data
            return codec.decode_announcement(raw, self.cipher)
        except codec.CorruptValueError as exc:
            log.warning("namespace %s: ignoring unreadable announcement (%s)", self.namespace, exc)
            return None

    def on_message(self, data: bytes | str) -> WaitOutcome | None:
        """A message on the namespace channel, to a waiter: a token, a failure, or nothing."""
        ann = self.announcement(data)
        if ann is None:
            return None
        if ann.error_code is not None:
            return WaitOutcome(None, ann.error_code, holdoff_ms=ann.holdoff_ms)
        if ann.released:  # the lock is free again: try for it now
            return WaitOutcome(None)
        if ann.stored is None:  # a token dropped: nothing for a waiter
            return None
        return WaitOutcome(Snapshot(ann.stored, ann.ttl_ms, time.monotonic(), time.time()))

    # -- status ------------------------------------------------------------------------------

    def status_keys(self) -> list[tuple[str, str]]:
        """The plain commands ``status`` pipelines, in the order :meth:`status` reads them."""
        k = self.keys
        return [
            ("GET", k.token),
            ("PTTL", k.token),
            ("GET", k.lock),
            ("PTTL", k.lock),
            ("GET", k.backoff),
            ("PTTL", k.backoff),
            ("GET", k.fence),
            ("GET", k.failures),
            ("GET", k.server),
            ("PUBSUB NUMSUB", k.channel),
        ]

    def status(self, replies: list[Any]) -> dict[str, Any]:
        """The shared state of this namespace, for operators; never the token itself."""
        raw, ttl, owner, lock_ttl, backoff, backoff_ttl, fence, failures, server, listening = (
            replies
        )
        now = time.time()
        out: dict[str, Any] = {
            "namespace": self.namespace,
            "token": None,
            "lock": None,
            "lock_acquisitions": count(fence),
            "holdoff": None,
            "server": [t for t in _text(server).split(",") if t] if server else [],
            # Processes subscribed to the namespace: with the fleet backplane up (and any caller
            # waiting for a lock holder). Those not counted re-check every local_max_age.
            "listening": _subscribers(listening),
        }
        if isinstance(backoff, (bytes, str)) and int(backoff_ttl) > 0:
            out["holdoff"] = {
                "error": _text(backoff).partition(":")[0][:64],
                "seconds_left": round(int(backoff_ttl) / 1000, 3),
                "failed_exchanges": count(failures),
            }
        snap = self.snapshot(raw, int(ttl))
        if snap is not None:
            stored = snap.stored
            out["token"] = {
                "fingerprint": fingerprint_of(stored.value),
                "seconds_left": round(snap.ttl_ms / 1000, 3),
                "lifetime": stored.lifetime,
                "issued_at": stored.issued_at or None,
                "exchange_seconds": stored.took_ms / 1000,
            }
        if isinstance(owner, (bytes, str)):
            text = owner.decode(errors="replace") if isinstance(owner, bytes) else str(owner)
            host, pid, since_ms, _ = [*text.split(":", 3), "", "", ""][:4]
            plausible = since_ms.isascii() and since_ms.isdigit() and len(since_ms) <= 15
            since = int(since_ms) / 1000 if plausible else None
            out["lock"] = {
                "host": host,
                "pid": int(pid) if pid.isascii() and pid.isdigit() and len(pid) <= 10 else None,
                "held_for_seconds": round(now - since, 3) if since else None,
                "lease_left_seconds": round(int(lock_ttl) / 1000, 3),
            }
        return out
