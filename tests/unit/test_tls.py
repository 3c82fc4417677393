"""TLS with client certificates beneath the token handshake: real sockets, real certificates.

Certificates come from `clusterrep.pki` (what ``clusterrep certs`` writes); a second, unrelated
CA plays the stranger. Each refusal is checked on both ends: what the refused side is told, and
that the other side logged it and never handed the connection to its handler.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import msgpack
import pytest

from clusterrep import serve, wire
from clusterrep.cli.main import main as cli_main
from clusterrep.errors import AuthError, ConfigError, PeerClosed
from clusterrep.pki import Member, issue, parse_member
from clusterrep.tls import TlsConfig

TOKEN = b"test-token-0123456789-abcdefghijklmnop"
OTHER = b"other-token-0123456789-abcdefghijklmnop"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two CAs: ours (members replica, h1, cli, and a replica cert without loopback names) and a
    stranger's (replica and h1, same names, wrong issuer)."""
    ours = tmp_path_factory.mktemp("pki")
    issue(ours, [Member("replica"), Member("h1"), Member("cli")], loopback=True)
    far = ours / "far"
    issue(far, [Member("faraway", ["192.0.2.7"])])
    (ours / "far-away.pem").write_bytes((far / "faraway.pem").read_bytes())
    (ours / "far-away.key").write_bytes((far / "faraway.key").read_bytes())
    strange = tmp_path_factory.mktemp("stranger")
    issue(strange, [Member("replica"), Member("h1")], loopback=True)
    return {"ours": ours, "far": far, "stranger": strange}


def tls(directory: Path, who: str, ca: Path | None = None) -> TlsConfig:
    return TlsConfig(directory / f"{who}.pem", directory / f"{who}.key", ca or directory / "ca.pem")


def echo(conn: wire.Connection) -> None:
    try:
        while True:
            conn.send(conn.recv())
    except wire.PeerClosed:
        pass


class Seen:
    """A handler that counts the connections it was handed."""

    def __init__(self) -> None:
        self.conns: list[wire.Connection] = []

    def __call__(self, conn: wire.Connection) -> None:
        self.conns.append(conn)
        echo(conn)


@contextmanager
def serving(auth: wire.Auth | bytes, handler: Callable[[wire.Connection], None] = echo
            ) -> Iterator[serve.Server]:
    server = serve.Server(("127.0.0.1", 0), auth, name="replica", role="replica", handler=handler)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def dial(server: serve.Server, auth: wire.Auth | bytes, *, name: str = "h1", role: str = "node",
         timeout: float = 5.0) -> wire.Connection:
    return wire.connect(server.address, auth, name=name, role=role, timeout=timeout)


@pytest.fixture
def wire_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="clusterrep.wire")
    return caplog


def refusals(caplog: pytest.LogCaptureFixture, within: float = 2.0) -> str:
    end = time.monotonic() + within
    while time.monotonic() < end and "connection refused" not in caplog.text:
        time.sleep(0.02)
    return caplog.text


# ---------------------------------------------------------------------------------------------
# Working sessions


def test_frames_of_every_size_cross_an_encrypted_session(pki: dict[str, Path]) -> None:
    ours = pki["ours"]
    seen = Seen()
    with serving(wire.Auth(TOKEN, tls(ours, "replica")), seen) as server, \
            dial(server, wire.Auth(TOKEN, tls(ours, "h1"))) as conn:
        assert conn.tls
        for value in ({"t": "hi"}, b"x" * 100_000, b"\x00" * (3 * MiB), bytes(range(256)) * 80_000):
            conn.send(value)
            assert conn.recv(timeout=10) == value
    assert seen.conns and seen.conns[0].tls
    assert seen.conns[0].peer_name == "h1"


def test_one_thread_sends_while_another_receives(pki: dict[str, Path]) -> None:
    """The shipper sends batches while its reader takes acks: full duplex on one TLS session."""
    ours = pki["ours"]
    count, blob = 300, b"y" * 200_000
    with serving(wire.Auth(TOKEN, tls(ours, "replica"))) as server, \
            dial(server, wire.Auth(TOKEN, tls(ours, "h1"))) as conn:
        got: list[Any] = []

        def reader() -> None:
            for _ in range(count):
                got.append(conn.recv(timeout=20))

        t = threading.Thread(target=reader)
        t.start()
        for k in range(count):
            conn.send({"k": k, "blob": blob})
        t.join(30)
        assert not t.is_alive()
        assert [g["k"] for g in got] == list(range(count))
        assert all(g["blob"] == blob for g in got)


