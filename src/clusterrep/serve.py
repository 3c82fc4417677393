"""Serving authenticated connections: `Server` listens, authenticates each peer in a thread of
its own (`wire.accept`) and hands the connection to a handler; `route` dispatches one
connection by the peer's role. Used by the replica and the coordinator."""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from .endpoint import Auth, as_auth, format_addr, normalise_addr
from .errors import ClusterrepError, ListenError, PeerClosed, WireError
from .wire import MAX_FRAME, Connection, _check_identity, _check_max_frame, _peer_of, accept

__all__ = ["Server", "route"]

log = logging.getLogger("clusterrep.wire")


class Server:
    """Listens on HOST:PORT; each accepted connection is authenticated in its own thread and then
    handed to ``handler(conn)`` in that thread.

    Refused peers are logged with their address and reason; nothing of theirs reaches the
    handler. The connection is closed when the handler returns (or raises: that is logged).
    ``timeout`` bounds each handshake. ``stop()`` closes the listening socket and every
    connection, and joins every thread it started.
    """

    def __init__(self, addr: str | tuple[str, int], auth: Auth | bytes, *, name: str, role: str,
                 handler: Callable[[Connection], None], max_frame: int = MAX_FRAME,
                 timeout: float = 10.0) -> None:
        self.address: tuple[str, int] = normalise_addr(addr, allow_port_zero=True)
        self._auth = as_auth(auth)
        _check_identity(name, role)
        _check_max_frame(max_frame)
        self._name = name
        self._role = role
        self._handler = handler
        self._max_frame = max_frame
        self._timeout = timeout
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        # a second descriptor of each socket still in its handshake: TLS takes the first one
        # over, and stop() must still be able to shut the connection down
        self._pending: set[socket.socket] = set()
        self._conns: set[Connection] = set()

    def __repr__(self) -> str:
        return f"<Server {self._role} {self._name} on {format_addr(*self.address)}>"

    def start(self) -> None:
        """Bind and listen (``SO_REUSEADDR``), then accept in a daemon thread."""
        if self._listener is not None or self._stopping.is_set():
            raise RuntimeError(f"{self!r} was already started")
        self._listener = _listen(*self.address)
        self.address = self._listener.getsockname()[:2]
        self._wake = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"wire-accept-{format_addr(*self.address)}", daemon=True)
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, join every thread (each up to ``timeout``)."""
        self._stopping.set()
        accept_thread, self._accept_thread = self._accept_thread, None
        if accept_thread is not None and self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"x")
            accept_thread.join(timeout)
        for sock in (self._listener, *(self._wake or ())):
            if sock is not None:
                sock.close()
        with self._lock:
            pending, conns = list(self._pending), list(self._conns)
            threads = list(self._threads)
        for waker in pending:
            with contextlib.suppress(OSError):
                waker.shutdown(socket.SHUT_RDWR)  # its thread closes it
        for conn in conns:
            conn.close()
        end = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
            if thread.is_alive():
                log.warning("%r: thread %s did not finish within %gs of stop()", self, thread.name,
                            timeout)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake is not None
        listener = self._listener
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            if self._stopping.is_set():
                break
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                log.error("%r: accept failed: %s", self, exc.strerror or exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._stopping.wait(0.1)  # out of resources: do not spin
                continue
            sock.setblocking(True)
            self._spawn(sock)

    def _spawn(self, sock: socket.socket) -> None:
        try:
            waker = sock.dup()
        except OSError as exc:
            log.error("%r: cannot serve %s: %s", self, _peer_of(sock), exc.strerror or exc)
            sock.close()
            return
        thread = threading.Thread(target=self._serve, args=(sock, waker), daemon=True,
                                  name=f"wire-conn-{_peer_of(sock)}")
        with self._lock:
            if self._stopping.is_set():
                sock.close()
                waker.close()
                return
            self._threads.add(thread)
            self._pending.add(waker)
        thread.start()

    def _serve(self, sock: socket.socket, waker: socket.socket) -> None:
        try:
            try:
                conn = accept(sock, self._auth, name=self._name, role=self._role,
                              timeout=self._timeout, max_frame=self._max_frame)
            except WireError:
                return  # accept() logged it and closed the socket
            finally:
                with self._lock:
                    self._pending.discard(waker)
                waker.close()
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
            try:
                self._handler(conn)
            except Exception:
                log.exception("%r: handler for %s failed", self, conn.who)
            finally:
                conn.close()
                with self._lock:
                    self._conns.discard(conn)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or `ListenError` saying why not."""
    shown = format_addr(host, port)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {shown}: cannot resolve {host!r}: {exc.strerror}",
                          hint="use an address of this machine, or :PORT for all interfaces") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {shown}: address already in use",
                              hint="another process (perhaps another clusterrep) listens there; "
                                   "stop it or choose another port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ListenError(f"cannot listen on {shown}: no such address on this machine",
                              hint="use an address of this machine, or :PORT for all interfaces"
                              ) from None
        if exc.errno == errno.EACCES:
            raise ListenError(f"cannot listen on {shown}: permission denied",
                              hint="ports below 1024 need privileges; choose a higher port") from None
        raise ListenError(f"cannot listen on {shown}: {exc.strerror or exc}") from None
    return sock


def route(conn: Connection, handlers: dict[str, Callable[[Connection], None]],
          logger: logging.Logger) -> None:
    """Serve one authenticated connection with the handler for the peer's role; a peer that
    goes away ends it quietly, any other refusal is logged; the connection is always closed."""
    try:
        handler = handlers.get(conn.peer_role)
        if handler is None:
            conn.send({"t": "error", "message": f"unknown role {conn.peer_role!r}"})
        else:
            handler(conn)
    except PeerClosed:
        pass
    except ClusterrepError as exc:
        logger.warning("connection from %s (%s) closed: %s", conn.peer_addr, conn.peer_name, exc)
    finally:
        conn.close()
