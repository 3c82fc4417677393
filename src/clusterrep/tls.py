"""TLS with client certificates beneath the token handshake (optional: ``--tls-cert --tls-key
--tls-ca``).

With TLS on, every connection is encrypted and both ends prove who they are with a certificate
issued by the cluster's own CA (``--tls-ca``; the system's CAs are not trusted). A client checks
that the server's certificate names the address it dialled (a DNS or IP subjectAltName, as HTTPS
does); a server checks that a node's or the coordinator's certificate names the identity it
claims (as its common name), so one host's certificate cannot speak for another. Identities are
common names only, subjectAltNames addresses only. The shared token handshake still runs
inside TLS: a peer needs both.

This module owns the TLS contexts and `TlsStream`, a TLS socket that one thread may read while
another writes: the socket is non-blocking, each TLS call runs under a lock and all waiting
happens in ``poll`` outside it, so a blocked reader never holds up a writer.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import AuthError, ConfigError, FrameError, PeerClosed

__all__ = ["TlsConfig", "TlsStream", "cert_names", "client_wrap", "server_wrap", "wait_ready"]

_TLS_HINT = "check --tls-cert, --tls-key and --tls-ca on both sides: certificates from one CA"
# OpenSSL reasons that mean the other end did not speak TLS at all.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL", "HTTP_REQUEST",
            "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD", "UNSUPPORTED_PROTOCOL"}
_JOIN_LIMIT = 256 * 1024  # parts smaller than this in total go out as one TLS write


class TlsConfig:
    """The certificate, key and CA of one process, loaded and checked at start-up.

    Raises `ConfigError` naming the file and the fault: missing, unreadable, not PEM, a key that
    does not match the certificate.
    """

    def __init__(self, cert: str | Path, key: str | Path, ca: str | Path) -> None:
        self.cert, self.key, self.ca = Path(cert), Path(key), Path(ca)
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if not path.is_file():
                raise ConfigError(f"{what} {path} does not exist or is not a file",
                                  hint="create a CA and certificates with: clusterrep certs --help")
        self.server_context = self._context(ssl.PROTOCOL_TLS_SERVER)
        self.client_context = self._context(ssl.PROTOCOL_TLS_CLIENT)

    @classmethod
    def from_options(cls, cert: str | None, key: str | None, ca: str | None) -> TlsConfig | None:
        """All three given: a config; none: ``None`` (no TLS); some: `ConfigError`."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(given.values()):
            return None
        missing = [k for k, v in given.items() if not v]
        if missing:
            raise ConfigError(f"TLS needs --tls-cert, --tls-key and --tls-ca together; "
                              f"missing: {', '.join(missing)}")
        assert cert and key and ca
        return cls(cert, key, ca)

    def __repr__(self) -> str:
        return f"<TlsConfig cert={self.cert} ca={self.ca}>"

    def _context(self, protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED  # servers too: a client without a certificate is refused
        ctx.hostname_checks_common_name = False  # a name (CN) is an identity, never an address
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the CA certificate {self.ca}: {_reason(exc)}",
                              hint="--tls-ca must be a PEM certificate (the CA's, not a key)") from None
        try:
            ctx.load_cert_chain(certfile=str(self.cert), keyfile=str(self.key))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot load certificate {self.cert} with key {self.key}: "
                              f"{_reason(exc)}",
                              hint="--tls-cert must be a PEM certificate and --tls-key its own "
                                   "unencrypted PEM private key") from None
        return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def cert_names(cert: dict | None) -> set[str]:  # type: ignore[type-arg]
    """The identities a peer certificate (``getpeercert()``) names: its common names only.

    SubjectAltNames are addresses (what a client checks the server against), never identities:
    otherwise a certificate issued for a host *called* "h1" would pass for node h1.
    """
    names: set[str] = set()
    for rdn in (cert or {}).get("subject", ()):
        names.update(value for key, value in rdn if key == "commonName")
    return names


def wait_ready(sock: socket.socket, event: int, deadline: float | None) -> None:
    """Wait until ``sock`` is ready for ``event``; `TimeoutError` at ``deadline``."""
    poller = select.poll()
    try:
        poller.register(sock, event)
    except (ValueError, OSError):
        raise PeerClosed("connection is closed") from None
    if deadline is None:
        poller.poll()
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
        raise TimeoutError


def _handshake(ssock: ssl.SSLSocket, deadline: float) -> None:
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            wait_ready(ssock, select.POLLIN, deadline)
        except ssl.SSLWantWriteError:
            wait_ready(ssock, select.POLLOUT, deadline)


def client_wrap(sock: socket.socket, config: TlsConfig, host: str, peer: str,
                deadline: float) -> TlsStream:
    """Start TLS as the client on a connected socket; check the server's certificate and name."""
    ssock = config.client_context.wrap_socket(sock, server_hostname=host,
                                              do_handshake_on_connect=False)
    return _start(ssock, peer, deadline, f"{peer}'s certificate is not trusted",
                  f"its certificate must come from our --tls-ca and name the address dialled "
                  f"({host}) as a DNS or IP subjectAltName", server=False)


