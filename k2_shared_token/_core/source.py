"""What the integrations need of a provider: a token, and a way to report one dead.

The requests and httpx auths, the k2-connect adapters and the metrics exporters depend on these
small protocols, not on the provider classes, so no import cycle runs through them (not even for
the type checker) and anything with the same methods (a test double, a wrapper) plugs in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .tokens import AccessToken

if TYPE_CHECKING:
    from .._k2.token_api import Introspection, TokenInfo
    from .metrics import Hook


class TokenSource(Protocol):
    def get(self) -> AccessToken: ...

    def get_token(self) -> str: ...

    def invalidate(self, token: str | AccessToken) -> bool: ...

    def report_rejected(self, token: str | AccessToken) -> bool: ...


class TokenApiSource(TokenSource, Protocol):
    """A token source that also speaks the rest of K2's token API (the k2-connect adapter)."""

    def revoke(self, token: str | AccessToken | None = None) -> bool: ...

    def introspect(self, token: str | AccessToken | None = None) -> Introspection: ...

    def token_info(self, token: str | AccessToken | None = None) -> TokenInfo: ...


class AsyncTokenSource(Protocol):
    async def get(self) -> AccessToken: ...

    async def get_token(self) -> str: ...

    async def invalidate(self, token: str | AccessToken) -> bool: ...

    async def report_rejected(self, token: str | AccessToken) -> bool: ...


class StatsSource(Protocol):
    """What the metrics exporters read: a provider of either side."""

    @property
    def namespace(self) -> str: ...

    def stats(self) -> dict[str, float]: ...


class ObservedSource(StatsSource, Protocol):
    """What the OpenTelemetry export needs besides the counters: the events as they happen, and
    the held token's remaining lifetime."""

    def seconds_left(self) -> float | None: ...

    def add_hook(self, hook: Hook) -> None: ...

    def remove_hook(self, hook: Hook) -> None: ...
