"""A Celery app whose tasks call a K2 API with the shared token.

    K2_CLIENT_ID=... K2_CLIENT_SECRET=... K2_REDIS_URL=redis://localhost:6379/0 \\
        celery -A examples.celery_app worker --pool prefork --concurrency 4

Broker: ``CELERY_BROKER_URL``, else ``K2_REDIS_URL``, else ``redis://localhost:6379/0``; result
backend: ``CELERY_RESULT_BACKEND``, else the broker. The provider reads ``K2_CLIENT_ID``,
``K2_CLIENT_SECRET``, ``K2_BASE_URL`` and ``K2_REDIS_URL`` (see ``SharedTokenProvider.from_env``);
the optional ``K2_REFRESH_AHEAD`` and ``K2_MIN_VALIDITY`` shrink the refresh windows for tests and
demos with second-long tokens.

Where the provider is built, and why: lazily, on the first task a process runs. Fork safety
needs nothing at all: the prefork pool forks its children after importing this module, and a
provider built before a fork is reset in the child by the library's ``os.register_at_fork`` hook
(billiard forks with ``os.fork``, so the hook runs), so building it at import or in a
``worker_process_init`` handler would be correct too. Lazy is chosen because ``celery -A
examples.celery_app`` also imports this module in processes that never run a task (the worker's
main process, ``celery inspect``, ``celery beat``, the web app that only sends tasks); they should
neither need K2 credentials nor hold a provider. Under the threads pool the lock makes the first
tasks build one provider between them, not one each.
"""

from __future__ import annotations

import os
import threading

import requests
from celery import Celery

from k2_shared_token import SharedTokenProvider

BROKER_URL = (
    os.environ.get("CELERY_BROKER_URL")
    or os.environ.get("K2_REDIS_URL")
    or "redis://localhost:6379/0"
)

app = Celery("k2_example", broker=BROKER_URL)
app.conf.update(
    result_backend=os.environ.get("CELERY_RESULT_BACKEND") or BROKER_URL,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)

_lock = threading.Lock()
_session: requests.Session | None = None
_api_url = ""


def k2_session() -> tuple[requests.Session, str]:
    """This process's session (token attached by ``provider.auth()``) and the K2 API's URL."""
    global _session, _api_url  # noqa: PLW0603 - one per process, built on first use
    if _session is None:
        with _lock:
            if _session is None:
                provider = SharedTokenProvider.from_env()
                session = requests.Session()
                session.auth = provider.auth()
                _api_url = f"{provider.settings.base_url}/api/v1"
                _session = session
    return _session, _api_url


@app.task(name="k2.charge")
def charge(n: int) -> dict[str, int]:
    """Call the K2 API for charge ``n``; returns the API's HTTP status, and the pid so a caller
    can see the work spread over the pool."""
    session, api_url = k2_session()
    response = session.get(f"{api_url}/ping", params={"charge": n}, timeout=(3.05, 10))
    return {"status": response.status_code, "pid": os.getpid()}
