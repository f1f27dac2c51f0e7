"""Run the real Doorkeeper app of this directory (``app.rb``, ``config.ru``) on loopback.

``DoorkeeperServer(**options)`` turns its keyword arguments into the app's ``DK_*`` variables,
starts ``puma`` (single mode: one process) on a free 127.0.0.1 port with its own sqlite
database in a temporary directory, waits (bounded) until ``/__counts`` answers, and stops
exactly the process it started, by PID.

Needs Debian 12's ``ruby-doorkeeper ruby-activerecord ruby-sqlite3 puma`` (Doorkeeper 5.5,
Rails 6.1) and nothing else; ``available()`` says what is missing and how to install it.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = [
    "APP_DIR",
    "INSTALL_COMMAND",
    "PACKAGES",
    "DoorkeeperServer",
    "DoorkeeperStartError",
    "Reply",
    "available",
]

APP_DIR: Final = Path(__file__).resolve().parent
LOOPBACK: Final = "127.0.0.1"
PACKAGES: Final = ("ruby-doorkeeper", "ruby-activerecord", "ruby-sqlite3", "puma")
INSTALL_COMMAND: Final = "apt-get install -y --no-install-recommends " + " ".join(PACKAGES)
INSTALL_HINT: Final = f"as root: {INSTALL_COMMAND}"

# What app.rb requires, each with the Debian package that brings it.
_LIBRARIES: Final = (
    ("rails", "ruby-railties"),
    ("active_record/railtie", "ruby-activerecord"),
    ("action_controller/railtie", "ruby-actionpack"),
    ("doorkeeper", "ruby-doorkeeper"),
    ("sqlite3", "ruby-sqlite3"),
    ("puma", "puma"),
)
_PROBE: Final = (
    "missing = []\n"
    "ARGV.each_slice(2) { |lib, pkg| begin; require lib; "
    'rescue LoadError; missing << "#{lib} (#{pkg})"; end }\n'
    'if missing.empty? then print "ok ", Doorkeeper::VERSION::STRING '
    'else print "missing ", missing.join(", ") end\n'
)
# Variables of the caller's environment that must not reach the server.
_SCRUB_PREFIXES: Final = ("DK_", "BUNDLE_", "GEM_")
_SCRUB_NAMES: Final = frozenset({"DATABASE_URL", "RUBYOPT", "RUBYLIB", "PORT", "RAILS_ENV"})


class DoorkeeperStartError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class Reply:
    """One HTTP exchange with the server, read whole."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    seconds: float = 0.0

    def header(self, name: str) -> str | None:
        low = name.lower()
        return next((v for k, v in self.headers if k.lower() == low), None)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


def _base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB_NAMES
    }
    env["RAILS_ENV"] = env["RACK_ENV"] = "production"
    return env


