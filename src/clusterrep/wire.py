"""Authenticated, encrypted, framed TCP connections between clusterrep processes.

The replica server, the coordinator and the node agents talk through this module (blocking
sockets, one thread per connection). Every connection starts with a mutual challenge-response
handshake on a shared token, which never crosses the wire; every frame after it is encrypted and
authenticated with AES-256-GCM under keys fresh for the connection, its counter as the nonce, so
a peer without the token can neither connect nor read, and a frame that was altered, replayed,
reordered or dropped on the way is refused, never delivered. Optionally (`tls`), the connection
is first upgraded to TLS 1.3 with client certificates.

Handshake frames are ``[u32 length][msgpack map]``, at most 4 KiB each (``H`` is HMAC-SHA256,
``sn``/``cn`` are 32 random bytes chosen by the server/client)::

    S->C  {"hello": "clusterrep", "version": 2, "nonce": sn, "name", "role", "tls": bool}
          (then, if "tls", TLS starts on both ends and the rest runs inside it)
    C->S  {"name", "role", "nonce": cn, "mac": H(token, "client\\0" sn cn name "\\0" role)}
    S->C  {"ok": True, "mac": H(token, "server\\0" cn sn name "\\0" role)}  or  {"error": "..."}

Session frames, with ``K = H(token, "session\\0" sn cn)`` and per direction
``Kd = H(K, "aead\\0" + direction)`` (direction b"C" client->server, b"S" server->client)::

    [u32 L][u64 counter][AES-256-GCM(Kd, nonce = 4 zero bytes + counter, msgpack payload)]
    L = 8 + len(payload) + 16 (the ciphertext is as long as the payload, then a 16-byte tag)

Counters start at 1 and grow by exactly one per frame and direction.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import select
import socket
import struct
import threading
import time
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .endpoint import (
    Auth,
    as_auth,
    format_addr,
    load_token,
    normalise_addr,
    parse_addr,
)
from .errors import (
    AddressError,
    AuthError,
    ConfigError,
    FrameError,
    ListenError,
    PeerClosed,
    WireError,
)
from .tls import TlsStream, client_wrap, server_wrap, wait_ready

__all__ = [
    "MAX_FRAME",
    "AddressError",
    "Auth",
    "AuthError",
    "ConfigError",
    "Connection",
    "FrameError",
    "ListenError",
    "PeerClosed",
    "WireError",
    "accept",
    "connect",
    "format_addr",
    "load_token",
    "parse_addr",
]

log = logging.getLogger("clusterrep.wire")

MAX_FRAME = 64 * 1024 * 1024      # default limit on one frame's payload
PROTOCOL = "clusterrep"
VERSION = 2                       # 2: frames encrypted with AES-256-GCM (1: HMAC tags only)
NONCE_BYTES = 32
TAG_BYTES = 16
HANDSHAKE_LIMIT = 4096            # largest handshake frame (payload bytes)

_OVERHEAD = 8 + TAG_BYTES         # counter and tag around each payload
_MIN_BODY = _OVERHEAD + 1         # the smallest msgpack value is one byte
_MAX_LENGTH = 0x7FFFFFFF          # the u32 length field could say more; AES-GCM takes < 2 GiB
_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">IQ")
_CLIENT, _SERVER = b"C", b"S"
_NONCE_PAD = bytes(4)             # AES-GCM nonce: 4 zero bytes, then the 8-byte frame counter
_BUF_START = 256 * 1024           # receive buffer of a new connection
_BUF_KEEP = 16 * 1024 * 1024      # a frame larger than this gets a buffer of its own, not kept
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
_ROLE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_TOKEN_HINT = "check that both sides use the same --token-file"
_TLS_NAME_HINT = ("with TLS, a node's or the coordinator's certificate must carry its name (--id, or "
                  "'coordinator') as its common name: clusterrep certs DIR NAME")
ANONYMOUS_ROLES = frozenset({"client"})  # read-only tools: any certificate from the CA will do


def _check_identity(name: str, role: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"name {name!r} is not valid (1-128 characters: letters, digits and "
                          "'._:@-', starting with a letter or digit)")
    if not isinstance(role, str) or not _ROLE_RE.match(role):
        raise ConfigError(f"role {role!r} is not valid (1-32 characters: lower-case letters, "
                          "digits, '_' and '-', starting with a letter)")


def _check_max_frame(max_frame: int) -> None:
    if type(max_frame) is not int or not 1 <= max_frame <= _MAX_LENGTH - _OVERHEAD:
        raise ConfigError(f"max_frame={max_frame!r} must be an integer in 1..{_MAX_LENGTH - _OVERHEAD}")


# ---------------------------------------------------------------------------------------------
# Cryptographic pieces (small and separate, so tests can craft frames by hand)


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod="sha256")
    for part in parts:
        h.update(part)
    return h.digest()


def _client_mac(token: bytes, snonce: bytes, cnonce: bytes, name: str, role: str) -> bytes:
    """The client's proof that it knows the token, bound to both nonces and its identity."""
    return _mac(token, b"client\0", snonce, cnonce, name.encode(), b"\0", role.encode())


