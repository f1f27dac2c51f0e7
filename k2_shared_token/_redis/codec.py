"""How a token is written into Redis and announced to waiters.

A stored value is ``<fence>:<digest>:<payload>``:

- ``fence`` is the number the writer got when it took the lock; the write script compares it with
  the newest number handed out, so a writer that stalled past its lease cannot overwrite a newer
  token (Kleppmann's fencing token);
- ``digest`` is SHA-256 of the access token (hex, 128 bits), which lets ``invalidate`` compare and
  delete in Lua without the token itself crossing the wire again;
- ``payload`` is compact JSON: the token, its type, and the lifetime K2 granted (the refresh
  windows scale down for short-lived tokens, and every reader must compute the same windows);
  sealed with AES-GCM when encryption is on (:mod:`.crypto`), the prefix staying in clear for Lua.

The announcement published on the namespace channel is ``T<ttl_ms>:<stored value>`` when a token
was written (waiters need no extra read) or ``E<error code>[:<hold-off ms>]`` when the lock holder
gave up (and the fleet will not ask K2 again for that long).

Decoding is strict: anything else under our key (another program's data, a truncated write, a
different Redis type) is rejected with :class:`CorruptValueError` and read as a miss.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._core.tokens import StoredToken

if TYPE_CHECKING:
    from .crypto import TokenCipher

_VALUE_RE = re.compile(rb"^(\d{1,19}):([0-9a-f]{32}):(.{1,16384})$", re.DOTALL)
MAX_TOKEN_CHARS = 4096
MAX_LIFETIME = 10 * 366 * 86400
_ANNOUNCED_TTL = re.compile(rb"[0-9]{1,12}")
_DIGEST = re.compile(rb"[0-9a-f]{32}")


class CorruptValueError(ValueError):
    """A value under one of our keys that we did not write (or cannot read)."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:32]


def encode(
    value: str,
    token_type: str,
    lifetime: float,
    fence: int,
    *,
    issued_at: float = 0.0,
    took_ms: int = 0,
    reuse: bool = False,
    cipher: TokenCipher | None = None,
) -> bytes:
    fields: dict[str, object] = {
        "access_token": value,
        "token_type": token_type,
        "lifetime": lifetime,
        "issued_at": round(issued_at, 3),
        "took_ms": took_ms,
    }
    if reuse:
        fields["reuse"] = True  # every reader must use the same (reuse) windows
    payload = json.dumps(fields, separators=(",", ":")).encode()
    header = f"{fence}:{digest(value)}".encode()
    if cipher is not None:
        payload = cipher.seal(payload, header)
    return header + b":" + payload


def _optional_number(data: dict[str, object], key: str) -> float:
    """Provenance fields only inform ``status``: a missing or odd one reads as 0, not corrupt."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if 0 <= value <= 10**11 else 0.0


def decode(raw: bytes, cipher: TokenCipher | None = None) -> StoredToken:
    match = _VALUE_RE.match(raw)
    if match is None:
        raise CorruptValueError("not a k2_shared_token value")
    fence, expected_digest, payload = match.groups()
    if cipher is not None:
        from .crypto import SealError  # noqa: PLC0415 - only with encryption on

        try:
            payload = cipher.open(payload, fence + b":" + expected_digest)
        except SealError as exc:
            raise CorruptValueError(str(exc)) from None
    elif payload.startswith(b"~"):
        raise CorruptValueError("encrypted, and this worker has no encryption key")
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        raise CorruptValueError("payload is not JSON") from None
    if not isinstance(data, dict):
        raise CorruptValueError("payload is not an object")
    value, token_type, lifetime = (
        data.get("access_token"),
        data.get("token_type"),
        data.get("lifetime"),
    )
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TOKEN_CHARS:
        raise CorruptValueError("access_token missing or not a string")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise CorruptValueError("token_type is not Bearer")
    if (
        isinstance(lifetime, bool)
        or not isinstance(lifetime, (int, float))
        or not 0 < lifetime <= MAX_LIFETIME  # also rejects NaN, and ints beyond float range
    ):
        raise CorruptValueError("lifetime missing or out of range")
    if digest(value).encode() != expected_digest:
        raise CorruptValueError("digest does not match the token")
    return StoredToken(
        value,
        token_type,
        float(lifetime),
        int(fence),
        _optional_number(data, "issued_at"),
        int(_optional_number(data, "took_ms")),
        data.get("reuse") is True,
    )


@dataclass(frozen=True)
class Announcement:
    """A decoded channel message: a token with its TTL at publish time, or a failure code."""

    stored: StoredToken | None
    ttl_ms: int
    error_code: str | None
    holdoff_ms: int = 0  # with a failure: how long the fleet will not ask K2 again
    dropped: str | None = None  # the digest of a token invalidated or revoked: drop it
    replacing: bool = False  # an exchange began, and K2 revokes the previous token on issue
    released: bool = False  # the lock was given back without a token: a waiter tries again now


RELEASED = "R"  # the announcement of a lock given back with neither token nor failure


def announce_failure(code: str, holdoff_ms: int = 0) -> str:
    return f"E{code}:{holdoff_ms}" if holdoff_ms > 0 else "E" + code


def decode_announcement(raw: bytes, cipher: TokenCipher | None = None) -> Announcement:
    if raw.startswith(b"E"):
        code, _, holdoff = raw[1:].partition(b":")
        ms = int(holdoff) if _ANNOUNCED_TTL.fullmatch(holdoff) else 0
        return Announcement(None, 0, code[:64].decode("ascii", "replace"), ms)
    if raw.startswith(b"T"):
        ttl, sep, value = raw[1:].partition(b":")
        if sep and _ANNOUNCED_TTL.fullmatch(ttl):
            return Announcement(decode(value, cipher), int(ttl), None)
    if raw == b"X":
        return Announcement(None, 0, None, replacing=True)
    if raw == RELEASED.encode():
        return Announcement(None, 0, None, released=True)
    if raw.startswith(b"D") and _DIGEST.fullmatch(raw[1:]):
        return Announcement(None, 0, None, dropped=raw[1:].decode("ascii"))
    raise CorruptValueError("not a k2_shared_token announcement")
