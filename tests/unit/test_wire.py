"""The wire: authenticated, framed, integrity-protected TCP between clusterrep processes.

Real sockets on 127.0.0.1 with port 0. Peers that misbehave are played by raw sockets that do
the handshake by hand (with the module's own MAC helpers) and then send crafted frames, so every
refusal is checked against exactly the bytes an attacker or a broken network would produce.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import msgpack
import pytest

from clusterrep import endpoint, serve, wire
from clusterrep.errors import ClusterrepError

TOKEN = b"test-token-0123456789-abcdefghijklmnop"
OTHER = b"other-token-0123456789-abcdefghijklmnop"
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Helpers


class Capture:
    """A handler that records what it receives and how its connection ended."""

    def __init__(self) -> None:
        self.calls = 0
        self.conns: list[wire.Connection] = []
        self.got: list[Any] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, conn: wire.Connection) -> None:
        self.calls += 1
        self.conns.append(conn)
        try:
            while True:
                self.got.append(conn.recv(timeout=5))
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> BaseException | None:
        assert self.done.wait(2), "the handler did not finish"
        return self.error


def echo(conn: wire.Connection) -> None:
    try:
        while True:
            conn.send(conn.recv())
    except wire.PeerClosed:
        pass


@contextmanager
def serving(handler: Callable[[wire.Connection], None], token: bytes = TOKEN,
            **kw: Any) -> Iterator[serve.Server]:
    server = serve.Server(("127.0.0.1", 0), token, name="r1", role="replica", handler=handler, **kw)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client(server: serve.Server, token: bytes = TOKEN, **kw: Any) -> wire.Connection:
    return wire.connect(server.address, token, name=kw.pop("name", "h1"),
                        role=kw.pop("role", "node"), **kw)


def read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def read_plain(sock: socket.socket) -> Any:
    (length,) = struct.unpack(">I", read_exact(sock, 4))
    return msgpack.unpackb(read_exact(sock, length), raw=False)


def raw_client(server: serve.Server, token: bytes = TOKEN) -> tuple[socket.socket, bytes]:
    """A client socket that did the handshake by hand; returns it and the session key."""
    sock = socket.create_connection(server.address, timeout=2)
    hello = read_plain(sock)
    cnonce = os.urandom(32)
    sock.sendall(wire._pack_plain({"name": "h1", "role": "node", "nonce": cnonce,
                                   "mac": wire._client_mac(token, hello["nonce"], cnonce, "h1", "node")}))
    assert read_plain(sock)["ok"] is True
    return sock, wire._session_key(token, hello["nonce"], cnonce)


def closed_by_peer(sock: socket.socket, within: float = 1.0) -> bool:
    """True if the peer closes ``sock`` within ``within`` seconds (whatever it sends first)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