def _server_mac(token: bytes, snonce: bytes, cnonce: bytes, name: str, role: str) -> bytes:
    """The server's proof that it knows the token, bound to both nonces and the identity its
    hello announced (sent before TLS, so it must not be relabelled on the way)."""
    return _mac(token, b"server\0", cnonce, snonce, name.encode(), b"\0", role.encode())


def _session_key(token: bytes, snonce: bytes, cnonce: bytes) -> bytes:
    """The key that tags every frame of one connection (fresh per connection)."""
    return _mac(token, b"session\0", snonce, cnonce)


class _Sealer:
    """AES-256-GCM for one direction of a session: its own key, the frame counter as nonce.

    Each direction has a key of its own (derived from the session key), and the counter never
    repeats within a connection, so no (key, nonce) pair is ever used twice.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes, direction: bytes) -> None:
        self._aead = AESGCM(_mac(key, b"aead\0", direction))

    def seal(self, counter: bytes, payload: bytes | memoryview) -> bytes:
        """Ciphertext followed by the 16-byte tag."""
        return self._aead.encrypt(_NONCE_PAD + counter, payload, None)

    def open(self, counter: bytes | memoryview, sealed: bytes | memoryview) -> bytes:
        """The payload; `InvalidTag` if anything of the frame was changed or forged."""
        return self._aead.decrypt(_NONCE_PAD + bytes(counter), sealed, None)


def _frame_parts(sealer: _Sealer, counter: int, payload: bytes) -> tuple[bytes, bytes]:
    """A session frame as (length + counter, ciphertext + tag), ready for one ``sendmsg``."""
    head = _HEAD.pack(_OVERHEAD + len(payload), counter)
    return head, sealer.seal(head[4:], payload)


def _seal(key: bytes, direction: bytes, counter: int, payload: bytes) -> bytes:
    """One complete session frame as bytes."""
    return b"".join(_frame_parts(_Sealer(key, direction), counter, payload))


def _pack_plain(obj: Any) -> bytes:
    """A handshake frame: length and msgpack payload, no counter or tag."""
    payload = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(payload)) + payload


def _unpack(payload: bytes | memoryview) -> Any:
    """Decode one msgpack value; the limits keep a hostile payload from costing more than its size."""
    size = len(payload)
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, max_str_len=size,
                           max_bin_len=size, max_array_len=size, max_map_len=size, max_ext_len=size,
                           unicode_errors="surrogateescape")


_UNPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


# ---------------------------------------------------------------------------------------------
# Reading frames


class _Reader:
    """Reads length-prefixed frames from a stream (plain or TLS) into a reused buffer.

    Small frames are read many at a time; a large frame's body is read straight into place. A
    timeout leaves every byte read so far in the buffer, so the next call resumes the frame.
    """

    def __init__(self, stream: _PlainStream | TlsStream, peer: str) -> None:
        self._stream = stream
        self._peer = peer
        self._buf = bytearray(_BUF_START)
        self._view = memoryview(self._buf)
        self._start = 0                      # first unconsumed byte
        self._end = 0                        # end of the bytes received
        self._big: memoryview | None = None  # body of a frame too large to keep a buffer for
        self._big_have = 0

    def frame(self, *, limit: int, minimum: int, deadline: float | None, what: str) -> memoryview:
        """The body of the next frame (after its length). Valid until the next call.

        The length is checked against ``minimum``/``limit`` before any of the body is awaited,
        so a hostile length costs nothing. Raises `FrameError`, `PeerClosed`, `TimeoutError`.
        """
        if self._big is not None:
            return self._finish_big(deadline)
        while self._end - self._start < 4:
            if self._end == len(self._buf):
                self._compact()
            self._end += self._recv(self._view[self._end :], deadline)
        (length,) = _LEN.unpack_from(self._buf, self._start)
        if length > limit:
            raise FrameError(f"{self._peer} sent a {what} that claims {length} bytes, more than "
                             f"the limit of {limit}")
        if length < minimum:
            raise FrameError(f"{self._peer} sent a {what} that claims {length} bytes, less than "
                             f"the minimum of {minimum}")
        total = 4 + length
        if total > len(self._buf):
            if total > _BUF_KEEP:
                self._start_big(length)
                return self._finish_big(deadline)
            self._grow(total)
        elif self._start + total > len(self._buf):
            self._compact()
        # Read a large body only up to its end: the next frame then starts at offset 0 and no
        # bytes ever need moving. Small frames are read as many as fit.
        upto = self._start + total if total > _BUF_START // 4 else len(self._buf)
        while self._end - self._start < total:
            self._end += self._recv(self._view[self._end : upto], deadline)
        body = self._view[self._start + 4 : self._start + total]
        self._start += total
        if self._start == self._end:
            self._start = self._end = 0
        return body

    def _grow(self, total: int) -> None:
        size = min(max(total, 2 * len(self._buf)), _BUF_KEEP)
        buf = bytearray(size)
        have = self._end - self._start
        buf[:have] = self._view[self._start : self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, have

    def _compact(self) -> None:
        have = self._end - self._start
        self._view[:have] = self._view[self._start : self._end]
        self._start, self._end = 0, have

    def _start_big(self, length: int) -> None:
        big = memoryview(bytearray(length))
        have = self._end - self._start - 4
        big[:have] = self._view[self._start + 4 : self._end]
        self._big, self._big_have = big, have
        self._start = self._end = 0

    def _finish_big(self, deadline: float | None) -> memoryview:
        big = self._big
        assert big is not None
        while self._big_have < len(big):
            self._big_have += self._recv(big[self._big_have :], deadline)
        self._big = None
        return big

    def _recv(self, view: memoryview, deadline: float | None) -> int:
        """Receive at least one byte into ``view``; wait no later than ``deadline``."""
        try:
            n = self._stream.recv_into(view, deadline)
        except TimeoutError:
            raise
        except OSError as exc:
            raise PeerClosed(f"connection with {self._peer} broke: {exc.strerror or exc}") from None
        if n == 0:
            raise self._eof()
        return n

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return self._end - self._start

    def _eof(self) -> PeerClosed:
        if self._big is not None or self._end > self._start:
            return PeerClosed(f"{self._peer} closed the connection in the middle of a frame")
        return PeerClosed(f"{self._peer} closed the connection")


class _PlainStream:
    """A connected TCP socket: blocking sends, receives that wait in ``poll`` up to a deadline.

    The same interface as `tls.TlsStream`, so frames and handshakes do not care which it is.
    """

    names: set[str] | None = None  # no certificate: identities are not bound to names

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv_into(self, view: memoryview, deadline: float | None) -> int:
        """Receive into ``view``: bytes received, 0 at the end of the stream."""
        while True:
            try:
                if deadline is None:
                    return self._sock.recv_into(view)
                return self._sock.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                wait_ready(self._sock, select.POLLIN, deadline)

    def send_parts(self, parts: tuple[bytes, ...]) -> None:
        """Send ``parts`` as one stream write without joining them (no copy of a large payload)."""
        total = sum(len(p) for p in parts)
        sent = self._sock.sendmsg(parts)
        if sent < total:  # interrupted part way: finish the rest the simple way
            self._sock.sendall(memoryview(b"".join(parts))[sent:])

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def tell(self, data: bytes) -> None:
        """Best effort, without waiting: a last word to a peer being refused."""
        with contextlib.suppress(OSError):
            self._sock.send(data, socket.MSG_DONTWAIT)

    def shutdown(self) -> None:
        """Wake any thread blocked on this socket."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


