"""A loopback TCP proxy that tests can partition, cut or put TLS in front of, at any moment.

Real network faults (a partition where TCP still connects but nothing answers, a server that
went away, a TLS terminator such as stunnel in front of Redis) are what a Redis client meets in
production and what a fake client object cannot reproduce: timeouts, half-open sockets and TLS
handshakes happen in the kernel and in OpenSSL, so they are only tested by real sockets.

One thread runs a selector over every socket. TLS is done with ``ssl.MemoryBIO`` objects on
that same thread rather than with ``SSLSocket``: OpenSSL connections must not be used by two
threads at once, and a single thread also makes a mode switch a clean cut between two loop
iterations. A switch returns only once the loop has applied it, so a test that calls
:meth:`TcpProxy.blackhole` knows no byte is forwarded afterwards, without sleeping.
"""

from __future__ import annotations

import contextlib
import enum
import selectors
import socket
import ssl
import struct
import threading
from types import TracebackType

__all__ = ["Mode", "TcpProxy"]

_CHUNK = 65536
# Past this many buffered bytes a side stops being read: TCP back-pressure, not unbounded memory.
_HIGH_WATER = 1 << 20
_LOOPBACK = "127.0.0.1"


class Mode(enum.Enum):
    FORWARD = "forward"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN: what a client sees from a port nobody serves."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Link:
    """One client connection, its upstream connection and the bytes in flight between them.

    ``to_client`` holds wire bytes (ciphertext under TLS); ``to_upstream`` holds plaintext.
    """

    def __init__(self, client: socket.socket, tls_context: ssl.SSLContext | None) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.to_client = bytearray()
        self.to_upstream = bytearray()
        self.closing = False  # one side ended: flush what the other side is owed, then close
        self.tls: ssl.SSLObject | None = None
        self.tls_in = ssl.MemoryBIO()
        self.tls_out = ssl.MemoryBIO()
        self.handshaken = tls_context is None
        self.plain_pending = bytearray()  # upstream bytes that arrived before the handshake
        if tls_context is not None:
            self.tls = tls_context.wrap_bio(self.tls_in, self.tls_out, server_side=True)

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]

    def flush_tls(self) -> None:
        if self.tls is not None:
            self.to_client += self.tls_out.read()

    def from_client(self, data: bytes) -> None:
        """Wire bytes from the client; raises ``ssl.SSLError`` when the TLS session fails."""
        if self.tls is None:
            self.to_upstream += data
            return
        self.tls_in.write(data)
        if not self.handshaken:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.flush_tls()
                return
            self.handshaken = True
            self.flush_tls()
            if self.plain_pending:
                self.from_upstream(bytes(self.plain_pending))
                self.plain_pending.clear()
        while True:
            try:
                chunk = self.tls.read(_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the client is done
                self.closing = True
                break
            if not chunk:
                break
            self.to_upstream += chunk
        self.flush_tls()  # TLS 1.3 may answer (key updates) while reading

    def from_upstream(self, data: bytes) -> None:
        if self.tls is None:
            self.to_client += data
        elif not self.handshaken:
            self.plain_pending += data
        else:
            self.tls.write(data)
            self.flush_tls()

    def close(self, *, reset: bool = False) -> None:
        for sock in self.sockets():
            if reset:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``; a context manager.

    Modes, switchable from any thread at any time (each call returns once it is in effect):

    - :meth:`forward` (default): bytes flow both ways;
    - :meth:`blackhole`: a partition. TCP still connects, nothing answers: no socket is read or
      written, so bytes pile up in kernel buffers. Connections accepted meanwhile get no
      upstream until :meth:`forward` heals the partition, after which everything flows on;
    - :meth:`refuse`: open connections are closed, new ones are reset as soon as accepted.

    With ``tls_context`` (a server-side context) the proxy terminates TLS and forwards plaintext,
    as stunnel would in front of a Redis that has no TLS of its own.
    """

    def __init__(self, target_port: int, *, tls_context: ssl.SSLContext | None = None) -> None:
        self.target_port = target_port
        self.tls_context = tls_context
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._mode = Mode.FORWARD
        self._wanted_version = 0  # bumped by every switch request
        self._applied_version = 0  # what the loop has acted on
        self._accepted = 0
        self._links: list[_Link] = []
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._masks: dict[socket.socket, int] = {}
        self._selector: selectors.BaseSelector | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        if self._thread is not None:
            raise RuntimeError("TcpProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_LOOPBACK, 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._wake = socket.socketpair()
        for end in self._wake:
            end.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(
            target=self._run, name=f"tcp-proxy:{self.port}->{self.target_port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Idempotent: closes every socket and joins the loop thread before returning."""
        thread = self._thread
        if thread is None:
            return
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._poke()
        thread.join()
        self._thread = None
        if self._wake is not None:
            for end in self._wake:
                end.close()
            self._wake = None

    def __enter__(self) -> TcpProxy:
        return self.start() if self._thread is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("TcpProxy is not started")
        return int(self._listener.getsockname()[1])

    # -- modes and counters ------------------------------------------------------------------

    def forward(self) -> None:
        self._switch(Mode.FORWARD)

    def blackhole(self) -> None:
        self._switch(Mode.BLACKHOLE)

    def refuse(self) -> None:
        self._switch(Mode.REFUSE)

    @property
    def mode(self) -> Mode:
        with self._lock:
            return self._mode

    @property
    def accepted(self) -> int:
        """Connections accepted since start, in every mode."""
        with self._lock:
            return self._accepted

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def wait_for_accepted(self, n: int, timeout: float = 5.0) -> bool:
        """Block until ``n`` connections have been accepted; woken by each accept, no polling."""
        with self._changed:
            self._changed.wait_for(lambda: self._accepted >= n or self._stopping, timeout)
            return self._accepted >= n

    def _switch(self, mode: Mode, timeout: float = 5.0) -> None:
        if self._thread is None:
            raise RuntimeError("TcpProxy is not started")
        with self._changed:
            self._mode = mode
            self._wanted_version += 1
            version = self._wanted_version
        self._poke()
        with self._changed:
            applied = self._changed.wait_for(
                lambda: self._applied_version >= version or self._stopping, timeout
            )
        if not applied:
            raise TimeoutError(f"the proxy loop did not switch to {mode.value} in {timeout} s")

    def _poke(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake[1].send(b"\0")

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None and self._listener is not None and self._wake is not None
        try:
            self._watch(self._listener, selectors.EVENT_READ)
            self._watch(self._wake[0], selectors.EVENT_READ)
            while True:
                with self._changed:
                    if self._stopping:
                        return
                    mode, version = self._mode, self._wanted_version
                if version != self._applied_version:
                    self._apply(mode)
                    with self._changed:
                        self._applied_version = version
                        self._changed.notify_all()
                self._update_interest(mode)
                for key, events in self._selector.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    self._dispatch(sock, events, mode)
        finally:
            for link in self._take_links():
                link.close()
            self._listener.close()
            self._selector.close()

    def _apply(self, mode: Mode) -> None:
        if mode is Mode.REFUSE:
            for link in self._take_links():
                self._forget(link)
                link.close()
        elif mode is Mode.FORWARD:
            for link in list(self._links):
                if link.upstream is None:
                    self._connect_upstream(link)

    def _take_links(self) -> list[_Link]:
        with self._lock:
            links, self._links = self._links, []
        return links

    def _dispatch(self, sock: socket.socket, events: int, mode: Mode) -> None:
        assert self._wake is not None
        if sock is self._wake[0]:
            with contextlib.suppress(BlockingIOError):
                sock.recv(_CHUNK)
            return
        if sock is self._listener:
            self._accept(mode)
            return
        link = self._link_of(sock)
        if link is None:
            return
        try:
            if events & selectors.EVENT_READ:
                self._read(link, sock)
            if events & selectors.EVENT_WRITE:
                self._write(link, sock)
        except (OSError, ssl.SSLError):
            self._drop(link)
            return
        if link.closing and not (link.to_client or link.to_upstream):
            self._drop(link)

    def _accept(self, mode: Mode) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        with self._changed:
            self._accepted += 1
            self._changed.notify_all()
        if mode is Mode.REFUSE:
            _reset(client)
            return
        client.setblocking(False)
        link = _Link(client, self.tls_context)
        with self._lock:
            self._links.append(link)
        if mode is Mode.FORWARD:
            self._connect_upstream(link)

    def _connect_upstream(self, link: _Link) -> None:
        try:
            upstream = socket.create_connection((_LOOPBACK, self.target_port), timeout=5)
        except OSError:
            self._drop(link)  # nobody behind us: the client sees its connection end
            return
        upstream.setblocking(False)
        link.upstream = upstream

    def _read(self, link: _Link, sock: socket.socket) -> None:
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        if not data:
            link.closing = True
            return
        if sock is link.client:
            link.from_client(data)
        else:
            link.from_upstream(data)

    @staticmethod
    def _write(link: _Link, sock: socket.socket) -> None:
        buffer = link.to_client if sock is link.client else link.to_upstream
        if not buffer:
            return
        try:
            sent = sock.send(buffer)
        except BlockingIOError:
            return
        del buffer[:sent]

    def _link_of(self, sock: socket.socket) -> _Link | None:
        for link in self._links:
            if sock is link.client or sock is link.upstream:
                return link
        return None

    def _drop(self, link: _Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        self._forget(link)
        link.close()

    # -- selector bookkeeping ----------------------------------------------------------------

    def _watch(self, sock: socket.socket, mask: int) -> None:
        """Register, modify or unregister ``sock`` so that the selector waits for ``mask``."""
        assert self._selector is not None
        old = self._masks.get(sock, 0)
        if mask == old:
            return
        if old == 0:
            self._selector.register(sock, mask)
        elif mask == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask)
        if mask:
            self._masks[sock] = mask
        else:
            self._masks.pop(sock, None)

    def _forget(self, link: _Link) -> None:
        for sock in link.sockets():
            self._watch(sock, 0)

    def _update_interest(self, mode: Mode) -> None:
        for link in self._links:
            if mode is not Mode.FORWARD or link.upstream is None:
                # A partition: read nothing, write nothing; the kernel buffers what arrives.
                self._forget(link)
                continue
            reading = not link.closing
            client_mask = upstream_mask = 0
            if reading and len(link.to_upstream) < _HIGH_WATER:
                client_mask |= selectors.EVENT_READ
            if reading and len(link.to_client) < _HIGH_WATER:
                upstream_mask |= selectors.EVENT_READ
            if link.to_client:
                client_mask |= selectors.EVENT_WRITE
            if link.to_upstream:
                upstream_mask |= selectors.EVENT_WRITE
            self._watch(link.client, client_mask)
            self._watch(link.upstream, upstream_mask)