@contextmanager
def fake_server(script: Callable[[socket.socket], None]) -> Iterator[tuple[str, int]]:
    """A listening socket whose one connection is handled by ``script`` (a hand-played server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(3)

    def run() -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        with sock, suppress(OSError, EOFError):
            script(sock)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        thread.join(3)
        listener.close()


def server_handshake_by_hand(sock: socket.socket, token: bytes = TOKEN) -> bytes:
    snonce = os.urandom(32)
    sock.sendall(wire._pack_plain({"hello": "clusterrep", "version": wire.VERSION, "nonce": snonce,
                                   "name": "r1", "role": "replica"}))
    msg = read_plain(sock)
    sock.sendall(wire._pack_plain({"ok": True,
                                   "mac": wire._server_mac(token, snonce, msg["nonce"], "r1", "replica")}))
    return wire._session_key(token, snonce, msg["nonce"])


@pytest.fixture
def wire_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="clusterrep.wire")
    return caplog


# ---------------------------------------------------------------------------------------------
# Round trips


VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.25, "", "héllo wörld",
    b"", b"\x00\xff" * 100, [], [1, [2, [3, None]]], {}, {"a": 1, 2: b"x", "n": {"l": [None, 1.0]}},
    {"t": "batch", "events": [os.urandom(4096) for _ in range(8)], "captured": 12},
]


def test_round_trip_of_many_kinds_of_values_both_ways() -> None:
    with serving(echo) as server, client(server) as conn:
        for value in [*VALUES, os.urandom(16 * MiB)]:
            conn.send(value)
            assert conn.recv(timeout=5) == value
        conn.send((1, 2))
        assert conn.recv(timeout=5) == [1, 2]  # tuples travel as arrays


SIZES = [10, MiB, 7, 300 * 1024, 17 * MiB, 3, 2 * MiB, 100, 1, 250 * 1024, 0, 5]


def test_mixed_sizes_in_a_row_each_way() -> None:
    """Small and large frames back to back: buffer reuse, growth and one-off buffers agree."""
    blobs = [bytes([i]) * n for i, n in enumerate(SIZES)]

    def handler(conn: wire.Connection) -> None:
        got = [conn.recv(timeout=5) for _ in blobs]
        for blob in got:
            conn.send(blob)

    with serving(handler) as server, client(server) as conn:
        for blob in blobs:
            conn.send(blob)
        assert [conn.recv(timeout=5) for _ in blobs] == blobs


def test_both_sides_learn_who_the_peer_is() -> None:
    capture = Capture()
    with serving(capture) as server, client(server, name="h7", role="node") as conn:
        assert (conn.peer_name, conn.peer_role) == ("r1", "replica")
        assert conn.peer_addr == f"127.0.0.1:{server.address[1]}"
        wait_for(lambda: capture.calls == 1)
        peer = capture.conns[0]
        assert (peer.peer_name, peer.peer_role) == ("h7", "node")
        assert peer.peer_addr.startswith("127.0.0.1:")


def test_many_frames_in_a_row_each_way() -> None:
    n = 3000

    def handler(conn: wire.Connection) -> None:
        got = [conn.recv(timeout=5) for _ in range(n)]
        assert got == list(range(n))
        for i in range(n):
            conn.send({"i": i, "pad": b"p" * (i % 300)})

    with serving(handler) as server, client(server) as conn:
        for i in range(n):
            conn.send(i)
        for i in range(n):
            assert conn.recv(timeout=5) == {"i": i, "pad": b"p" * (i % 300)}


def test_concurrent_senders_never_interleave_frames() -> None:
    capture = Capture()
    per_thread = 200
    size = [1000 + 997 * (k % 200) for k in range(per_thread)]  # up to 200 KB: sends block often
    with serving(capture) as server, client(server) as conn:
        def sender(tid: int) -> None:
            for k in range(per_thread):
                conn.send({"t": tid, "k": k, "data": bytes([tid]) * size[k]})

        threads = [threading.Thread(target=sender, args=(tid,)) for tid in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: len(capture.got) == 2 * per_thread)
    for tid in (1, 2):
        mine = [m for m in capture.got if m["t"] == tid]
        assert [m["k"] for m in mine] == list(range(per_thread))
        assert all(m["data"] == bytes([tid]) * size[m["k"]] for m in mine)
    assert isinstance(capture.wait(), wire.PeerClosed)


def test_recv_timeout_leaves_the_connection_usable() -> None:
    go = threading.Event()

    def handler(conn: wire.Connection) -> None:
        go.wait(2)
        conn.send("late")
        conn.recv(timeout=2)

    with serving(handler) as server, client(server) as conn:
        with pytest.raises(TimeoutError, match="no frame from replica r1"):
            conn.recv(timeout=0.05)
        go.set()
        assert conn.recv(timeout=2) == "late"


def test_a_frame_that_stalls_half_way_resumes_after_a_timeout() -> None:
    both_halves = threading.Event()

    def script(sock: socket.socket) -> None:
        key = server_handshake_by_hand(sock)
        frame = wire._seal(key, b"S", 1, msgpack.packb({"x": b"y" * 1000}))
        sock.sendall(frame[:500])
        both_halves.wait(2)
        sock.sendall(frame[500:])
        read_exact(sock, 1)  # wait for the client to go away

    with fake_server(script) as addr, wire.connect(addr, TOKEN, name="h1", role="node") as conn:
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0.05)
        both_halves.set()
        assert conn.recv(timeout=2) == {"x": b"y" * 1000}


def test_peer_closing_gives_peer_closed_and_close_wakes_a_blocked_recv() -> None:
    with serving(lambda conn: None) as server, client(server) as conn:
        with pytest.raises(wire.PeerClosed, match="closed the connection"):
            conn.recv(timeout=2)
        assert conn.closed

    release = threading.Event()
    with serving(lambda conn: release.wait(2)) as server, client(server) as conn:
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                conn.recv()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.05)
        conn.close()
        thread.join(1)
        release.set()
        assert not thread.is_alive()
        assert isinstance(errors[0], wire.PeerClosed)
        with pytest.raises(wire.PeerClosed, match="is closed"):
            conn.send("after close")


def test_sending_more_than_max_frame_is_refused_locally() -> None:
    with serving(echo) as server, client(server, max_frame=1024) as conn:
        with pytest.raises(wire.FrameError, match="limit is 1024"):
            conn.send(b"x" * 2000)
        conn.send("still fine")
        assert conn.recv(timeout=2) == "still fine"


# ---------------------------------------------------------------------------------------------
# Authentication


def test_wrong_token_on_the_client_is_refused(wire_log: pytest.LogCaptureFixture) -> None:
    capture = Capture()
    with serving(capture) as server:
        with pytest.raises(wire.AuthError, match="refused us") as info:
            client(server, token=OTHER)
        assert info.value.exit_code == 7
        wait_for(lambda: "failed authentication: wrong token" in wire_log.text)
        assert "connection refused: peer 127.0.0.1:" in wire_log.text
        assert "same --token-file" in wire_log.text or "same --token-file" in str(info.value)
        assert capture.calls == 0
        with client(server) as conn:  # the server keeps serving
            conn.send("hi")
        wait_for(lambda: capture.got == ["hi"])


def test_a_server_that_does_not_know_the_token_is_refused_by_the_client() -> None:
    with (fake_server(lambda sock: server_handshake_by_hand(sock, OTHER)) as addr,
          pytest.raises(wire.AuthError, match="does not know our token")):
        wire.connect(addr, TOKEN, name="h1", role="node", timeout=2)


def script_sending(data: bytes) -> Callable[[socket.socket], None]:
    def script(sock: socket.socket) -> None:
        sock.sendall(data)
        sock.recv(1024)
    return script


@pytest.mark.parametrize(("greeting", "error", "match"), [
    (b"HTTP/1.1 200 OK\r\n\r\n", wire.FrameError, "does not speak the clusterrep protocol"),
    (struct.pack(">I", 3) + b"\xc1\xc1\xc1", wire.FrameError, "not valid msgpack"),
    (wire._pack_plain([1, 2]), wire.AuthError, "not a map"),
    (wire._pack_plain({"hello": "ssh"}), wire.AuthError, "not a clusterrep server"),
    (wire._pack_plain({"hello": "clusterrep", "version": 1, "nonce": b"n" * 32, "name": "r",
                       "role": "replica"}), wire.AuthError, "speaks wire version 1; this build speaks 2"),
    (wire._pack_plain({"hello": "clusterrep", "version": 9, "nonce": b"n" * 32, "name": "r",
                       "role": "replica"}), wire.AuthError, "speaks wire version 9"),
    (wire._pack_plain({"hello": "clusterrep", "version": 2, "nonce": b"n" * 5, "name": "r",
                       "role": "replica"}), wire.AuthError, "'nonce' is 5 bytes"),
    (wire._pack_plain({"error": "busy"}), wire.AuthError, "refused the connection"),
])
def test_client_refuses_a_garbage_hello(greeting: bytes, error: type[Exception], match: str) -> None:
    with fake_server(script_sending(greeting)) as addr, pytest.raises(error, match=match):
        wire.connect(addr, TOKEN, name="h1", role="node", timeout=2)


def test_client_gives_up_on_a_silent_server() -> None:
    with fake_server(script_sending(b"")) as addr:
        start = time.monotonic()
        with pytest.raises(wire.AuthError, match=r"sent no hello within 0\.2s"):
            wire.connect(addr, TOKEN, name="h1", role="node", timeout=0.2)
        assert time.monotonic() - start < 1


def _handshake_with(fields: Any) -> Callable[[socket.socket], None]:
    def act(sock: socket.socket) -> None:
        read_plain(sock)
        sock.sendall(wire._pack_plain(fields))
    return act


MISBEHAVING: dict[str, Callable[[socket.socket], None]] = {
    "silent": lambda sock: read_plain(sock),
    "closes at once": lambda sock: None,
    "garbage bytes": lambda sock: sock.sendall(os.urandom(100)),
    "http request": lambda sock: sock.sendall(b"GET / HTTP/1.0\r\n\r\n"),
    "huge handshake": lambda sock: sock.sendall(struct.pack(">I", 1 << 30)),
    "no token": _handshake_with({"name": "h1", "role": "node", "nonce": os.urandom(32)}),
    "mac of wrong type": _handshake_with({"name": "h1", "role": "node", "nonce": os.urandom(32),
                                          "mac": "x" * 32}),
    "bad name": _handshake_with({"name": "../etc", "role": "node", "nonce": os.urandom(32),
                                 "mac": os.urandom(32)}),
    "not a map": _handshake_with([1, 2, 3]),
    "random mac": _handshake_with({"name": "h1", "role": "node", "nonce": os.urandom(32),
                                   "mac": os.urandom(32)}),
}


@pytest.mark.parametrize("behaviour", list(MISBEHAVING))
def test_misbehaving_clients_never_reach_the_handler(behaviour: str,
                                                     wire_log: pytest.LogCaptureFixture) -> None:
    capture = Capture()
    with serving(capture, timeout=0.2) as server:
        sock = socket.create_connection(server.address, timeout=2)
        with sock:
            MISBEHAVING[behaviour](sock)
            if behaviour != "closes at once":
                assert closed_by_peer(sock), "the server did not close the connection"
        # (a peer that closes at once may reach the server as a reset: "connection with peer
        # ... broke" rather than "peer ... closed the connection", whichever the kernel saw)
        wait_for(lambda: re.search(r"connection refused: (connection with )?peer 127\.0\.0\.1:",
                                   wire_log.text) is not None)
        assert capture.calls == 0
        with client(server) as conn:  # the server keeps serving
            conn.send("next")
        wait_for(lambda: capture.got == ["next"])


def test_handshake_errors_say_what_happened(wire_log: pytest.LogCaptureFixture) -> None:
    with serving(Capture(), timeout=0.2) as server:
        for behaviour, reason in [("silent", "sent no handshake within 0.2s"),
                                  ("no token", "malformed handshake: no 'mac'"),
                                  ("huge handshake", "claims 1073741824 bytes, more than the limit")]:
            with socket.create_connection(server.address, timeout=2) as sock:
                MISBEHAVING[behaviour](sock)
                closed_by_peer(sock)
            wait_for(lambda reason=reason: reason in wire_log.text)


# ---------------------------------------------------------------------------------------------
# Frames after the handshake


def frame(key: bytes, counter: int, value: Any, direction: bytes = b"C") -> bytes:
    return wire._seal(key, direction, counter, msgpack.packb(value, use_bin_type=True))


def send_raw(chunks: list[bytes | Callable[[bytes], bytes]]) -> tuple[Capture, float]:
    """Send raw bytes after a hand-made handshake; how the server's handler ended, and how fast."""
    capture = Capture()
    with serving(capture) as server:
        sock, key = raw_client(server)
        with sock:
            start = time.monotonic()
            for chunk in chunks:
                sock.sendall(chunk(key) if callable(chunk) else chunk)
            assert closed_by_peer(sock), "the server did not close the connection"
            elapsed = time.monotonic() - start
        capture.wait()
    return capture, elapsed