def _tune(sock: socket.socket) -> None:
    """Small frames (acks) go out at once; a dead peer is eventually noticed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _peer_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return format_addr(host, port)


# ---------------------------------------------------------------------------------------------
# Connections


class Connection:
    """An authenticated, framed, integrity-protected connection.

    Built by `connect` (client side) or `accept` / `Server` (server side), never directly.
    ``send`` may be called from several threads at once; ``recv`` from one thread at a time
    (calls are serialised). ``close`` from any thread wakes a blocked ``send`` or ``recv``.
    """

    def __init__(self, stream: _PlainStream | TlsStream, reader: _Reader, key: bytes, *,
                 client: bool, peer_name: str, peer_role: str, peer_addr: str,
                 max_frame: int) -> None:
        self.peer_name = peer_name
        self.peer_role = peer_role
        self.peer_addr = peer_addr
        self.max_frame = max_frame
        self.tls = isinstance(stream, TlsStream)  # (frames are always encrypted; this is TLS)
        self._stream = stream
        self._reader = reader
        mine, theirs = (_CLIENT, _SERVER) if client else (_SERVER, _CLIENT)
        self._sealer = _Sealer(key, mine)
        self._opener = _Sealer(key, theirs)
        self._send_counter = 0
        self._recv_counter = 0
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Connection {self.peer_role} {self.peer_name} at {self.peer_addr}>"

    @property
    def who(self) -> str:
        """The peer as logs show it: role, name and address."""
        return f"{self.peer_role} {self.peer_name} ({self.peer_addr})"

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, obj: Any) -> None:
        """Send one msgpack-serialisable value (dicts, lists, bytes, str, int, float, bool, None).

        Tuples arrive as lists. Raises `FrameError` if the encoding exceeds ``max_frame``,
        `PeerClosed` if the connection is closed or breaks, ``TypeError`` for values msgpack
        cannot encode.
        """
        # (names that are not UTF-8 travel as their raw bytes, as os.fsdecode carries them)
        payload = msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")
        if len(payload) > self.max_frame:
            raise FrameError(f"cannot send {len(payload)} bytes to {self.who} in one frame: the "
                             f"limit is {self.max_frame}", hint="send the data in smaller batches")
        with self._send_lock:
            if self._closed:
                raise PeerClosed(f"connection with {self.who} is closed")
            parts = _frame_parts(self._sealer, self._send_counter + 1, payload)
            self._send_counter += 1  # (only once the frame exists: a failure above skips no number)
            try:
                self._stream.send_parts(parts)
            except WireError as exc:  # a TLS failure
                self.close()
                raise PeerClosed(f"cannot send to {self.who}: {exc}") from None
            except OSError as exc:
                was_closed = self._closed
                self.close()
                if was_closed:
                    raise PeerClosed(f"connection with {self.who} was closed") from None
                raise PeerClosed(f"cannot send to {self.who}: {exc.strerror or exc}") from None

    def recv(self, timeout: float | None = None) -> Any:
        """Receive the next value; wait at most ``timeout`` seconds (``None``: for ever).

        Raises ``TimeoutError`` if no whole frame arrived in time (the connection stays usable,
        nothing is lost), `PeerClosed` when the peer closed the connection, `FrameError` for a
        frame that is oversized, tampered with, replayed, out of order or not msgpack (then the
        connection is closed: the stream can no longer be trusted).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._recv_lock:
            if self._closed:
                raise PeerClosed(f"connection with {self.who} is closed")
            try:
                body = self._reader.frame(limit=self.max_frame + _OVERHEAD, minimum=_MIN_BODY,
                                          deadline=deadline, what="frame")
                return self._open(body)
            except TimeoutError:
                raise TimeoutError(f"no frame from {self.who} within {timeout:g}s") from None
            except WireError as exc:
                was_closed = self._closed
                self.close()
                if was_closed and isinstance(exc, PeerClosed):
                    raise PeerClosed(f"connection with {self.who} was closed") from None
                raise

    def _open(self, body: memoryview) -> Any:
        """Decrypt and check one frame, check its counter, then decode its payload."""
        counter_bytes = body[:8]
        expected = self._recv_counter + 1
        try:
            payload = self._opener.open(counter_bytes, body[8:])
        except InvalidTag:
            raise FrameError(f"frame {expected} from {self.who} failed its integrity check: "
                             "tampered with or corrupted on the way") from None
        counter = int.from_bytes(counter_bytes, "big")
        if counter < expected:
            raise FrameError(f"replayed or reordered frame from {self.who}: counter {counter}, "
                             f"expected {expected}")
        if counter > expected:
            raise FrameError(f"{counter - expected} frame(s) from {self.who} missing (dropped): "
                             f"counter {counter}, expected {expected}")
        self._recv_counter = counter
        try:
            return _unpack(payload)
        except _UNPACK_ERRORS as exc:
            raise FrameError(f"frame {counter} from {self.who} is not valid msgpack: "
                             f"{exc or type(exc).__name__}") from None

    def close(self) -> None:
        """Close the connection (idempotent). Wakes any thread blocked in ``send``/``recv``."""
        if self._closed:
            return
        self._closed = True
        self._stream.shutdown()
        self._stream.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Handshake


