"""A fake Kopo Kopo K2 Connect OAuth server for tests, the demo and users' own test suites.

The real K2 auth server is, as far as public evidence shows, a Rails app running the Doorkeeper
gem (see the research notes in k2-contract.md). Client code has to cope with Doorkeeper's exact
wire behaviour: the order in which it validates a request, its error bodies and headers, and its
token-reuse and revoke-previous settings. Reproducing that here lets the library, the demo and
downstream projects exercise every path without network access or sandbox credentials.

Everything under "faults" (429, 5xx, garbage bodies, stalls, dropped connections) is our own
robustness tooling, not documented K2 behaviour.

The server only ever binds a loopback address: it hands a token to anyone who knows the
published default secret, so it must never be reachable from another machine.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import math
import secrets
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qsl, unquote_plus, urlsplit

__all__ = [
    "CREATED_AT_FORMATS",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "INTROSPECTION_TIME_FORMATS",
    "TOKEN_MODES",
    "FakeK2Server",
    "Fault",
    "IssuedRecord",
    "add_arguments",
    "main",
    "run_from_args",
]

# Shaped like a Doorkeeper application uid (43 url-safe characters) so client code that logs,
# validates or truncates client ids sees realistic input, yet obviously fake.
DEFAULT_CLIENT_ID = "FAKE-k2-client-id-for-local-tests-only-0001"
# A published test value, not a credential: it only unlocks this fake server.
DEFAULT_CLIENT_SECRET = "FAKE-k2-client-secret-public-test-value-001"

TOKEN_MODES: tuple[str, ...] = ("new", "reuse", "revoke_previous")
CREATED_AT_FORMATS: tuple[str, ...] = ("int", "iso")
# Introspection's exp/iat: K2's ISO-8601 strings in EAT (the SDKs' captured bodies) or stock
# Doorkeeper's (and RFC 7662's) integer epoch seconds.
INTROSPECTION_TIME_FORMATS: tuple[str, ...] = ("iso", "int")

# K2 renders timestamps in East Africa Time (captured introspect bodies carry +03:00).
_EAT = timezone(timedelta(hours=3))

_JSON_TYPE = "application/json; charset=utf-8"
_REALM = "Doorkeeper"
_MAX_BODY = 1 << 20
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1"})

# Messages copied from Doorkeeper's config/locales/en.yml, because clients may surface them.
_DESC_INVALID_CLIENT = (
    "Client authentication failed due to unknown client, no client authentication included, "
    "or unsupported authentication method."
)
_DESC_MISSING_GRANT = "Missing required parameter: grant_type."
_DESC_UNSUPPORTED_GRANT = (
    "The authorization grant type is not supported by the authorization server."
)
_DESC_REVOKE_UNAUTHORIZED = "You are not authorized to revoke this token"
_DESC_SERVER_ERROR = (
    "The authorization server encountered an unexpected condition which prevented it from "
    "fulfilling the request."
)
_DESC_EXPIRED = "The access token expired"
_DESC_REVOKED = "The access token was revoked"
_DESC_TOKEN_REUSE = (
    "The authorization server encountered an unexpected condition which prevented it from "
    "fulfilling the request."
)
_DESC_UNKNOWN = "The access token is invalid"

_Headers = tuple[tuple[str, str], ...]
_NO_STORE: _Headers = (("Cache-Control", "no-store, no-cache"), ("Pragma", "no-cache"))

FaultKind = Literal["status", "garbage", "slow", "disconnect"]


def _json_bytes(obj: object) -> bytes:
    """Encode compactly, as Rails' ``render json:`` does, so byte-level tests stay realistic."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _iso_eat(wall: float) -> str:
    return datetime.fromtimestamp(wall, _EAT).isoformat(timespec="seconds")


def _body_allowed(status: int) -> bool:
    """HTTP forbids a body (and a Content-Length) on these, and clients hang if one is sent."""
    return status >= 200 and status not in (204, 304)


class _Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str | None
    headers: _Headers = ()


