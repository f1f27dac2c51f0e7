"""A FastAPI app that calls a K2 API with the shared token: what an ASGI service needs.

    K2_CLIENT_ID=... K2_CLIENT_SECRET=... K2_REDIS_URL=redis://localhost:6379/0 \\
        uvicorn examples.fastapi_app:app --workers 4

Environment: the same ``K2_*`` variables as the WSGI example, read by
:meth:`AsyncSharedTokenProvider.from_env` (needs the ``asyncio`` extra, i.e. httpx).

Why the lifespan: an :class:`AsyncSharedTokenProvider` belongs to one event loop (its Redis
connections, single flight and background refresher are asyncio objects), so it is built once
the worker's loop runs and closed (``aclose``) before the loop stops. Each uvicorn worker is its
own process with its own lifespan, so each has one provider; they share the token through
Redis. A bad setting fails the lifespan, and uvicorn refuses to start the worker.

The ``httpx.AsyncClient`` is built in the lifespan too, one per worker (keep-alive connections
to K2), and handed to the endpoints by the :func:`k2_client` dependency. Its auth,
``provider.httpx_auth()``, puts the shared token on every request and, on a 401, invalidates it
fleet-wide (compare-and-delete) and retries once.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from k2_shared_token import AsyncSharedTokenProvider, K2TokenError


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    provider = AsyncSharedTokenProvider.from_env()
    client = httpx.AsyncClient(
        base_url=f"{provider.settings.base_url}/api/v1",  # the normalised K2_BASE_URL
        auth=provider.httpx_auth(),
        timeout=httpx.Timeout(10, connect=3.05),
    )
    app.state.provider, app.state.k2 = provider, client
    try:
        yield
    finally:
        await client.aclose()
        await provider.aclose()


app = FastAPI(lifespan=lifespan)


def k2_client(request: Request) -> httpx.AsyncClient:
    """The worker's K2 client: the shared token on every request, one retry on a 401."""
    client: httpx.AsyncClient = request.app.state.k2
    return client


K2Client = Annotated[httpx.AsyncClient, Depends(k2_client)]


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"ok": True, "pid": os.getpid()}


@app.get("/pay")
async def pay(k2: K2Client) -> JSONResponse:
    """Call the K2 API once; a 502 or 503 tells the caller that K2, not this app, said no."""
    pid = os.getpid()
    try:
        response = await k2.get("/ping")
    except K2TokenError as exc:  # no token to be had: K2's auth server or Redis is down
        return JSONResponse({"ok": False, "pid": pid, "error": type(exc).__name__}, 503)
    except httpx.HTTPError as exc:  # the API itself did not answer
        return JSONResponse({"ok": False, "pid": pid, "error": type(exc).__name__}, 502)
    if response.status_code == 200:
        return JSONResponse({"ok": True, "pid": pid, "k2": response.json()})
    return JSONResponse({"ok": False, "pid": pid, "status": response.status_code}, 502)