def _read_hello(reader: _Reader, deadline: float, peer: str, stage: str, timeout: float) -> dict[str, Any]:
    """One handshake frame, decoded; it must be a map."""
    try:
        body = reader.frame(limit=HANDSHAKE_LIMIT, minimum=1, deadline=deadline,
                            what=f"{stage} frame")
    except TimeoutError:
        raise AuthError(f"{peer} sent no {stage} within {timeout:g}s",
                        hint="is it a clusterrep endpoint? check the address") from None
    except FrameError as exc:
        raise FrameError(f"{exc.args[0]}; it does not speak the clusterrep protocol",
                         hint="check the address: something else answers there") from None
    try:
        msg = _unpack(body)
    except _UNPACK_ERRORS:
        raise FrameError(f"{peer} sent a {stage} that is not valid msgpack; it does not speak "
                         "the clusterrep protocol", hint="check the address") from None
    if not isinstance(msg, dict):
        raise AuthError(f"{peer} sent a malformed {stage}: not a map",
                        hint="check the address and that both sides run clusterrep")
    return msg


def _expect(msg: dict[str, Any], spec: dict[str, type], peer: str, stage: str) -> None:
    """Every key of ``spec`` present in ``msg`` with exactly that type."""
    for key, kind in spec.items():
        if key not in msg:
            raise AuthError(f"{peer} sent a malformed {stage}: no {key!r}",
                            hint="check that both sides run the same clusterrep version")
        if type(msg[key]) is not kind:
            raise AuthError(f"{peer} sent a malformed {stage}: {key!r} is "
                            f"{type(msg[key]).__name__}, not {kind.__name__}",
                            hint="check that both sides run the same clusterrep version")
    for key in ("nonce", "mac"):
        if key in spec and len(msg[key]) != NONCE_BYTES:
            raise AuthError(f"{peer} sent a malformed {stage}: {key!r} is {len(msg[key])} bytes, "
                            f"not {NONCE_BYTES}")