def test_well_formed_raw_frames_are_accepted() -> None:
    capture = Capture()
    with serving(capture) as server:
        sock, key = raw_client(server)
        with sock:
            sock.sendall(frame(key, 1, "a") + frame(key, 2, {"b": [1]}))
            wait_for(lambda: len(capture.got) == 2)
    assert capture.got == ["a", {"b": [1]}]


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    capture, elapsed = send_raw([struct.pack(">I", 1 << 30)])
    assert isinstance(capture.error, wire.FrameError)
    assert "claims 1073741824 bytes, more than the limit" in str(capture.error)
    assert elapsed < 1
    assert capture.got == []


def test_frame_shorter_than_counter_and_tag_is_refused() -> None:
    capture, _ = send_raw([struct.pack(">I", 20) + b"\0" * 20])
    assert isinstance(capture.error, wire.FrameError)
    assert "less than the minimum" in str(capture.error)


@pytest.mark.parametrize(("where", "offset"), [("counter", 11), ("payload", 13), ("tag", -1)])
def test_a_flipped_byte_is_refused(where: str, offset: int) -> None:
    def tampered(key: bytes) -> bytes:
        raw = bytearray(frame(key, 1, {"data": b"important"}))
        raw[offset] ^= 0x01
        return bytes(raw)

    capture, _ = send_raw([tampered])
    assert isinstance(capture.error, wire.FrameError)
    assert "failed its integrity check" in str(capture.error)
    assert capture.got == []