def _json_reply(status: int, obj: object, headers: _Headers = ()) -> _Reply:
    return _Reply(status, _json_bytes(obj), _JSON_TYPE, headers)


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, consumed by exactly one ``POST /oauth/token`` request.

    Faults are frozen values so a test can build a list once and inject it into several
    servers without one server's consumption affecting another.
    """

    kind: FaultKind
    http_status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: _Headers = ()
    delay: float = 0.0

    @classmethod
    def status(
        cls,
        code: int,
        body: bytes | str | Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: int | str | None = None,
    ) -> Fault:
        """Answer with ``code``; ``retry_after`` as a str is sent verbatim so tests can send
        HTTP-dates or junk that a client must survive."""
        if not 200 <= code <= 599:
            raise ValueError(f"status code must be 200..599, got {code}")
        content_type: str | None = _JSON_TYPE
        if body is None:
            payload = _json_bytes(cls._default_body(code))
        elif isinstance(body, bytes):
            payload = body
            content_type = "application/octet-stream"
        elif isinstance(body, str):
            payload = body.encode("utf-8")
            content_type = "text/plain; charset=utf-8"
        else:
            payload = _json_bytes(dict(body))
        extra: list[tuple[str, str]] = []
        if code == 401 and body is None:
            challenge = _www_authenticate("invalid_client", _DESC_INVALID_CLIENT)
            extra.append(("WWW-Authenticate", challenge))
        if retry_after is not None:
            extra.append(("Retry-After", str(retry_after)))
        extra.extend((headers or {}).items())
        return cls("status", code, payload, content_type, tuple(extra))

    @staticmethod
    def _default_body(code: int) -> dict[str, str]:
        if code >= 500:
            return {"error": "server_error", "error_description": _DESC_SERVER_ERROR}
        if code == 429:
            return {"error": "rate_limited"}
        if code == 401:
            return {"error": "invalid_client", "error_description": _DESC_INVALID_CLIENT}
        return {"error": "injected_fault", "error_description": f"Injected HTTP {code} reply."}

    @classmethod
    def garbage(
        cls, body: bytes | str, status: int = 200, content_type: str = "text/html"
    ) -> Fault:
        """Reply with exactly ``body``: proxy error pages, truncated JSON, wrong-typed JSON."""
        if not 200 <= status <= 599:
            raise ValueError(f"status code must be 200..599, got {status}")
        payload = body.encode("utf-8") if isinstance(body, str) else body
        return cls("garbage", status, payload, content_type)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Stall, then answer normally: the way to push a client past its read timeout."""
        if seconds < 0 or math.isnan(seconds):
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        return cls("slow", delay=float(seconds))

    @classmethod
    def disconnect(cls) -> Fault:
        """Close the connection without a byte of reply, like a crashed upstream."""
        return cls("disconnect")

    def _as_reply(self) -> _Reply:
        return _Reply(self.http_status, self.body, self.content_type, self.headers)


@dataclass(frozen=True)
class IssuedRecord:
    """One successful token reply, kept so tests can reason about what each client was told.

    ``issued_at`` is the server's clock at reply time (``time.monotonic()`` unless it was given
    another), the clock it judges expiry on, so ``issued_at + expires_in`` is comparable with the
    server's own notion.
    """

    token: str = field(repr=False)  # tokens never end up in logs or assertion messages
    issued_at: float
    expires_in: int
    reused: bool


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
    client_id: str
    created_wall: float
    issued_mono: float
    lifetime: int
    revoked: bool = False

    @property
    def expires_mono(self) -> float:
        return self.issued_mono + self.lifetime

    def expired(self, now: float) -> bool:
        return now >= self.expires_mono

    def live(self, now: float) -> bool:
        return not self.revoked and not self.expired(now)

    def remaining(self, now: float) -> int:
        """Seconds left, rounded half up as Doorkeeper's ``expires_in`` is: it can overstate by
        up to half a second, and it is 0 for a token with under half a second to live."""
        return max(0, math.floor(self.expires_mono - now + 0.5))


def _www_authenticate(error: str, description: str) -> str:
    return f'Bearer realm="{_REALM}", error="{error}", error_description="{description}"'


