"""The Redis side, for blocking redis-py clients: keys, scripts and the waiter's subscription.

One method per script in :mod:`.redis_layout`, each one round trip. Every redis error becomes a
:class:`SharedCacheError` (chained), so callers never see a raw redis exception, and every value
read back goes through :func:`codec.decode`: a value that is not ours reads as a miss, logged
once per distinct problem, and is overwritten by the next write.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from . import codec, redis_layout
from .access_token import fingerprint_of
from .crypto import TokenCipher
from .errors import SharedCacheError
from .flow import IssuedToken, LockAttempt, WaitOutcome, own_snapshot
from .freshness import Snapshot
from .redis_layout import Keys

log = logging.getLogger("k2_shared_token.store")

T = TypeVar("T")


class LuaScript:
    """A script sent whole on first use, then by its SHA-1.

    redis-py's ``register_script`` starts with EVALSHA and, on the NOSCRIPT error every fresh
    process gets, loads the script and calls again: three round trips on the cold path, where a
    stampeding fleet waits for them. EVAL caches the script as it runs it, so the first call
    costs one round trip; after a Redis restart (empty script cache) one NOSCRIPT costs one more.
    """

    def __init__(self, client: Any, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._cached = False

    def __call__(self, keys: list[str], args: list[Any] | tuple[Any, ...] = ()) -> Any:
        if self._cached:
            try:
                return self.client.evalsha(self.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                pass
        result = self.client.eval(self.source, len(keys), *keys, *args)
        self._cached = True
        return result


class PipelinedRead:
    """The read as three plain commands in one write: GET token, PTTL token, PTTL lock.

    Same round trip as the READ script, but Redis runs no Lua and redis-py builds no command
    objects: about 1.1x a bare GET instead of 1.4x, which is what a worker with
    ``local_cache=False`` pays per call. Redis executes a client's pipelined commands from one
    read of its socket back to back, so the value and its TTL describe the same write; the
    Lua script remains the fallback for clients without a plain connection pool (Cluster).
    """

    def __init__(self, pool: Any, keys: Keys) -> None:
        self._pool = pool
        self._commands = (("GET", keys.token), ("PTTL", keys.token), ("PTTL", keys.lock))
        self._packed: list[bytes] | None = None

    @classmethod
    def for_client(cls, client: Any, keys: Keys) -> PipelinedRead | None:
        pool = getattr(client, "connection_pool", None)
        if not isinstance(client, redis.Redis) or not isinstance(pool, redis.ConnectionPool):
            return None
        return cls(pool, keys)

    def read(self) -> tuple[Any, Any, Any]:
        for attempt in (1, 2):  # one retry on a fresh connection, as the client's Retry does
            conn = self._pool.get_connection()
            try:
                if self._packed is None:
                    self._packed = conn.pack_commands(self._commands)
                conn.send_packed_command(self._packed)
                return self._reply(conn), self._reply(conn), self._reply(conn)
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                conn.disconnect()  # replies may be left unread: never reuse this connection
                raise
            finally:
                self._pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _reply(conn: Any) -> Any:
        try:
            return conn.read_response()
        except redis.ResponseError:  # WRONGTYPE: someone else's data under our key
            return b"!wrongtype"


def lock_owner() -> str:
    """``host:pid:acquired_ms:random``: unique, and it tells an operator who holds the lock and
    since when (``k2-token status``)."""
    host = socket.gethostname()[:64].replace(":", "_")
    return f"{host}:{os.getpid()}:{int(time.time() * 1000)}:{secrets.token_hex(8)}"


def _count(raw: Any) -> int:
    """A counter read back for display; anything that is not one (foreign data) reads as 0."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    return int(text) if text.isdigit() else 0


