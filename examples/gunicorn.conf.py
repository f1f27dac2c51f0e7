"""Gunicorn settings for ``examples.wsgi_app``, every knob the fleet tests vary read from env.

    gunicorn -c examples/gunicorn.conf.py examples.wsgi_app:application

``GUNICORN_BIND`` (default ``127.0.0.1:8000``), ``WEB_CONCURRENCY`` (workers, default 4),
``GUNICORN_WORKER_CLASS`` (``sync`` default, ``gthread`` with ``GUNICORN_THREADS`` threads,
default 4, or ``gevent``: the worker monkey-patches before importing the app, so the provider's
waits and refresher are greenlets; keep preload off with it) and ``GUNICORN_PRELOAD`` (``1``
to import the app in the master before forking).

No ``post_fork`` hook: the provider resets its per-process state (single flight, background
refresher, HTTP pool) in an ``os.register_at_fork`` hook and redis-py reconnects after a pid
change, so a worker forked from a preloaded master needs nothing from us. Add one only for
resources of your own that are not fork-aware.
"""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync")
if worker_class == "gthread":
    threads = int(os.environ.get("GUNICORN_THREADS", "4"))
preload_app = _flag("GUNICORN_PRELOAD")

# A request waits at most ~20 s for a token (the provider's wait_timeout) plus the K2 call's own
# read timeout; 30 s lets that finish before the master declares the worker hung and kills it.
timeout = 30
# On SIGTERM, in-flight payments get this long to complete before workers are killed.
graceful_timeout = 10
# Behind a load balancer that reuses connections; must stay below the balancer's idle timeout.
keepalive = 5
