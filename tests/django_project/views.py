"""Two views: ``/pay`` calls the fake K2's API with the shared token, ``/health`` says which
worker answered. Their JSON matches examples.wsgi_app's, so tests.deploy_helpers can load them."""

from __future__ import annotations

import functools
import os

import requests
from django.http import HttpRequest, JsonResponse

from k2_shared_token import K2TokenError, SharedTokenProvider
from k2_shared_token.contrib.django import get_provider


@functools.cache
def _session(provider: SharedTokenProvider, pid: int) -> requests.Session:
    """One keep-alive session per provider and process (a test that changes the settings gets
    a new provider; a forked child makes its own connections)."""
    session = requests.Session()
    session.auth = provider.auth()
    return session


def pay(request: HttpRequest) -> JsonResponse:
    pid = os.getpid()
    url = f"{get_provider().settings.base_url}/api/v1/ping"
    try:
        response = _session(get_provider(), pid).get(url, timeout=(3.05, 10))
    except K2TokenError as exc:
        return JsonResponse({"ok": False, "pid": pid, "error": type(exc).__name__}, status=503)
    except requests.RequestException as exc:
        return JsonResponse({"ok": False, "pid": pid, "error": type(exc).__name__}, status=502)
    if response.status_code != 200:
        return JsonResponse({"ok": False, "pid": pid, "status": response.status_code}, status=502)
    return JsonResponse({"ok": True, "pid": pid})


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True, "pid": os.getpid(), "provider_built_in": os.getpid()})