def _guard(what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except redis.RedisError as exc:
        raise SharedCacheError(f"Redis failed during {what}: {type(exc).__name__}") from exc


class RedisStore:
    """All Redis I/O of one namespace."""

    def __init__(
        self,
        client: Any,
        keys: Keys,
        lock_lease: float,
        namespace: str,
        *,
        credentials: str = "",
        cipher: TokenCipher | None = None,
    ) -> None:
        """``credentials`` is the secret's fingerprint (:func:`backoff.credentials_fingerprint`):
        a credentials hold-off set by workers with another secret does not bind this one."""
        self.client = client
        self.keys = keys
        self.namespace = namespace
        self._credentials = credentials
        self._cipher = cipher
        self._lease_ms = int(lock_lease * 1000)
        self._read = LuaScript(client, redis_layout.READ)
        self._pipelined = PipelinedRead.for_client(client, keys)
        self._try_lock = LuaScript(client, redis_layout.TRY_LOCK)
        self._publish = LuaScript(client, redis_layout.PUBLISH)
        self._release = LuaScript(client, redis_layout.RELEASE)
        self._invalidate = LuaScript(client, redis_layout.INVALIDATE)
        self._last_decoded: tuple[bytes, codec.StoredToken] | None = None

    def snapshot(self, raw: bytes | str | None, ttl_ms: int) -> Snapshot | None:
        """Decode a raw value, treating anything unreadable or expiring as a miss."""
        if raw is None or ttl_ms <= 0:
            return None
        if isinstance(raw, str):  # a client built with decode_responses=True
            raw = raw.encode()
        last = self._last_decoded
        try:
            # Most reads return the bytes of the previous one: skip the JSON and digest work.
            stored = (
                last[1] if last is not None and last[0] == raw else codec.decode(raw, self._cipher)
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

    def read(self) -> Snapshot | None:
        return self._read_with_lock()[0]

    def _read_with_lock(self) -> tuple[Snapshot | None, int]:
        if self._pipelined is not None:
            raw, ttl, lock_ttl = _guard("read", self._pipelined.read)
        else:
            raw, ttl, lock_ttl = _guard(
                "read", lambda: self._read(keys=[self.keys.token, self.keys.lock])
            )
        return self.snapshot(raw, int(ttl)), int(lock_ttl)

    def try_lock(self, min_ttl_ms: int) -> LockAttempt:
        owner = lock_owner()
        k = self.keys
        outcome, number, raw, ttl, extra = _guard(
            "lock",
            lambda: self._try_lock(
                keys=[k.token, k.lock, k.fence, k.backoff, k.failures],
                args=[owner, self._lease_ms, min_ttl_ms, self._credentials],
            ),
        )
        got = outcome == 1
        extra = extra.decode("ascii", "replace") if isinstance(extra, bytes) else str(extra)
        return LockAttempt(
            acquired=got,
            skipped=outcome == 2,
            fence=int(number) if got else 0,
            lock_ttl_ms=int(number) if outcome == 0 else 0,
            snapshot=self.snapshot(raw, int(ttl)),
            owner=owner,
            streak=int(extra) if got and extra.isdigit() else 0,
            holdoff_code=extra if outcome == 3 else None,
            holdoff_ms=int(number) if outcome == 3 else 0,
        )

    def publish(self, lock: LockAttempt, issued: IssuedToken) -> Snapshot:
        snap = own_snapshot(issued, lock.fence, time.monotonic())
        stored, ttl_ms, k = snap.stored, snap.ttl_ms, self.keys
        if ttl_ms > 0:
            value = codec.encode(
                stored.value,
                stored.token_type,
                stored.lifetime,
                stored.fence,
                issued_at=stored.issued_at,
                took_ms=stored.took_ms,
                cipher=self._cipher,
            )
            written = _guard(
                "publish",
                lambda: self._publish(
                    keys=[k.token, k.lock, k.fence, k.backoff, k.failures],
                    args=[lock.owner, lock.fence, value, ttl_ms, k.channel],
                ),
            )
            if not written:
                log.warning(
                    "namespace %s: a newer lock holder exists; this token was kept "
                    "local and not shared",
                    self.namespace,
                )
        return snap

    def release(
        self, lock: LockAttempt, error_code: str, holdoff_ms: int = 0, credentials: bool = False
    ) -> None:
        message = codec.announce_failure(error_code, holdoff_ms) if error_code else ""
        holdoff = ""
        if error_code and holdoff_ms > 0:
            holdoff = f"{error_code}:{self._credentials if credentials else ''}"
        k = self.keys
        _guard(
            "release",
            lambda: self._release(
                keys=[k.lock, k.backoff, k.failures],
                args=[lock.owner, k.channel, message, holdoff, max(holdoff_ms, 1)],
            ),
        )

    def clear(self) -> bool:
        """Unconditional delete of the shared token (``k2-token invalidate --force``)."""
        return bool(_guard("clear", lambda: self.client.delete(self.keys.token)))

    def status(self) -> dict[str, Any]:
        """The shared state of this namespace, for operators; never the token itself."""

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for key in (self.keys.token, self.keys.lock, self.keys.backoff):
                pipe.get(key)
                pipe.pttl(key)
            pipe.get(self.keys.fence)
            pipe.get(self.keys.failures)
            return list(pipe.execute(raise_on_error=False))

        raw, ttl, owner, lock_ttl, backoff, backoff_ttl, fence, failures = _guard("status", read)
        now = time.time()
        out: dict[str, Any] = {
            "namespace": self.namespace,
            "token": None,
            "lock": None,
            "lock_acquisitions": _count(fence),
            "holdoff": None,
        }
        if isinstance(backoff, (bytes, str)) and int(backoff_ttl) > 0:
            text = backoff.decode("ascii", "replace") if isinstance(backoff, bytes) else backoff
            out["holdoff"] = {
                "error": text.partition(":")[0][:64],
                "seconds_left": round(int(backoff_ttl) / 1000, 3),
                "failed_exchanges": _count(failures),
            }
        snap = self.snapshot(raw, int(ttl)) if isinstance(raw, (bytes, str)) else None
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
            since = int(since_ms) / 1000 if since_ms.isascii() and since_ms.isdigit() else None
            out["lock"] = {
                "host": host,
                "pid": int(pid) if pid.isascii() and pid.isdigit() else None,
                "held_for_seconds": round(now - since, 3) if since else None,
                "lease_left_seconds": round(int(lock_ttl) / 1000, 3),
            }
        return out

    def invalidate(self, token: str) -> bool:
        return bool(
            _guard(
                "invalidate",
                lambda: self._invalidate(keys=[self.keys.token], args=[codec.digest(token)]),
            )
        )

    def wait(self, timeout: float, min_ttl_ms: int) -> WaitOutcome:
        """Subscribe, re-read, then block on the channel until an announcement or ``timeout``.

        The re-read after the subscription is confirmed closes the gap in which a token written
        (or a lock released) between the caller's last look and the subscription would
        otherwise be missed: the caller would sit out the rest of the lease for nothing.
        """
        deadline = time.monotonic() + timeout
        pubsub = self.client.pubsub()
        try:
            return _guard("wait", lambda: self._wait(pubsub, deadline, min_ttl_ms))
        finally:
            _guard("unsubscribe", pubsub.close)

    def _wait(self, pubsub: Any, deadline: float, min_ttl_ms: int) -> WaitOutcome:
        pubsub.subscribe(self.keys.channel)
        subscribed = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return WaitOutcome(None, timed_out=True)
            message = pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "subscribe":
                subscribed = True
                snap, lock_ttl = self._read_with_lock()
                if snap is not None and snap.ttl_ms > min_ttl_ms:
                    return WaitOutcome(snap)
                if lock_ttl == -2:  # the holder finished before we listened: try again now
                    return WaitOutcome(None)
                continue
            if message["type"] != "message" or not subscribed:
                continue
            try:
                data = message["data"]
                raw = data.encode() if isinstance(data, str) else data
                ann = codec.decode_announcement(raw, self._cipher)
            except codec.CorruptValueError as exc:
                log.warning(
                    "namespace %s: ignoring unreadable announcement (%s)", self.namespace, exc
                )
                continue
            if ann.error_code is not None:
                return WaitOutcome(None, ann.error_code, holdoff_ms=ann.holdoff_ms)
            assert ann.stored is not None
            return WaitOutcome(Snapshot(ann.stored, ann.ttl_ms, time.monotonic(), time.time()))