@functools.cache
def _probe() -> tuple[str | None, str]:
    """(why the server cannot run or None, Doorkeeper's version when it can)."""
    if not (APP_DIR / "config.ru").is_file():
        return f"the Doorkeeper test app is missing: {APP_DIR / 'config.ru'}", ""
    ruby, puma = shutil.which("ruby"), shutil.which("puma")
    if ruby is None or puma is None:
        missing = " and ".join(n for n, p in (("ruby", ruby), ("puma", puma)) if p is None)
        return f"{missing} not found on PATH; install the Doorkeeper server {INSTALL_HINT}", ""
    args = [ruby, "-e", _PROBE, *(part for pair in _LIBRARIES for part in pair)]
    try:
        probe = subprocess.run(
            args, capture_output=True, timeout=60, env=_base_env(), cwd=APP_DIR, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run ruby ({type(exc).__name__}: {exc}); {INSTALL_HINT}", ""
    out = probe.stdout.decode("utf-8", "replace").strip()
    if probe.returncode != 0 or not out.startswith(("ok ", "missing ")):
        err = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        first = err[0] if err else f"exit status {probe.returncode}"
        return f"ruby failed to load the Doorkeeper app's libraries ({first}); {INSTALL_HINT}", ""
    word, _, rest = out.partition(" ")
    if word == "missing":
        return f"Ruby cannot load {rest}; install them {INSTALL_HINT}", ""
    if not rest.startswith("5."):
        return f"Doorkeeper 5.x is needed, found {rest}; {INSTALL_HINT}", rest
    return None, rest


def available() -> str | None:
    """None when ruby, puma, Rails, Doorkeeper 5 and sqlite3 are usable; otherwise a message
    naming what is missing and how to install it. Probed once per process."""
    return _probe()[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class DoorkeeperServer:
    """A Doorkeeper 5.5 server (client_credentials only) on 127.0.0.1.

    ``with DoorkeeperServer(expires_in=6, reuse=True) as dk: ...`` starts it and stops it; so do
    ``start()`` and ``stop()``. ``counts()`` reads the app's request counters (token requests,
    tokens issued, API calls, 401s, 5xx), ``issued_at()`` says when each token was issued and
    ``reset_counts()`` zeroes both.
    """

    def __init__(
        self,
        *,
        expires_in: int = 3600,
        reuse: bool = False,
        reuse_limit: int = 100,
        revoke_previous: bool = False,
        default_scopes: Iterable[str] = (),
        client_id: str = "test-client",
        client_secret: str = "test-secret",
        busy_timeout_ms: int = 500,
        threads: int = 6,
        boot_timeout: float = 30.0,
        log_level: str = "warn",
    ) -> None:
        if expires_in <= 0:
            raise ValueError("expires_in must be positive")
        if not 1 <= reuse_limit <= 100:
            raise ValueError("reuse_limit must be within 1..100")
        if threads < 1:
            raise ValueError("threads must be >= 1")
        scopes = tuple(default_scopes)
        for scope in scopes:
            if not scope or any(c.isspace() for c in scope):
                raise ValueError(f"bad scope {scope!r}")
        self.expires_in = expires_in
        self.reuse = reuse
        self.reuse_limit = reuse_limit
        self.revoke_previous = revoke_previous
        self.default_scopes = scopes
        self.client_id = client_id
        self.client_secret = client_secret
        self.busy_timeout_ms = busy_timeout_ms
        self.threads = threads
        self.boot_timeout = boot_timeout
        self.log_level = log_level
        self.boot_seconds: float | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    available = staticmethod(available)

    # -- lifecycle ---------------------------------------------------------------------------

    def _env(self, workdir: Path) -> dict[str, str]:
        return {
            **_base_env(),
            "DK_DATABASE": str(workdir / "doorkeeper.sqlite3"),
            "DK_EXPIRES_IN": str(self.expires_in),
            "DK_REUSE": "1" if self.reuse else "0",
            "DK_REUSE_LIMIT": str(self.reuse_limit),
            "DK_REVOKE_PREVIOUS": "1" if self.revoke_previous else "0",
            "DK_DEFAULT_SCOPES": " ".join(self.default_scopes),
            "DK_CLIENT_ID": self.client_id,
            "DK_CLIENT_SECRET": self.client_secret,
            "DK_BUSY_TIMEOUT_MS": str(self.busy_timeout_ms),
            "DK_POOL": str(self.threads + 2),
            "DK_LOG": str(workdir / "rails.log"),
            "DK_LOG_LEVEL": self.log_level,
        }

    def start(self) -> DoorkeeperServer:
        """Boot the server; returns once it answers, or raises ``DoorkeeperStartError``."""
        if self._proc is not None:
            raise RuntimeError("already started")
        why = available()
        if why is not None:
            raise DoorkeeperStartError(why)
        puma = shutil.which("puma")
        assert puma is not None  # checked by available()
        self._tmp = tempfile.TemporaryDirectory(prefix="doorkeeper-")
        workdir = Path(self._tmp.name)
        log = workdir / "puma.log"
        error: DoorkeeperStartError | None = None
        for _attempt in range(3):  # the free port can be taken between our probe and puma's bind
            port = _free_port()
            command = [
                puma,
                "--bind", f"tcp://{LOOPBACK}:{port}",
                "--threads", f"{self.threads}:{self.threads}",
                "--environment", "production",
                "--quiet",
                "--dir", str(APP_DIR),
                str(APP_DIR / "config.ru"),
            ]  # fmt: skip
            started = time.monotonic()
            with log.open("ab") as out:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._env(workdir),
                    cwd=workdir,
                )
            self._port = port
            try:
                self._wait_up(started, log)
            except DoorkeeperStartError as exc:
                error = exc
                self._end_process()
                if "Address already in use" in _tail(log, 200):
                    continue
                break
            self.boot_seconds = time.monotonic() - started
            return self
        self._remove_dir()
        assert error is not None
        raise error

    def _wait_up(self, started: float, log: Path) -> None:
        """Poll until ``/__counts`` answers: puma offers nothing to wait on (``--quiet``).
        Between probes the wait is on the process itself, so an exit ends it at once."""
        proc = self._proc
        assert proc is not None
        deadline = started + self.boot_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise DoorkeeperStartError(
                    f"the Doorkeeper server exited with status {code} while booting:\n" + _tail(log)
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.request("GET", "/__counts", timeout=1.0).status == 200:
                    return
            if time.monotonic() >= deadline:
                raise DoorkeeperStartError(
                    f"the Doorkeeper server did not answer within {self.boot_timeout:.0f} s:\n"
                    + _tail(log)
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)  # still booting; an exit is seen at the top

    def _end_process(self) -> None:
        """SIGTERM (puma shuts down gracefully), then SIGKILL: the process we started, by PID."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        else:
            proc.wait()

    def _remove_dir(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def stop(self) -> None:
        """End the puma process this object started (by PID) and remove its temporary dir."""
        self._end_process()
        self._remove_dir()

    def __enter__(self) -> DoorkeeperServer:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where it is -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("not started")
        return self._proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        if self._tmp is None:
            return ""
        workdir = Path(self._tmp.name)
        return _tail(workdir / "puma.log", lines) + "\n" + _tail(workdir / "rails.log", lines)

    # -- HTTP (stdlib: never through a proxy, loopback only) ---------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        if not path.startswith("/"):
            raise ValueError("path must start with '/'")
        body: bytes | None = None
        sent = {"Accept": "application/json", **(headers or {})}
        if form is not None:
            body = urllib.parse.urlencode(form).encode("ascii")
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            began = time.monotonic()
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            data = resp.read()
            return Reply(resp.status, resp.getheaders(), data, time.monotonic() - began)
        finally:
            conn.close()

    def token_reply(self, *, secret: str | None = None, **extra: str) -> Reply:
        """``POST /oauth/token`` (client credentials in the form), the reply as it came."""
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self.client_secret if secret is None else secret,
            **extra,
        }
        return self.request("POST", "/oauth/token", form=form)

    def ping(self, token: str | None) -> Reply:
        """``GET /api/ping``, behind ``doorkeeper_authorize!``."""
        sent = {} if token is None else {"Authorization": f"Bearer {token}"}
        return self.request("GET", "/api/ping", headers=sent)

    def counts(self) -> dict[str, int]:
        """The app's counters: token_requests, token_issued, token_errors, api_calls, api_ok,
        api_401, server_errors (every request, counted before Rails sees it)."""
        reply = self.request("GET", "/__counts")
        if reply.status != 200:
            raise RuntimeError(f"/__counts answered {reply.status}")
        return {str(k): int(v) for k, v in reply.json().items()}

    def issued_at(self) -> list[float]:
        """When each token request was answered 200 (epoch seconds, the server's clock, which
        is this machine's: comparable with ``time.time()``), oldest first."""
        reply = self.request("GET", "/__issued")
        if reply.status != 200:
            raise RuntimeError(f"/__issued answered {reply.status}")
        return sorted(float(t) for t in reply.json()["issued_at"])

    def reset_counts(self) -> None:
        """Zero the counters and forget the issue times."""
        reply = self.request("POST", "/__reset")
        if reply.status != 200:
            raise RuntimeError(f"/__reset answered {reply.status}")


def main() -> int:
    """``python -m tests.doorkeeper.server``: say whether the server can run here (exit 0) or
    what is missing (exit 1); ``make test-doorkeeper`` asks before installing anything."""
    why, version = _probe()
    if why is not None:
        print(f"Doorkeeper tests cannot run: {why}", file=sys.stderr)
        return 1
    print(f"Doorkeeper tests can run: Doorkeeper {version}, {shutil.which('puma')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
