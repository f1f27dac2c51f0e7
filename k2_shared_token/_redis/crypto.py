"""Optional encryption of the cached token at rest, for Redis instances shared with other teams.

AES-256-GCM from the ``cryptography`` package (the ``encryption`` extra). Authenticated: a value
someone else wrote, or one of ours moved to another namespace, fails to open and reads as a miss.
That matters more than secrecy here: with encryption on, a plaintext value is refused too, so a
party with write access to Redis cannot plant a token of its own for the fleet to send to K2.

Keys rotate without a flag day: the first key encrypts, every key decrypts. Deploy the new key
second everywhere, then first, then drop the old one. Each sealed value names its key by a
4-byte id (a hash of the key), so opening costs one AES operation, not one per configured key.

Sealed payload: ``~`` + urlsafe base64 of ``key id (4) | nonce (12) | ciphertext + tag``. The
associated data binds it to the namespace's token key and to the value's ``fence:digest:``
prefix, which the Lua scripts read in clear.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable

from .._core.errors import ConfigurationError

MARKER = b"~"
ENV_KEYS = "K2_TOKEN_ENCRYPTION_KEYS"


class SealError(ValueError):
    """A sealed payload that none of our keys opens (or that is not sealed at all)."""


def _key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, bytes) and len(key) == 32:
        return key
    if not isinstance(key, (str, bytes)):
        raise ConfigurationError(
            f"each encryption key must be a str or bytes, not {type(key).__name__}"
        )
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    try:
        raw = base64.urlsafe_b64decode(text.strip().encode("ascii") + b"==")
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigurationError(
            "each encryption key must be 32 bytes, or their base64 (generate one with "
            "`python -m k2_shared_token keygen`)"
        )
    return raw


def new_key() -> str:
    """A fresh key in the form ``encryption_keys`` and ``K2_TOKEN_ENCRYPTION_KEYS`` accept."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def keys_from_env(value: str) -> list[str]:
    """``K2_TOKEN_ENCRYPTION_KEYS``: comma-separated, the encrypting key first."""
    return [part.strip() for part in value.split(",") if part.strip()]


class TokenCipher:
    def __init__(self, keys: Iterable[str | bytes], context: str) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415
        except ImportError:
            raise ConfigurationError(
                "encryption_keys need the 'encryption' extra: pip install "
                "'k2-shared-token[encryption]'"
            ) from None
        raw = [_key_bytes(k) for k in keys]
        if not raw:
            raise ConfigurationError("encryption_keys is empty")
        self._context = context.encode()
        self._ciphers = {hashlib.sha256(k).digest()[:4]: AESGCM(k) for k in raw}
        self._sealing_id = hashlib.sha256(raw[0]).digest()[:4]

    def __repr__(self) -> str:
        return f"TokenCipher(keys={len(self._ciphers)})"

    def seal(self, plaintext: bytes, header: bytes) -> bytes:
        nonce = os.urandom(12)
        sealed = self._ciphers[self._sealing_id].encrypt(
            nonce, plaintext, self._context + b"|" + header
        )
        return MARKER + base64.urlsafe_b64encode(self._sealing_id + nonce + sealed)

    def open(self, payload: bytes, header: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415

        if not payload.startswith(MARKER):
            raise SealError("not encrypted, but encryption is on")
        try:
            blob = base64.urlsafe_b64decode(payload[1:])
        except (binascii.Error, ValueError):
            raise SealError("encrypted payload is not base64") from None
        cipher = self._ciphers.get(blob[:4])
        if cipher is None or len(blob) < 4 + 12 + 16:
            raise SealError("encrypted with a key this worker does not have")
        try:
            return cipher.decrypt(blob[4:16], blob[16:], self._context + b"|" + header)
        except InvalidTag:
            raise SealError("encrypted payload fails authentication") from None