def _check_peer_identity(msg: dict[str, Any], peer: str, stage: str) -> None:
    if not _NAME_RE.match(msg["name"]) or not _ROLE_RE.match(msg["role"]):
        raise AuthError(f"{peer} sent a malformed {stage}: invalid name {msg['name']!r:.80} "
                        f"or role {msg['role']!r:.40}")


def connect(addr: str | tuple[str, int], auth: Auth | bytes, *, name: str, role: str,
            timeout: float = 10.0, max_frame: int = MAX_FRAME) -> Connection:
    """Connect to a clusterrep server and authenticate both ways.

    ``auth`` is the shared token, or an `Auth` with the token and a TLS configuration.
    ``timeout`` bounds the TCP connect and, separately, the handshake. Raises `WireError`
    (cannot connect), `AuthError` (the server refused us, or does not know the token itself,
    or TLS is on at one end only, or a certificate is not trusted), `FrameError` (something
    else answers there), `ConfigError` (bad arguments).
    """
    host, port = normalise_addr(addr)
    shown = format_addr(host, port)
    _check_identity(name, role)
    auth = as_auth(auth)
    _check_max_frame(max_frame)
    sock = _open_socket(host, port, shown, timeout)
    try:
        sock.settimeout(None)
        _tune(sock)
        return _client_handshake(sock, auth, name, role, timeout, max_frame, _peer_of(sock), host)
    except OSError as exc:
        _close_quietly(sock)
        raise PeerClosed(f"server {shown} broke the connection during the handshake: "
                         f"{exc.strerror or exc}",
                         hint="with TLS, this is how a server refuses a certificate it does not "
                              "trust: check --tls-cert and --tls-ca on both sides"
                         if auth.tls is not None else None) from None
    except BaseException:
        _close_quietly(sock)
        raise


