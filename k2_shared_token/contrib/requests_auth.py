"""requests integration: a bearer auth that survives a token K2 no longer accepts.

On a 401 the failed token is invalidated (compare-and-delete, so a fleet seeing the same 401
causes one refresh) and the request is sent once more with whatever token is current: the one
another worker already refreshed, or a new one. Exactly once: a second 401 is returned as is,
so a real authorisation problem is not hidden behind a retry loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import requests
from requests.auth import AuthBase

if TYPE_CHECKING:
    from .._core.source import TokenSource


class K2BearerAuth(AuthBase):
    def __init__(self, provider: TokenSource) -> None:
        self.provider = provider

    def __repr__(self) -> str:
        return f"K2BearerAuth({self.provider!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self.provider.get().authorization
        request.register_hook("response", self._retry_once_on_401)  # type: ignore[no-untyped-call]
        return request

    def _retry_once_on_401(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        if response.status_code != 401 or not _replayable(request.body):
            return response
        header = request.headers.get("Authorization", "")
        _, _, failed = header.partition(" ")
        if failed:
            self.provider.report_rejected(failed)
        retry = request.copy()
        retry.headers["Authorization"] = self.provider.get().authorization
        # The retry must not be retried again: drop this hook from the copy (copy() shares the
        # hooks dict with the original, so build a new one).
        retry.hooks = {
            **request.hooks,
            "response": [h for h in request.hooks["response"] if h != self._retry_once_on_401],
        }
        response.content  # noqa: B018 - drain so the connection returns to the pool
        response.close()
        adapter_response: requests.Response = response.connection.send(retry, **kwargs)
        adapter_response.history.append(response)
        adapter_response.request = retry
        return adapter_response


def _replayable(body: object) -> bool:
    return body is None or isinstance(body, (bytes, str))
