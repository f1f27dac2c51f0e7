"""Feeding the shared token to the official ``k2-connect`` Python SDK.

The SDK's services take an access token once, at construction, and bake it into their headers;
its ``Tokens`` service fetches a new token on every call and caches nothing. Two adapters:

``SharedTokens(provider)`` replaces ``k2connect.Tokens``: the same method names, answered from
the shared cache, so ``authenticator = k2connect.Tokens`` becomes
``authenticator = SharedTokens(provider)`` and nothing else changes. Its
``revoke_access_token``, ``introspect_access_token`` and ``request_token_info`` take the SDK's
``access_token`` argument and return what the SDK returns (K2's reply as a dict); a revoke also
drops the token from the shared cache, fleet-wide. Failures raise this package's typed errors
(:class:`K2TokenError`), as ``request_access_token`` does, not the SDK's ``K2Error``.

``CurrentTokenService(provider, factory)`` wraps a service factory (``k2connect.SendMoney`` after
``k2connect.initialize``, or a service class) and always calls a service built with the current
token: a new instance when the token changes, and on a 401 (``K2Error`` with
``error_code == 401``) the token is invalidated and the call retried once, as ``auth()`` does.

Nothing here imports ``k2connect``: the adapters work with whatever the SDK hands over.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._core.source import TokenApiSource, TokenSource


class SharedTokens:
    """Drop-in for ``k2connect.Tokens`` backed by the shared cache."""

    def __init__(self, provider: TokenApiSource) -> None:
        self.provider = provider

    def __repr__(self) -> str:
        return f"SharedTokens({self.provider!r})"

    def request_access_token(self) -> dict[str, Any]:
        """A K2-shaped token reply; ``expires_in`` is the *remaining* lifetime, whole seconds."""
        token = self.provider.get()
        return {
            "access_token": token.value,
            "token_type": token.token_type,
            "expires_in": max(0, math.floor(token.expires_at - time.time())),
            "created_at": int(time.time()),
        }

    def revoke_access_token(self, access_token: str) -> dict[str, Any]:
        """``POST oauth/revoke`` for ``access_token``, then drop it from the shared cache (the
        next call gets a new token); K2's success reply, ``{}``."""
        self.provider.revoke(access_token)
        return {}

    def introspect_access_token(self, access_token: str) -> dict[str, Any]:
        """K2's introspection reply for ``access_token``, as the SDK returns it
        (``{"active": ..., "exp": ..., ...}``; typed: ``provider.introspect``)."""
        return copy.deepcopy(dict(self.provider.introspect(access_token).raw))

    def request_token_info(self, access_token: str) -> dict[str, Any]:
        """K2's token info reply for ``access_token`` (``GET oauth/token/info``), as the SDK
        returns it (typed: ``provider.token_info``)."""
        return copy.deepcopy(dict(self.provider.token_info(access_token).raw))

    @staticmethod
    def get_access_token(response: dict[str, Any]) -> str:
        return str(response["access_token"])

    @staticmethod
    def get_token_expiry_duration(response: dict[str, Any]) -> int:
        return int(response["expires_in"])


def _is_unauthorized(exc: Exception) -> bool:
    detail = exc.args[0] if exc.args else None
    return isinstance(detail, dict) and detail.get("error_code") == 401


class CurrentTokenService:
    """A k2-connect service that always carries the current shared token."""

    def __init__(self, provider: TokenSource, factory: Callable[..., Any]) -> None:
        self.provider = provider
        self.factory = factory
        self._lock = threading.Lock()
        self._token: str | None = None
        self._service: Any = None

    def __repr__(self) -> str:
        return f"CurrentTokenService({self.factory!r}, {self.provider!r})"

    def _current(self) -> tuple[str, Any]:
        token = self.provider.get_token()
        with self._lock:
            if token != self._token:
                self._service, self._token = self.factory(access_token=token), token
            return token, self._service

    def __getattr__(self, name: str) -> Any:
        _, service = self._current()
        attribute = getattr(service, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            token, service = self._current()
            try:
                return getattr(service, name)(*args, **kwargs)
            except Exception as exc:
                if not _is_unauthorized(exc):
                    raise
                self.provider.report_rejected(token)
                _, service = self._current()
                return getattr(service, name)(*args, **kwargs)

        return call