def _check_expires_in(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expires_in must be an int >= 0, got {value!r}")
    return value


def _check_latency(value: float) -> float:
    if value < 0 or math.isnan(value):
        raise ValueError(f"latency must be >= 0, got {value!r}")
    return float(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class FakeK2Server:
    """An in-process stand-in for the K2 OAuth server (``/oauth/*``) plus a protected API.

    One lock guards all state: handlers run on their own threads, and tests read counters and
    flip settings from the test thread while requests are in flight.
    """

    def __init__(
        self,
        clients: Mapping[str, str] | None = None,
        *,
        expires_in: int = 3600,
        token_mode: str = "new",
        latency: float = 0.0,
        created_at: str = "int",
        introspection_times: str = "iso",
        legacy_errors: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        listen_all: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: the monotonic clock tokens are issued and expire on; a test that must see
        a token lapse moves a clock of its own forward instead of sleeping out the lifetime."""
        # A test double should not be reachable from a network; the one exception is a
        # container (docker-compose), where other containers must reach it by name.
        if listen_all:
            host = "0.0.0.0"  # noqa: S104 - asked for explicitly, for containers only
        elif host not in _LOOPBACK_HOSTS:
            raise ValueError(f"the fake K2 server binds only 127.0.0.1 or ::1, not {host!r}")
        self._clients: dict[str, str] = dict(
            clients if clients is not None else {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}
        )
        self._host = host
        self._port = port
        self._expires_in = _check_expires_in(expires_in)
        self._mode = _check_choice("token_mode", token_mode, TOKEN_MODES)
        self._in_flight = 0  # token requests being served (a race, in revoke-previous mode)
        self._peak_in_flight = 0
        self._connections_accepted = 0
        self._latency = _check_latency(latency)
        self._created_at = _check_choice("created_at", created_at, CREATED_AT_FORMATS)
        self._introspection_times = _check_choice(
            "introspection_times", introspection_times, INTROSPECTION_TIME_FORMATS
        )
        self._legacy_errors = bool(legacy_errors)
        self._clock = clock

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # An Event as well as the condition: stalls (latency, slow faults) wait on it so a
        # stop() wakes them at once instead of leaving threads sleeping past teardown.
        self._stopping = threading.Event()
        self._paused = False
        self._faults: deque[Fault] = deque()
        self._tokens: dict[str, _Token] = {}
        self._client_tokens: dict[str, list[_Token]] = {}
        self._connections: set[socket.socket] = set()

        self._exchanges = 0
        self._token_requests = 0
        self._api_requests = 0
        self._api_unauthorized = 0
        self._issued: list[IssuedRecord] = []

        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._started = False
        self._base_url: str | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeK2Server:
        """Bind and serve on a background thread; returns self so ``FakeK2Server().start()``
        reads naturally. A stopped server cannot be restarted: make a new one."""
        with self._lock:
            if self._started or self._stopping.is_set():
                raise RuntimeError("FakeK2Server.start() called twice or after stop()")
            self._started = True
        httpd = _Server((self._host, self._port), self)
        wake_r, wake_w = socket.socketpair()
        bound_port = int(httpd.server_address[1])
        shown_host = f"[{self._host}]" if ":" in self._host else self._host
        thread = threading.Thread(
            target=self._serve,
            args=(httpd, wake_r),
            name=f"fake-k2-server:{bound_port}",
            daemon=True,
        )
        with self._lock:
            self._httpd = httpd
            self._thread = thread
            self._wake = (wake_r, wake_w)
            self._port = bound_port
            self._base_url = f"http://{shown_host}:{bound_port}"
        thread.start()
        return self

    def _serve(self, httpd: _Server, wake: socket.socket) -> None:
        """Our own accept loop rather than ``serve_forever``: the wake-up socket lets stop()
        return at once instead of after a poll interval, which adds up over many tests."""
        with selectors.DefaultSelector() as selector:
            selector.register(httpd.socket, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is httpd.socket and not self._stopping.is_set():
                        httpd.accept_one()

    def stop(self) -> None:
        """Idempotent. Wakes held and stalled handlers, cuts open keep-alive connections and
        waits briefly for handlers to finish, so counters are final once it returns."""
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
            httpd, thread, wake = self._httpd, self._thread, self._wake
            self._httpd, self._thread, self._wake = None, None, None
        if httpd is None or thread is None or wake is None:
            return
        with contextlib.suppress(OSError):
            wake[1].send(b"\0")
        thread.join()
        with self._cond:
            # Idle keep-alive connections would otherwise pin handler threads until the
            # client hangs up, which a test's pooled session may never do.
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._cond.wait_for(lambda: not self._connections, timeout=2.0)
        httpd.server_close()
        for end in wake:
            end.close()

    def __enter__(self) -> FakeK2Server:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """Still answers after stop(), so tests can check how clients handle a refused port."""
        with self._lock:
            if self._base_url is None:
                raise RuntimeError("FakeK2Server is not started")
            return self._base_url

    @property
    def port(self) -> int:
        with self._lock:
            return self._port

    # ----------------------------------------------------------------- settings

    @property
    def expires_in(self) -> int:
        with self._lock:
            return self._expires_in

    @expires_in.setter
    def expires_in(self, value: int) -> None:
        checked = _check_expires_in(value)
        with self._lock:
            self._expires_in = checked

    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        checked = _check_latency(value)
        with self._lock:
            self._latency = checked

    @property
    def token_mode(self) -> str:
        with self._lock:
            return self._mode

    @token_mode.setter
    def token_mode(self, value: str) -> None:
        checked = _check_choice("token_mode", value, TOKEN_MODES)
        with self._lock:
            self._mode = checked

    @property
    def created_at(self) -> str:
        with self._lock:
            return self._created_at

    @created_at.setter
    def created_at(self, value: str) -> None:
        checked = _check_choice("created_at", value, CREATED_AT_FORMATS)
        with self._lock:
            self._created_at = checked

    @property
    def introspection_times(self) -> str:
        with self._lock:
            return self._introspection_times

    @introspection_times.setter
    def introspection_times(self, value: str) -> None:
        checked = _check_choice("introspection_times", value, INTROSPECTION_TIME_FORMATS)
        with self._lock:
            self._introspection_times = checked

    @property
    def legacy_errors(self) -> bool:
        with self._lock:
            return self._legacy_errors

    @legacy_errors.setter
    def legacy_errors(self, value: bool) -> None:
        with self._lock:
            self._legacy_errors = bool(value)

    # ----------------------------------------------------------------- counters

    @property
    def exchanges(self) -> int:
        with self._lock:
            return self._exchanges

    @property
    def token_requests(self) -> int:
        with self._lock:
            return self._token_requests

    @property
    def peak_in_flight(self) -> int:
        """The most token requests served at once since the counters were last reset."""
        with self._lock:
            return self._peak_in_flight

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since the counters were last reset (keep-alive reuse
        shows as fewer connections than requests)."""
        with self._lock:
            return self._connections_accepted

    @property
    def api_requests(self) -> int:
        with self._lock:
            return self._api_requests

    @property
    def api_unauthorized(self) -> int:
        with self._lock:
            return self._api_unauthorized

    @property
    def issued(self) -> list[IssuedRecord]:
        """A snapshot copy, so callers can iterate while handlers keep appending."""
        with self._lock:
            return list(self._issued)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def reset_counters(self) -> None:
        """Zero the counters and ``issued``; tokens, faults and settings are left alone."""
        with self._lock:
            self._exchanges = 0
            self._token_requests = 0
            self._api_requests = 0
            self._api_unauthorized = 0
            self._peak_in_flight = self._in_flight
            self._connections_accepted = 0
            self._issued.clear()

    # ----------------------------------------------------------------- test controls

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def add_client(self, client_id: str, client_secret: str) -> None:
        """Register another application (a second client id), e.g. to own a foreign token."""
        with self._lock:
            self._clients[client_id] = client_secret

    def revoke_token(self, token: str) -> bool:
        """Revoke as an operator would; returns whether the token was known at all."""
        with self._lock:
            record = self._tokens.get(token)
            if record is None:
                return False
            record.revoked = True
            return True

    def is_valid(self, token: str) -> bool:
        with self._lock:
            record = self._tokens.get(token)
            return record is not None and record.live(self._clock())

    def wait_for_token_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Block until ``n`` token requests have arrived; wakes on each arrival, never polls."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._token_requests >= n or self._stopping.is_set(), timeout=timeout
            )
            return self._token_requests >= n

    def pause_tokens(self) -> None:
        """Hold every token request after it is counted, so a test can keep an exchange
        in flight for as long as it needs without timing guesses."""
        with self._lock:
            self._paused = True

    def resume_tokens(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # ----------------------------------------------------------------- handler plumbing

    def _track_connection(self, conn: socket.socket) -> bool:
        with self._lock:
            if self._stopping.is_set():
                return False
            self._connections.add(conn)
            self._connections_accepted += 1
            return True

    def _untrack_connection(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.discard(conn)
            self._cond.notify_all()

    def _token_request_arrived(self) -> Fault | None:
        """Count the request and take its fault in one step, so fault N always goes to the
        Nth request to arrive, however the handler threads are later scheduled."""
        with self._cond:
            self._token_requests += 1
            self._cond.notify_all()
            return self._faults.popleft() if self._faults else None

    def _pass_gate(self) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: not self._paused or self._stopping.is_set())
            return not self._stopping.is_set()

    def _stall(self, seconds: float) -> bool:
        """Wait, but give up the moment the server stops; True means "carry on"."""
        if seconds <= 0:
            return not self._stopping.is_set()
        return not self._stopping.wait(seconds)

    def _client_ok(self, client_id: str, client_secret: str) -> bool:
        expected = self._clients.get(client_id)
        if expected is None or not client_secret:
            return False
        return secrets.compare_digest(client_secret.encode("utf-8"), expected.encode("utf-8"))

    def _oauth_error(self, error: str, description: str, status: int) -> _Reply:
        with self._lock:
            legacy = self._legacy_errors
        headers: _Headers = (
            *_NO_STORE,
            ("WWW-Authenticate", _www_authenticate(error, description)),
        )
        body = {"error": error, "error_description": description}
        return _json_reply(401 if legacy else status, body, headers)

    def _token_request_started(self) -> bool:
        """Count a token request in flight; True if another one already was (a race)."""
        with self._lock:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            return self._in_flight > 1

    def _token_request_ended(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _token_reply(
        self, params: Mapping[str, str], basic: tuple[str, str] | None, racing: bool = False
    ) -> _Reply:
        # Doorkeeper resolves the grant strategy before it authenticates the client, so a
        # bad grant_type wins over bad credentials.
        grant_type = params.get("grant_type", "")
        if not grant_type.strip():
            return self._oauth_error("invalid_request", _DESC_MISSING_GRANT, 400)
        if grant_type != "client_credentials":
            return self._oauth_error("unsupported_grant_type", _DESC_UNSUPPORTED_GRANT, 400)
        client_id, client_secret = basic or (
            params.get("client_id", ""),
            params.get("client_secret", ""),
        )
        if not self._client_ok(client_id, client_secret):
            return self._oauth_error("invalid_client", _DESC_INVALID_CLIENT, 401)
        if racing and self._mode == "revoke_previous":
            # Doorkeeper revokes the previous token and creates one in a transaction; a second
            # request of the same client inside it loses (contract, section 9).
            return self._oauth_error("invalid_token_reuse", _DESC_TOKEN_REUSE, 400)
        body = self._issue(client_id)
        return _json_reply(200, body, _NO_STORE)

    def _issue(self, client_id: str) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            mine = self._client_tokens.setdefault(client_id, [])
            mine[:] = [t for t in mine if t.live(now)]
            if self._mode == "reuse" and mine:
                token = mine[-1]
                expires_in = token.remaining(now)
                reused = True
            else:
                if self._mode == "revoke_previous":
                    for old in mine:
                        old.revoked = True
                    mine.clear()
                value = secrets.token_urlsafe(32)
                while value in self._tokens:  # pragma: no cover - 256-bit collision
                    value = secrets.token_urlsafe(32)
                token = _Token(value, client_id, time.time(), now, self._expires_in)
                self._tokens[value] = token
                mine.append(token)
                expires_in = token.lifetime
                reused = False
            self._exchanges += 1
            self._issued.append(IssuedRecord(token.value, now, expires_in, reused))
            created_at: int | str = (
                _iso_eat(token.created_wall)
                if self._created_at == "iso"
                else int(token.created_wall)
            )
        return {
            "access_token": token.value,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "created_at": created_at,
        }

    def _revoke_reply(self, params: Mapping[str, str], basic: tuple[str, str] | None) -> _Reply:
        client_id, client_secret = basic or (
            params.get("client_id", ""),
            params.get("client_secret", ""),
        )
        forbidden = _json_reply(
            403, {"error": "unauthorized_client", "error_description": _DESC_REVOKE_UNAUTHORIZED}
        )
        # Doorkeeper order: authenticate the client, then treat unknown tokens as success
        # (RFC 7009), then refuse tokens that belong to somebody else.
        if not self._client_ok(client_id, client_secret):
            return forbidden
        with self._lock:
            record = self._tokens.get(params.get("token", ""))
            if record is None:
                return _json_reply(200, {})
            if record.client_id != client_id:
                return forbidden
            record.revoked = True
        return _json_reply(200, {})

    def _introspect_reply(self, params: Mapping[str, str], basic: tuple[str, str] | None) -> _Reply:
        client_id, client_secret = basic or (
            params.get("client_id", ""),
            params.get("client_secret", ""),
        )
        if not self._client_ok(client_id, client_secret):
            return self._oauth_error("invalid_client", _DESC_INVALID_CLIENT, 401)
        with self._lock:
            record = self._tokens.get(params.get("token", ""))
            # Doorkeeper's default allow_token_introspection hides other clients' tokens.
            if record is None or record.client_id != client_id or not record.live(self._clock()):
                return _json_reply(200, {"active": False})
            exp_wall, iat_wall = record.created_wall + record.lifetime, record.created_wall
            # K2 customises Doorkeeper here: ISO strings in EAT instead of RFC 7662 ints.
            iso = self._introspection_times == "iso"
            body = {
                "active": True,
                "scope": "",
                "client_id": record.client_id,
                "token_type": "Bearer",
                "exp": _iso_eat(exp_wall) if iso else int(exp_wall),
                "iat": _iso_eat(iat_wall) if iso else int(iat_wall),
            }
        return _json_reply(200, body)

    def _token_info_reply(self, token: str | None) -> _Reply:
        with self._lock:
            record = self._tokens.get(token) if token else None
            now = self._clock()
            # Doorkeeper's InvalidTokenResponse checks revoked before expired.
            if record is None:
                description = _DESC_UNKNOWN
            elif record.revoked:
                description = _DESC_REVOKED
            elif record.expired(now):
                description = _DESC_EXPIRED
            else:
                info: dict[str, Any] = {
                    "resource_owner_id": None,
                    "scope": [],
                    "expires_in": record.remaining(now),
                    "application": {"uid": record.client_id},
                    "created_at": int(record.created_wall),
                }
                return _json_reply(200, info)
        headers: _Headers = (
            *_NO_STORE,
            ("WWW-Authenticate", _www_authenticate("invalid_token", description)),
        )
        body = {"error": "invalid_token", "error_description": description}
        return _json_reply(401, body, headers)

    def _api_reply(self, path: str, token: str | None) -> _Reply:
        with self._lock:
            self._api_requests += 1
            record = self._tokens.get(token) if token else None
            if record is not None and record.live(self._clock()):
                return _json_reply(200, {"ok": True, "path": path})
            self._api_unauthorized += 1
            expired = record is not None and not record.revoked
        message = "ExpiredAccessToken" if expired else "InvalidAccessToken"
        return _json_reply(401, {"error_code": 401, "error_message": message})


class _Server(ThreadingHTTPServer):
    # 64 worker processes may connect in the same instant; the default backlog of 5 would
    # make the kernel refuse some of them, which is not what the fleet tests measure.
    request_queue_size = 256
    daemon_threads = True
    # FakeK2Server.stop() waits for handlers itself, with a bound; the stock unbounded join
    # would hang on a handler parked on an idle keep-alive connection.
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeK2Server) -> None:
        self.fake = fake
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def accept_one(self) -> None:
        """Accept and dispatch one pending connection; the listening socket is non-blocking so
        a client that vanished between select() and accept() cannot wedge the loop."""
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall for seconds on
        # machines with broken reverse DNS; the loopback name is all we need.
        socketserver.TCPServer.server_bind(self)
        self.socket.setblocking(False)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-reply is routine here (timeouts, disconnect tests); only
        # real bugs deserve the default traceback on stderr.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real clients and connection pools expect
    server_version = "FakeK2"
    # Headers and body are written separately; without TCP_NODELAY, Nagle plus delayed ACKs
    # add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        self.request.setblocking(True)  # do not inherit the listener's non-blocking mode
        super().setup()
        if not self.server.fake._track_connection(self.connection):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._untrack_connection(self.connection)

    def version_string(self) -> str:
        """Just a product name: the default also advertises the Python version."""
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the default writes request lines to stderr, and a token can sit in a URL."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ----------------------------------------------------------------- routing

    def _dispatch(self, method: str) -> None:
        # Always drain the body first, or the next request on a keep-alive connection would
        # be parsed out of this one's leftovers.
        body = self._read_body()
        if body is None:
            self.close_connection = True
            self._write(
                _json_reply(
                    400,
                    {"error": "invalid_request", "error_description": "Unreadable request body."},
                )
            )
            return
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"  # Rails routes ignore a trailing slash
        fake = self.server.fake
        if path == "/oauth/token" and method == "POST":
            self._handle_token(body, url.query)
        elif path == "/oauth/token/info" and method == "GET":
            # Doorkeeper's access_token_methods: the header, then access_token, then bearer_token.
            query = dict(parse_qsl(url.query))
            token = (
                self._bearer_token() or query.get("access_token") or query.get("bearer_token")
            )
            self._write(fake._token_info_reply(token))
        elif path in ("/oauth/revoke", "/oauth/introspect") and method == "POST":
            params = self._params(body, url.query)
            if params is None:
                self._write(self._unparseable())
            elif path == "/oauth/revoke":
                self._write(fake._revoke_reply(params, self._basic_credentials()))
            else:
                self._write(fake._introspect_reply(params, self._basic_credentials()))
        elif url.path.startswith("/api/") and method in ("GET", "POST"):
            self._write(fake._api_reply(url.path, self._bearer_token()))
        else:
            description = f"No route matches {method} {path}"
            self._write(_json_reply(404, {"error": "not_found", "error_description": description}))

    def _handle_token(self, body: bytes, query: str) -> None:
        fake = self.server.fake
        racing = fake._token_request_started()
        ended = False

        def end() -> None:  # before the reply goes out: the client may ask again at once
            nonlocal ended
            if not ended:
                ended = True
                fake._token_request_ended()

        try:
            self._serve_token(body, query, racing, end)
        finally:
            end()

    def _serve_token(
        self, body: bytes, query: str, racing: bool, end: Callable[[], None]
    ) -> None:
        fake = self.server.fake
        fault = fake._token_request_arrived()
        if not fake._pass_gate() or not fake._stall(fake.latency):
            self._drop()
            return
        if fault is not None:
            if fault.kind == "disconnect":
                self._drop()
                return
            if fault.kind == "slow":
                if not fake._stall(fault.delay):
                    self._drop()
                    return
            else:
                self._write(fault._as_reply())
                return
        params = self._params(body, query)
        if params is None:
            self._write(self._unparseable())
            return
        reply = fake._token_reply(params, self._basic_credentials(), racing)
        end()
        self._write(reply)

    # ----------------------------------------------------------------- request parsing

    def _read_body(self) -> bytes | None:
        if "chunked" in str(self.headers.get("Transfer-Encoding", "")).lower():
            return self._read_chunked()
        raw_length = str(self.headers.get("Content-Length", "") or "").strip()
        if not raw_length:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            return None
        if not 0 <= length <= _MAX_BODY:
            return None
        data = self.rfile.read(length)
        return data if len(data) == length else None

    def _read_chunked(self) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # discard trailers
                return b"".join(chunks)
            total += size
            if total > _MAX_BODY:
                return None
            data = self.rfile.read(size)
            if len(data) != size:
                return None
            chunks.append(data)
            self.rfile.readline(1024)

    def _params(self, body: bytes, query: str) -> dict[str, str] | None:
        """Merge query and body the way Rails builds ``params`` (body wins); None if the body
        cannot be parsed. K2's own SDKs send both form and JSON bodies."""
        params = dict(parse_qsl(query, keep_blank_values=True))
        media_type = str(self.headers.get("Content-Type", "") or "").split(";", 1)[0]
        media_type = media_type.strip().lower()
        if media_type == "application/json" or media_type.endswith("+json"):
            if not body.strip():
                return params
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return None
            if isinstance(parsed, dict):
                for key, value in parsed.items():
                    if isinstance(value, str):
                        params[key] = value
                    elif isinstance(value, int | float) and not isinstance(value, bool):
                        params[key] = str(value)
            return params
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
        params.update(parse_qsl(text, keep_blank_values=True))
        return params

    def _basic_credentials(self) -> tuple[str, str] | None:
        """Doorkeeper tries HTTP Basic before body params and URL-decodes both halves."""
        scheme, _, value = str(self.headers.get("Authorization", "") or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, sep, client_secret = decoded.partition(":")
        if not sep or not client_id:
            return None
        return unquote_plus(client_id), unquote_plus(client_secret)

    def _bearer_token(self) -> str | None:
        scheme, _, value = str(self.headers.get("Authorization", "") or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return value.strip()

    @staticmethod
    def _unparseable() -> _Reply:
        description = "The request body could not be parsed."
        return _json_reply(400, {"error": "invalid_request", "error_description": description})

    # ----------------------------------------------------------------- replies

    def _drop(self) -> None:
        """End the exchange with no reply at all; socketserver then closes the socket."""
        self.close_connection = True

    def _write(self, reply: _Reply) -> None:
        allowed = _body_allowed(reply.status)
        body = reply.body if allowed else b""
        headers: dict[str, tuple[str, str]] = {}
        if reply.content_type is not None and allowed:
            headers["content-type"] = ("Content-Type", reply.content_type)
        for name, value in reply.headers:
            # Framing is ours to decide: a wrong Content-Length would desync keep-alive.
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                headers[name.lower()] = (name, value)
        self.send_response(reply.status)
        for name, value in headers.values():
            self.send_header(name, value)
        if allowed:
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)


# --------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Shared with the package CLI so ``k2-token fake-server`` and ``python -m`` agree."""
    parser.add_argument("--host", default="127.0.0.1", choices=sorted(_LOOPBACK_HOSTS))
    parser.add_argument(
        "--listen-all",
        action="store_true",
        help="bind 0.0.0.0, for a container that other containers reach by name",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    parser.add_argument("--expires-in", type=int, default=3600, help="token lifetime, seconds")
    parser.add_argument("--token-mode", choices=TOKEN_MODES, default="new")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per token request")
    parser.add_argument("--created-at", choices=CREATED_AT_FORMATS, default="int")
    parser.add_argument(
        "--introspection-times",
        choices=INTROSPECTION_TIME_FORMATS,
        default="iso",
        help="introspection exp/iat: K2's ISO-8601 strings or Doorkeeper's integers",
    )
    parser.add_argument(
        "--legacy-errors",
        action="store_true",
        help="answer every OAuth error with 401, like Doorkeeper before 5.1",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGINT or SIGTERM, then shut down cleanly."""
    client_id = str(args.client_id)
    client_secret = str(args.client_secret)
    server = FakeK2Server(
        {client_id: client_secret},
        expires_in=int(args.expires_in),
        token_mode=str(args.token_mode),
        latency=float(args.latency),
        created_at=str(args.created_at),
        introspection_times=str(args.introspection_times),
        legacy_errors=bool(args.legacy_errors),
        host=str(args.host),
        port=int(args.port),
        listen_all=bool(args.listen_all),
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        server.start()
        print(f"fake K2 server listening on {server.base_url} (client_id={client_id})", flush=True)
        if client_secret == DEFAULT_CLIENT_SECRET:
            # Public test value, so showing it helps; a user-chosen secret is never echoed.
            print(f"default test client_secret={client_secret}", file=sys.stderr, flush=True)
        # A timed wait keeps the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m k2_shared_token.testing.fake_k2",
        description="Run a fake Kopo Kopo K2 Connect OAuth server on a loopback address.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