def test_recv_timeout_leaves_the_tls_session_usable(pki: dict[str, Path]) -> None:
    ours = pki["ours"]
    go = threading.Event()

    def late(conn: wire.Connection) -> None:
        go.wait(5)
        conn.send("late")
        echo(conn)

    with serving(wire.Auth(TOKEN, tls(ours, "replica")), late) as server, \
            dial(server, wire.Auth(TOKEN, tls(ours, "h1"))) as conn:
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0.05)
        go.set()
        assert conn.recv(timeout=5) == "late"
        conn.send("again")
        assert conn.recv(timeout=5) == "again"


def test_close_wakes_a_blocked_tls_recv(pki: dict[str, Path]) -> None:
    ours = pki["ours"]
    with serving(wire.Auth(TOKEN, tls(ours, "replica"))) as server:
        conn = dial(server, wire.Auth(TOKEN, tls(ours, "h1")))
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                conn.recv()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.2)
        conn.close()
        t.join(5)
        assert not t.is_alive()
        assert isinstance(errors[0], PeerClosed)


def test_read_only_clients_may_use_any_certificate_of_the_ca(pki: dict[str, Path]) -> None:
    ours = pki["ours"]
    with serving(wire.Auth(TOKEN, tls(ours, "replica"))) as server, \
            dial(server, wire.Auth(TOKEN, tls(ours, "cli")), name="cli-1234", role="client") as conn:
        conn.send("status?")
        assert conn.recv(timeout=5) == "status?"


# ---------------------------------------------------------------------------------------------
# Refusals


def test_a_plain_client_is_told_the_server_requires_tls(pki: dict[str, Path],
                                                        wire_log: pytest.LogCaptureFixture) -> None:
    seen = Seen()
    with serving(wire.Auth(TOKEN, tls(pki["ours"], "replica")), seen) as server:
        start = time.monotonic()
        with pytest.raises(AuthError, match="requires TLS") as err:
            dial(server, TOKEN)
        assert time.monotonic() - start < 3, "the refusal must be immediate, not a timeout"
        assert "--tls-cert" in str(err.value)
        assert "connection refused" in refusals(wire_log)
    assert not seen.conns


def test_a_tls_client_will_not_talk_in_clear_to_a_plain_server(pki: dict[str, Path]) -> None:
    seen = Seen()
    with serving(TOKEN, seen) as server, pytest.raises(AuthError, match="runs without TLS"):
        dial(server, wire.Auth(TOKEN, tls(pki["ours"], "h1")))
    assert not seen.conns


def test_a_client_certificate_from_another_ca_is_refused(pki: dict[str, Path],
                                                         wire_log: pytest.LogCaptureFixture) -> None:
    seen = Seen()
    stranger = tls(pki["stranger"], "h1", ca=pki["ours"] / "ca.pem")  # trusts us, we do not trust it
    with serving(wire.Auth(TOKEN, tls(pki["ours"], "replica")), seen) as server:
        with pytest.raises((AuthError, PeerClosed)):
            dial(server, wire.Auth(TOKEN, stranger))
        assert "client certificate is not trusted" in refusals(wire_log)
    assert not seen.conns


def test_a_server_certificate_from_another_ca_is_refused(pki: dict[str, Path]) -> None:
    seen = Seen()
    impostor = tls(pki["stranger"], "replica", ca=pki["ours"] / "ca.pem")
    with serving(wire.Auth(TOKEN, impostor), seen) as server:
        with pytest.raises(AuthError, match="certificate is not trusted") as err:
            dial(server, wire.Auth(TOKEN, tls(pki["ours"], "h1")))
        assert "--tls-ca" in str(err.value)
    assert not seen.conns


def test_a_server_certificate_must_name_the_address_dialled(pki: dict[str, Path]) -> None:
    far = tls(pki["ours"], "far-away", ca=pki["far"] / "ca.pem")  # valid, but for 192.0.2.7 only
    client = tls(pki["far"], "faraway")
    with serving(wire.Auth(TOKEN, far)) as server:
        with pytest.raises(AuthError, match=r"(?i)hostname mismatch|not valid for") as err:
            dial(server, wire.Auth(TOKEN, client))
        assert "subjectAltName" in str(err.value)


def test_a_certificate_cannot_speak_for_another_member(pki: dict[str, Path],
                                                       wire_log: pytest.LogCaptureFixture) -> None:
    ours = pki["ours"]
    seen = Seen()
    with serving(wire.Auth(TOKEN, tls(ours, "replica")), seen) as server:
        with pytest.raises(AuthError, match="does not name h2") as err:
            dial(server, wire.Auth(TOKEN, tls(ours, "h1")), name="h2")
        assert "common name" in str(err.value)
        assert "claims to be node h2, but its certificate names h1" in refusals(wire_log)
        with pytest.raises(AuthError, match="does not name coordinator"):
            dial(server, wire.Auth(TOKEN, tls(ours, "h1")), name="coordinator", role="coordinator")
    assert not seen.conns


