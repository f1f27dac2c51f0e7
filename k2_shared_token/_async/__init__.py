"""The I/O shells, written once for asyncio; :mod:`k2_shared_token._sync` is generated from
this folder by ``tools/unasync.py`` (``make lint`` fails when it is stale)."""