def test_a_frame_signed_for_the_other_direction_is_refused() -> None:
    capture, _ = send_raw([lambda key: frame(key, 1, "reflected", direction=b"S")])
    assert isinstance(capture.error, wire.FrameError)
    assert "integrity" in str(capture.error)


def test_a_replayed_frame_is_refused() -> None:
    def twice(key: bytes) -> bytes:
        one = frame(key, 1, "pay me")
        return one + one

    capture, _ = send_raw([twice])
    assert capture.got == ["pay me"]
    assert isinstance(capture.error, wire.FrameError)
    assert "replayed or reordered frame" in str(capture.error)
    assert "counter 1, expected 2" in str(capture.error)


def test_a_dropped_frame_is_refused() -> None:
    capture, _ = send_raw([lambda key: frame(key, 1, "a") + frame(key, 3, "c")])
    assert capture.got == ["a"]
    assert isinstance(capture.error, wire.FrameError)
    assert "1 frame(s)" in str(capture.error) and "missing (dropped)" in str(capture.error)


@pytest.mark.parametrize("payload", [
    b"\xc1",                       # never used
    b"\x01\x02",                   # trailing bytes
    b"\x92\x01",                   # truncated array
    b"\xdb\xff\xff\xff\xff",        # str claiming 4 GiB
    b"\x81\x91\x01\x02",           # map keyed by a list
    b"\x91" * 5000 + b"\xc0",       # nested too deep
])
def test_a_payload_that_is_not_msgpack_is_refused(payload: bytes) -> None:
    capture, _ = send_raw([lambda key: wire._seal(key, b"C", 1, payload)])
    assert isinstance(capture.error, wire.FrameError)
    assert "not valid msgpack" in str(capture.error)