def server_wrap(sock: socket.socket, config: TlsConfig, peer: str, deadline: float) -> TlsStream:
    """Start TLS as the server on an accepted socket; the client must present a certificate."""
    ssock = config.server_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    return _start(ssock, peer, deadline, f"{peer}'s client certificate is not trusted",
                  "its certificate must be issued by this server's --tls-ca", server=True)


def _start(ssock: ssl.SSLSocket, peer: str, deadline: float, untrusted: str, untrusted_hint: str,
           *, server: bool) -> TlsStream:
    """The TLS handshake up to ``deadline``, its failures as errors a user can act on."""
    ssock.setblocking(False)
    try:
        try:
            _handshake(ssock, deadline)
        except BaseException:
            ssock.close()  # wrap_socket took the descriptor from the plain socket: close it here
            raise
    except TimeoutError:
        raise AuthError(f"{peer} did not complete the TLS handshake in time", hint=_TLS_HINT) from None
    except ssl.SSLCertVerificationError as exc:
        raise AuthError(f"{untrusted}: {_reason(exc)}", hint=untrusted_hint) from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
        if not server:
            raise PeerClosed(f"{peer} closed the connection during the TLS handshake") from exc
        raise AuthError(f"{peer} closed the connection instead of starting TLS",
                        hint="does it run without --tls-cert, --tls-key and --tls-ca? With TLS "
                             "on, every member needs them") from None
    except ssl.SSLError as exc:
        raise _translate(exc, peer, during="the TLS handshake") from None
    return TlsStream(ssock, peer)


def _translate(exc: ssl.SSLError, peer: str, *, during: str) -> AuthError | FrameError | PeerClosed:
    """A TLS failure as the error a user can act on."""
    reason = str(exc.reason or "")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return PeerClosed(f"{peer} closed the connection during {during}")
    if reason in _NOT_TLS:
        return AuthError(f"{peer} does not speak TLS (it answered in clear during {during})",
                         hint="run both sides with --tls-cert, --tls-key and --tls-ca, or neither")
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        return AuthError(f"{peer} refused our certificate ({_reason(exc)})", hint=_TLS_HINT)
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason or "HANDSHAKE_FAILURE" in reason:
        return AuthError(f"{peer} refused the TLS session during {during}: {_reason(exc)}",
                         hint=_TLS_HINT)
    return FrameError(f"TLS failure with {peer} during {during}: {_reason(exc)}; the stream can no "
                      "longer be trusted")


class TlsStream:
    """A connected TLS socket for one reader thread and one writer thread at a time.

    ``recv_into`` returns 0 at the end of the stream, raises `TimeoutError` at its deadline and
    leaves the stream usable; TLS failures raise `AuthError`, `FrameError` or `PeerClosed`.
    """

    def __init__(self, ssock: ssl.SSLSocket, peer: str) -> None:
        self._sock = ssock
        self._peer = peer
        self._lock = threading.Lock()   # one TLS call at a time; never held while waiting
        self.names = cert_names(ssock.getpeercert())

    def fileno(self) -> int:
        return self._sock.fileno()

    def _attempt(self, op: Callable[..., int], arg: memoryview) -> tuple[int, int]:
        """One non-blocking TLS call under the lock: ``(result, 0)``, or ``(0, event)`` to poll for."""
        with self._lock:
            try:
                return op(arg), 0
            except ssl.SSLWantReadError:
                return 0, select.POLLIN
            except ssl.SSLWantWriteError:
                return 0, select.POLLOUT
            except ssl.SSLError as exc:
                raise _translate(exc, self._peer, during="the session") from None

    def recv_into(self, view: memoryview, deadline: float | None) -> int:
        while True:
            n, event = self._attempt(self._sock.recv_into, view)
            if not event:
                return n
            wait_ready(self._sock, event, deadline)

    def send_parts(self, parts: Iterable[bytes | memoryview]) -> None:
        """Send the parts in order (joined when small: each TLS write makes its own record)."""
        parts = list(parts)
        if sum(len(p) for p in parts) <= _JOIN_LIMIT:
            parts = [b"".join(parts)]
        for part in parts:
            self.sendall(part)

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n, event = self._attempt(self._sock.send, view)
            if event:
                wait_ready(self._sock, event, None)  # retried with the same bytes, as OpenSSL requires
            else:
                view = view[n:]

    def tell(self, data: bytes) -> None:
        """Best effort, without waiting: a last word to a peer being refused."""
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._sock.send(data)

    def shutdown(self) -> None:
        """Wake any thread waiting on this stream (the TCP socket, not a TLS close_notify)."""
        with self._lock, contextlib.suppress(OSError, ValueError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._sock.close()
