"""A plain WSGI app that calls a K2 API with the shared token: what a gunicorn service needs.

Run it with the example configuration::

    K2_CLIENT_ID=... K2_CLIENT_SECRET=... K2_REDIS_URL=redis://localhost:6379/0 \\
        gunicorn -c examples/gunicorn.conf.py examples.wsgi_app:application

Environment: ``K2_CLIENT_ID``, ``K2_CLIENT_SECRET``, ``K2_BASE_URL`` and ``K2_REDIS_URL``, plus
the optional tuning knobs such as ``K2_REFRESH_AHEAD`` and ``K2_MIN_VALIDITY``, all read by
:meth:`SharedTokenProvider.from_env` (the fleet tests shrink the windows for 4 s tokens).

Why the provider is built at import time: a missing or wrong setting stops the worker at boot,
in gunicorn's log, instead of failing the first payment. It is fork-safe either way. With
``preload_app`` the master imports this module and then forks the workers; the library registers
an ``os.register_at_fork`` hook that gives each child a fresh single flight, background refresher
and HTTP pool, and redis-py reconnects in a process whose pid changed. The master itself never
asks for a token, so nothing is in flight when it forks. No gunicorn ``post_fork`` hook is needed.

The module-level ``requests.Session`` is shared the same way: the master never sends a request
through it, so a child inherits an empty connection pool and opens its own connections.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import requests

from k2_shared_token import K2TokenError, SharedTokenProvider

provider = SharedTokenProvider.from_env()
BUILT_IN_PID = os.getpid()  # the gunicorn master's with preload_app, else this worker's
API_URL = f"{provider.settings.base_url}/api/v1"  # the normalised K2_BASE_URL

# One session per process: keep-alive connections to K2, and the token on every request. On a
# 401 the auth invalidates the token fleet-wide (compare-and-delete) and retries once. gthread's
# threads share it: its urllib3 pool is thread-safe and this app keeps no cookies (requests makes
# no broader promise; use a threading.local session if you rely on more).
session = requests.Session()
session.auth = provider.auth()

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _reply(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    )
    return [payload]


def pay() -> tuple[str, dict[str, Any]]:
    """Call the K2 API once; a 502 or 503 tells the caller that K2, not this app, said no."""
    pid = os.getpid()
    try:
        response = session.get(f"{API_URL}/ping", timeout=(3.05, 10))
    except K2TokenError as exc:  # no token to be had: K2's auth server or Redis is down
        return "503 Service Unavailable", {"ok": False, "pid": pid, "error": type(exc).__name__}
    except requests.RequestException as exc:  # the API itself did not answer
        return "502 Bad Gateway", {"ok": False, "pid": pid, "error": type(exc).__name__}
    if response.status_code == 200:
        return "200 OK", {"ok": True, "pid": pid}
    return "502 Bad Gateway", {"ok": False, "pid": pid, "status": response.status_code}


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point: ``GET /pay`` and ``GET /health``."""
    method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
    if method != "GET":
        return _reply(start_response, "405 Method Not Allowed", {"ok": False})
    if path == "/health":
        body = {"ok": True, "pid": os.getpid(), "provider_built_in": BUILT_IN_PID}
        return _reply(start_response, "200 OK", body)
    if path == "/pay":
        status, body = pay()
        return _reply(start_response, status, body)
    return _reply(start_response, "404 Not Found", {"ok": False})