def test_the_client_refuses_a_tampered_frame_from_the_server() -> None:
    def script(sock: socket.socket) -> None:
        key = server_handshake_by_hand(sock)
        raw = bytearray(frame(key, 1, "genuine", direction=b"S"))
        raw[14] ^= 0x20
        sock.sendall(bytes(raw))
        read_exact(sock, 1)

    with fake_server(script) as addr, wire.connect(addr, TOKEN, name="h1", role="node") as conn:
        with pytest.raises(wire.FrameError, match="integrity"):
            conn.recv(timeout=2)
        assert conn.closed


def test_frames_cross_the_wire_encrypted() -> None:
    """What a listener on the network sees is ciphertext; the session key opens it."""
    marker = b"clusterrep-plaintext-marker-" * 100
    got: dict[str, bytes] = {}

    def script(sock: socket.socket) -> None:
        got["key"] = server_handshake_by_hand(sock)
        (length,) = struct.unpack(">I", read_exact(sock, 4))
        got["body"] = read_exact(sock, length)

    with fake_server(script) as addr, wire.connect(addr, TOKEN, name="h1", role="node") as conn:
        conn.send({"data": marker})
        wait_for(lambda: "body" in got)
    body = got["body"]
    assert b"clusterrep-plaintext-marker" not in body
    assert len(body) == 8 + len(msgpack.packb({"data": marker})) + wire.TAG_BYTES
    opened = wire._Sealer(got["key"], b"C").open(body[:8], body[8:])
    assert msgpack.unpackb(opened) == {"data": marker}


# ---------------------------------------------------------------------------------------------
# Server lifecycle


def test_stop_closes_everything_and_leaves_no_thread_behind() -> None:
    before = set(threading.enumerate())
    server = serve.Server("127.0.0.1:0", TOKEN, name="r1", role="replica", handler=echo)
    server.start()
    conns = [client(server) for _ in range(3)]
    for conn in conns:
        conn.send("ping")
        assert conn.recv(timeout=2) == "ping"
    silent = socket.create_connection(server.address, timeout=2)  # stuck in its handshake
    read_plain(silent)
    address = server.address
    server.stop()
    server.stop()  # idempotent
    assert set(threading.enumerate()) <= before
    for conn in conns:
        with pytest.raises(wire.PeerClosed):
            conn.recv(timeout=1)
    assert closed_by_peer(silent)
    silent.close()
    with pytest.raises(wire.WireError, match="connection refused"):
        wire.connect(address, TOKEN, name="h1", role="node", timeout=1)


def test_a_busy_port_gives_a_clear_error() -> None:
    with serving(echo) as first:
        host, port = first.address
        second = serve.Server((host, port), TOKEN, name="r2", role="replica", handler=echo)
        with pytest.raises(wire.ListenError) as info:
            second.start()
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in str(info.value)
    assert info.value.hint and "another port" in info.value.hint
    assert isinstance(info.value, ClusterrepError)