def test_the_token_is_still_required_inside_tls(pki: dict[str, Path],
                                                wire_log: pytest.LogCaptureFixture) -> None:
    ours = pki["ours"]
    seen = Seen()
    with serving(wire.Auth(TOKEN, tls(ours, "replica")), seen) as server:
        with pytest.raises(AuthError, match="authentication failed"):
            dial(server, wire.Auth(OTHER, tls(ours, "h1")))
        assert "wrong token" in refusals(wire_log)
    assert not seen.conns


# ---------------------------------------------------------------------------------------------
# Configuration


def test_tls_options_come_all_three_or_none(pki: dict[str, Path]) -> None:
    ours = pki["ours"]
    assert TlsConfig.from_options(None, None, None) is None
    with pytest.raises(ConfigError, match="missing: --tls-ca"):
        TlsConfig.from_options(str(ours / "h1.pem"), str(ours / "h1.key"), None)
    assert TlsConfig.from_options(str(ours / "h1.pem"), str(ours / "h1.key"), str(ours / "ca.pem"))


def test_bad_tls_files_are_named_in_the_error(pki: dict[str, Path], tmp_path: Path) -> None:
    ours = pki["ours"]
    with pytest.raises(ConfigError, match=r"--tls-cert .*nope\.pem does not exist"):
        TlsConfig(tmp_path / "nope.pem", ours / "h1.key", ours / "ca.pem")
    with pytest.raises(ConfigError, match=r"cannot load certificate .*h1\.pem with key .*cli\.key"):
        TlsConfig(ours / "h1.pem", ours / "cli.key", ours / "ca.pem")  # key of another cert
    with pytest.raises(ConfigError, match="cannot load the CA certificate"):
        TlsConfig(ours / "h1.pem", ours / "h1.key", ours / "h1.key")   # a key is not a CA
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="cannot load certificate"):
        TlsConfig(junk, ours / "h1.key", ours / "ca.pem")