def _open_socket(host: str, port: int, shown: str, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise WireError(f"cannot connect to {shown}: no answer within {timeout:g}s",
                        hint="check the address, that the server runs, and firewalls") from None
    except ConnectionRefusedError:
        raise WireError(f"cannot connect to {shown}: connection refused",
                        hint="is the server running and listening on that address?") from None
    except socket.gaierror as exc:
        raise WireError(f"cannot connect to {shown}: cannot resolve {host!r}: {exc.strerror}",
                        hint="check the host name") from None
    except OSError as exc:
        raise WireError(f"cannot connect to {shown}: {exc.strerror or exc}") from None


def _client_handshake(sock: socket.socket, auth: Auth, name: str, role: str, timeout: float,
                      max_frame: int, shown: str, host: str) -> Connection:
    deadline = time.monotonic() + timeout
    peer = f"server {shown}"
    stream: _PlainStream | TlsStream = _PlainStream(sock)
    reader = _Reader(stream, peer)
    try:
        hello = _read_hello(reader, deadline, peer, "hello", timeout)
        if "error" in hello:
            raise AuthError(f"{peer} refused the connection: {hello['error']!r:.200}")
        if hello.get("hello") != PROTOCOL:
            raise AuthError(f"{peer} is not a clusterrep server (its greeting is {hello!r:.100})",
                            hint="check the address")
        _expect(hello, {"version": int, "nonce": bytes, "name": str, "role": str}, peer, "hello")
        if hello["version"] != VERSION:
            raise AuthError(f"{peer} speaks wire version {hello['version']}; this build speaks "
                            f"{VERSION}", hint="run the same clusterrep version on both sides")
        _check_peer_identity(hello, peer, "hello")
        if auth.tls is not None or hello.get("tls") is True:
            stream, reader = _client_tls(sock, reader, auth, hello, host, peer, deadline)
        snonce, cnonce = hello["nonce"], os.urandom(NONCE_BYTES)
        stream.sendall(_pack_plain({"name": name, "role": role, "nonce": cnonce,
                                    "mac": _client_mac(auth.token, snonce, cnonce, name, role)}))
        peer = f"server {shown} ({hello['role']} {hello['name']})"
        reply = _read_hello(reader, deadline, peer, "reply", timeout)
        if "error" in reply:
            raise AuthError(f"{peer} refused us: {reply['error']!r:.200}",
                            hint=_TLS_NAME_HINT if "certificate" in str(reply["error"]) else _TOKEN_HINT)
        _expect(reply, {"ok": bool, "mac": bytes}, peer, "reply")
        if not reply["ok"] or not hmac.compare_digest(
                reply["mac"], _server_mac(auth.token, snonce, cnonce, hello["name"], hello["role"])):
            raise AuthError(f"{peer} failed authentication: it does not know our token",
                            hint=f"{_TOKEN_HINT}, and that {shown} is really the clusterrep server")
    except BaseException:
        stream.shutdown()
        stream.close()
        raise
    return Connection(stream, reader, _session_key(auth.token, snonce, cnonce), client=True,
                      peer_name=hello["name"], peer_role=hello["role"], peer_addr=shown,
                      max_frame=max_frame)


def _client_tls(sock: socket.socket, reader: _Reader, auth: Auth, hello: dict[str, Any], host: str,
                peer: str, deadline: float) -> tuple[TlsStream, _Reader]:
    """Start TLS after the server's hello, when both ends want it; refuse when only one does."""
    if auth.tls is None:
        raise AuthError(f"{peer} requires TLS with client certificates",
                        hint="give --tls-cert, --tls-key and --tls-ca (certificates from the "
                             "cluster's CA)")
    if hello.get("tls") is not True:
        raise AuthError(f"{peer} runs without TLS, and this side will not talk in clear",
                        hint="run the server with --tls-cert, --tls-key and --tls-ca too")
    if reader.buffered:
        raise AuthError(f"{peer} sent data after its hello, before TLS started")
    stream = client_wrap(sock, auth.tls, host, peer, deadline)
    return stream, _Reader(stream, peer)


def accept(sock: socket.socket, auth: Auth | bytes, *, name: str, role: str, timeout: float = 10.0,
           max_frame: int = MAX_FRAME) -> Connection:
    """Authenticate the client on an already-accepted socket (the server side of the handshake).

    ``timeout`` bounds the whole handshake. A refused peer is told so where that helps, logged
    (warning, with its address and the reason), its socket closed, and the error raised:
    `AuthError` (wrong token, malformed or slow handshake, untrusted certificate, a certificate
    that does not name the identity claimed), `FrameError` (not the protocol), `PeerClosed` (it
    went away).
    """
    shown = _peer_of(sock)
    try:
        _check_identity(name, role)
        auth = as_auth(auth)
        _check_max_frame(max_frame)
        sock.settimeout(None)
        _tune(sock)
        return _server_handshake(sock, auth, name, role, timeout, max_frame, shown)
    except (WireError, OSError) as exc:
        if isinstance(exc, OSError):
            exc = PeerClosed(f"peer {shown} broke the connection during the handshake: "
                             f"{exc.strerror or exc}")
        log.warning("connection refused: %s", exc)  # every message names the peer
        _close_quietly(sock)
        raise exc from None
    except BaseException:
        _close_quietly(sock)
        raise


def _server_handshake(sock: socket.socket, auth: Auth, name: str, role: str, timeout: float,
                      max_frame: int, shown: str) -> Connection:
    deadline = time.monotonic() + timeout
    peer = f"peer {shown}"
    stream: _PlainStream | TlsStream = _PlainStream(sock)
    reader = _Reader(stream, peer)
    try:
        snonce = os.urandom(NONCE_BYTES)
        stream.sendall(_pack_plain({"hello": PROTOCOL, "version": VERSION, "nonce": snonce,
                                    "name": name, "role": role, "tls": auth.tls is not None}))
        if auth.tls is not None:
            stream = server_wrap(sock, auth.tls, peer, deadline)
            reader = _Reader(stream, peer)
        try:
            msg = _read_hello(reader, deadline, peer, "handshake", timeout)
            _expect(msg, {"name": str, "role": str, "nonce": bytes, "mac": bytes}, peer, "handshake")
            _check_peer_identity(msg, peer, "handshake")
        except (AuthError, FrameError):
            stream.tell(_pack_plain({"error": "handshake refused"}))
            raise
        cnonce = msg["nonce"]
        if not hmac.compare_digest(msg["mac"],
                                   _client_mac(auth.token, snonce, cnonce, msg["name"], msg["role"])):
            stream.tell(_pack_plain({"error": "authentication failed"}))
            raise AuthError(f"peer {shown} failed authentication: wrong token "
                            f"(it claimed to be {msg['role']} {msg['name']})", hint=_TOKEN_HINT)
        names = stream.names
        if names is not None and msg["role"] not in ANONYMOUS_ROLES and msg["name"] not in names:
            stream.tell(_pack_plain({"error": f"your certificate does not name {msg['name']}"}))
            raise AuthError(f"peer {shown} claims to be {msg['role']} {msg['name']}, but its "
                            f"certificate names {', '.join(sorted(names)) or 'nobody'}",
                            hint=_TLS_NAME_HINT)
        stream.sendall(_pack_plain({"ok": True,
                                    "mac": _server_mac(auth.token, snonce, cnonce, name, role)}))
    except BaseException:
        stream.shutdown()
        stream.close()
        raise
    return Connection(stream, reader, _session_key(auth.token, snonce, cnonce), client=False,
                      peer_name=msg["name"], peer_role=msg["role"], peer_addr=shown,
                      max_frame=max_frame)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