def test_a_failing_handler_is_logged_and_the_server_goes_on(wire_log: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def handler(conn: wire.Connection) -> None:
        calls.append(conn.recv(timeout=2))
        raise RuntimeError("handler bug")

    with serving(handler) as server:
        for word in ("a", "b"):
            with client(server) as conn:
                conn.send(word)
                with pytest.raises(wire.PeerClosed):
                    conn.recv(timeout=2)
        assert calls == ["a", "b"]
        assert "handler bug" in wire_log.text


def test_connect_errors_are_clear() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(wire.WireError, match=f"cannot connect to 127.0.0.1:{port}: connection refused"):
        wire.connect(f"127.0.0.1:{port}", TOKEN, name="h1", role="node")
    with pytest.raises(wire.ConfigError, match="at least 32"):
        wire.connect(f"127.0.0.1:{port}", b"short", name="h1", role="node")
    with pytest.raises(wire.ConfigError, match="name 'bad name' is not valid"):
        wire.connect(f"127.0.0.1:{port}", TOKEN, name="bad name", role="node")
    with pytest.raises(wire.ConfigError, match="role 'Node' is not valid"):
        wire.connect(f"127.0.0.1:{port}", TOKEN, name="h1", role="Node")


# ---------------------------------------------------------------------------------------------
# Token files


def token_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_bytes(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("content", [b"A" * 40, b"A" * 40 + b"\n", b"A" * 40 + b"  \r\n\n",
                                     b"\n" + b"A" * 32 + b"\n"])
def test_load_token_reads_the_one_line(tmp_path: Path, content: bytes,
                                       wire_log: pytest.LogCaptureFixture) -> None:
    assert wire.load_token(token_file(tmp_path, content)) == content.strip()
    assert wire_log.records == []


@pytest.mark.parametrize(("content", "match"), [
    (b"", "is empty"),
    (b" \n\n", "is empty"),
    (b"A" * 31 + b"\n", "31 characters long; it must be at least 32"),
    (b"A" * 40 + b"\n" + b"B" * 40 + b"\n", "holds 2 non-empty lines"),
    (b"\xff" * 40, "not UTF-8"),
    (b"A" * 5000, "larger than 4096 bytes"),
])
def test_load_token_refuses_bad_content(tmp_path: Path, content: bytes, match: str) -> None:
    with pytest.raises(wire.ConfigError, match=match) as info:
        wire.load_token(token_file(tmp_path, content))
    assert info.value.exit_code == 2
    assert info.value.hint


def test_load_token_refuses_missing_and_unreadable_files(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(wire.ConfigError, match="does not exist") as info:
        wire.load_token(tmp_path / "nope")
    assert "chmod 600" in str(info.value)
    with pytest.raises(wire.ConfigError, match="is a directory"):
        wire.load_token(tmp_path)
    path = token_file(tmp_path, b"A" * 40)

    def denied(*args: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(endpoint, "open", denied, raising=False)  # as root, chmod 000 would not stop us
    with pytest.raises(wire.ConfigError, match="permission denied"):
        wire.load_token(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_token_warns_about_loose_permissions(tmp_path: Path, mode: int,
                                                  wire_log: pytest.LogCaptureFixture) -> None:
    path = token_file(tmp_path, b"A" * 40 + b"\n", mode)
    assert wire.load_token(path) == b"A" * 40
    assert f"mode {mode:04o}" in wire_log.text
    assert f"chmod 600 {path}" in wire_log.text


# ---------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:7000", ("127.0.0.1", 7000)),
    ("[::1]:7000", ("::1", 7000)),
    (":7000", ("0.0.0.0", 7000)),
    ("replica.example.com:1", ("replica.example.com", 1)),
    ("localhost:65535", ("localhost", 65535)),
    (" node-1:22 ", ("node-1", 22)),
])
def test_parse_addr_accepts(text: str, expected: tuple[str, int]) -> None:
    assert wire.parse_addr(text) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("", "empty"),
    ("replica", "has no port"),
    ("replica:", "no port number"),
    ("replica:http", "is not a number"),
    ("replica:+80", "is not a number"),
    ("replica:-1", "is not a number"),
    ("replica:0", "outside 1..65535"),
    ("replica:65536", "outside 1..65535"),
    ("::1:80", "must be in brackets"),
    ("[::1]", "no port after"),
    ("[::1:80", "never closes"),
    ("[nope]:80", "not an IPv6 address"),
    ("bad host:80", "not a valid host name"),
    ("-x:80", "not a valid host name"),
])
def test_parse_addr_refuses(text: str, match: str) -> None:
    with pytest.raises(wire.AddressError, match=match) as info:
        wire.parse_addr(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ClusterrepError)
    assert info.value.exit_code == 2


def test_parse_addr_port_zero_only_when_allowed() -> None:
    assert wire.parse_addr("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