def test_certs_command_reuses_the_ca_and_never_overwrites_silently(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert cli_main(["certs", str(d), "replica=10.0.0.5,rep.example", "h1"]) == 0
    ca = (d / "ca.pem").read_bytes()
    assert (d / "h1.key").stat().st_mode & 0o777 == 0o600
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert cli_main(["certs", str(d), "h2"]) == 0
    assert (d / "ca.pem").read_bytes() == ca, "a second run must reuse the CA"
    TlsConfig(d / "h2.pem", d / "h2.key", d / "ca.pem")  # the new member chains to the same CA
    old = (d / "h1.pem").read_bytes()
    assert cli_main(["certs", str(d), "h1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (d / "h1.pem").read_bytes() == old
    assert cli_main(["certs", str(d), "h1", "--force"]) == 0
    assert (d / "h1.pem").read_bytes() != old


@pytest.mark.parametrize("spec, match", [
    ("../x", "not a valid name"),
    ("h1=10.0.0.1,bad host", "neither an IP address nor a DNS name"),
    ("", "not a valid name"),
])
def test_member_specs_are_checked(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_member(spec)


# ---------------------------------------------------------------------------------------------
# Review findings: each was a real bug


def test_an_address_in_a_certificate_never_passes_for_a_member_name(
        pki: dict[str, Path], tmp_path: Path, wire_log: pytest.LogCaptureFixture) -> None:
    """A coordinator whose host is called "h1" (and every --loopback certificate, which names
    "localhost") must not be able to ship node h1's (or node localhost's) stream."""
    issue(tmp_path, [Member("replica"), Member("coordinator", ["h1"])], loopback=True)
    seen = Seen()
    with serving(wire.Auth(TOKEN, tls(tmp_path, "replica")), seen) as server:
        for name in ("h1", "localhost"):
            with pytest.raises(AuthError, match=f"does not name {name}"):
                dial(server, wire.Auth(TOKEN, tls(tmp_path, "coordinator")), name=name)
        with dial(server, wire.Auth(TOKEN, tls(tmp_path, "coordinator")), name="coordinator",
                  role="coordinator") as conn:
            conn.send("ok")
            assert conn.recv(timeout=5) == "ok"
    assert len(seen.conns) == 1


def test_a_member_certificate_is_not_a_server_certificate_for_its_name(tmp_path: Path) -> None:
    """Node h1's certificate (common name h1, no addresses) does not pass the client's address
    check for a server dialled as "h1": common names are never addresses (OpenSSL would fall
    back to the common name of a certificate without subjectAltNames unless told not to)."""
    issue(tmp_path, [Member("h1")])
    cert = tls(tmp_path, "h1")
    a, b = socket.socketpair()
    with a, b:
        server_side = cert.server_context.wrap_socket(a, server_side=True,
                                                      do_handshake_on_connect=False)
        client_side = cert.client_context.wrap_socket(b, server_hostname="h1",
                                                      do_handshake_on_connect=False)
        t = threading.Thread(target=_quiet, args=(server_side.do_handshake,))
        t.start()
        with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)hostname mismatch"):
            client_side.do_handshake()
        client_side.close()
        t.join(5)
        server_side.close()


def _quiet(fn: Callable[[], Any]) -> None:
    with suppress(Exception):
        fn()


def test_ca_is_not_a_member_name_and_long_names_are_refused_up_front(tmp_path: Path) -> None:
    for spec in ("ca", "CA=10.0.0.1", "x" * 65):
        with pytest.raises(ConfigError):
            parse_member(spec)
    with pytest.raises(ConfigError, match="cannot be a member name"):
        issue(tmp_path, [Member("h1"), Member("ca")])
    assert not list(tmp_path.iterdir()), "nothing may be written when a member is refused"


def test_keys_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        issue(tmp_path, [Member("h1")])
    finally:
        os.umask(old)
    assert (tmp_path / "h1.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "h1.pem").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem", "h1.key", "h1.pem"]


def test_a_reused_ca_is_checked(tmp_path: Path) -> None:
    issue(tmp_path / "a", [Member("h1")])
    issue(tmp_path / "b", [Member("h1")])
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="is not the key of"):
        issue(tmp_path / "a", [Member("h2")])


def test_the_force_hint_does_not_promise_revocation(tmp_path: Path) -> None:
    issue(tmp_path, [Member("h1")])
    with pytest.raises(ConfigError) as err:
        issue(tmp_path, [Member("h1")])
    assert "stays valid until it expires" in str(err.value)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_tls_handshakes_leave_no_descriptor_open(pki: dict[str, Path]) -> None:
    stranger = wire.Auth(TOKEN, tls(pki["stranger"], "h1", ca=pki["ours"] / "ca.pem"))
    errors: list[BaseException] = []
    with serving(wire.Auth(TOKEN, tls(pki["ours"], "replica"))) as server:
        dial(server, wire.Auth(TOKEN, tls(pki["ours"], "h1"))).close()  # warm up
        time.sleep(0.2)
        before = open_fds()
        for _ in range(20):
            try:
                dial(server, stranger)
            except (AuthError, PeerClosed) as exc:
                errors.append(exc)  # kept alive on purpose: the socket must not depend on GC
        time.sleep(0.5)
        assert open_fds() - before < 3, "a refused TLS handshake leaked its socket"
    assert len(errors) == 20


def test_stop_is_not_held_up_by_a_peer_stalled_in_its_tls_handshake(pki: dict[str, Path]) -> None:
    server = serve.Server(("127.0.0.1", 0), wire.Auth(TOKEN, tls(pki["ours"], "replica")),
                         name="replica", role="replica", handler=echo, timeout=30)
    server.start()
    stalled = socket.create_connection(server.address, timeout=5)  # takes no part in TLS
    try:
        stalled.recv(4096)  # the hello
        time.sleep(0.2)     # the server now waits in its TLS handshake
        start = time.monotonic()
        server.stop(timeout=5)
        assert time.monotonic() - start < 2
    finally:
        stalled.close()


def test_a_relabelled_server_hello_is_refused(pki: dict[str, Path]) -> None:
    """The hello is sent before TLS; a man in the middle who renames the server must fail."""

    def script(sock: socket.socket) -> None:
        snonce = os.urandom(32)
        sock.sendall(wire._pack_plain({"hello": "clusterrep", "version": wire.VERSION,
                                       "nonce": snonce, "name": "coordinator",
                                       "role": "coordinator", "tls": False}))
        (n,) = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
        msg = msgpack.unpackb(sock.recv(n, socket.MSG_WAITALL))
        mac = wire._server_mac(TOKEN, snonce, msg["nonce"], "replica", "replica")  # the real one
        sock.sendall(wire._pack_plain({"ok": True, "mac": mac}))
        sock.recv(1)

    listener = socket.create_server(("127.0.0.1", 0))
    t = threading.Thread(target=lambda: _quiet(lambda: script(listener.accept()[0])))
    t.start()
    try:
        with pytest.raises(AuthError, match="does not know our token"):
            wire.connect(listener.getsockname()[:2], TOKEN, name="h1", role="node", timeout=3)
    finally:
        t.join(5)
        listener.close()
