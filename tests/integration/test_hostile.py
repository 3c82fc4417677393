"""Hostile input against a real replica process: refused, logged, nothing applied or touched."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import msgpack
import pytest

from clusterrep import wire
from clusterrep.errors import AuthError
from clusterrep.events import WIRE_VERSION, Write
from clusterrep.localcluster import LocalCluster


@pytest.fixture
def replica_only(tmp_path: Path):
    c = LocalCluster(tmp_path / "c", ())
    c.start_replica()
    yield c
    c.stop()


def _log(c: LocalCluster) -> str:
    time.sleep(0.3)
    return (c.logs / "replica.log").read_text()


def test_wrong_token_is_refused_before_anything_is_read(replica_only: LocalCluster) -> None:
    with pytest.raises(AuthError):
        wire.connect(replica_only.replica_addr, b"w" * 40, name="h9", role="node")
    assert "h9" not in replica_only.status()["sources"]
    assert "authentication" in _log(replica_only).lower()


def test_garbage_bytes_are_refused(replica_only: LocalCluster) -> None:
    host, port = replica_only.replica_addr.split(":")
    with socket.create_connection((host, int(port))) as s:
        s.recv(4096)  # the server's hello
        s.sendall(os.urandom(5000))
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    assert replica_only.status()["sources"] == {}


def crafted_write(path: bytes, source: str = "h1") -> bytes:
    """A Write whose path the event model would refuse, built by hand as an attacker would."""
    return msgpack.packb([WIRE_VERSION, Write.KIND, source, 1, 0, 0, path, 0, b"pwned"],
                         use_bin_type=True)


@pytest.mark.parametrize("path", [b"../outside/pwned", b"/tmp/pwned", b"a/../../pwned", b"a\0b"])
def test_a_frame_whose_path_escapes_is_refused(replica_only: LocalCluster, tmp_path: Path,
                                               path: bytes) -> None:
    outside = tmp_path / "c" / "outside"
    outside.mkdir()
    (outside / "keep").write_text("unchanged")
    conn = wire.connect(replica_only.replica_addr, replica_only.token, name="h1", role="node")
    conn.send({"t": "hello", "source": "h1"})
    assert conn.recv(timeout=5)["t"] == "welcome"
    conn.send({"t": "batch", "events": [crafted_write(path)], "captured": 1})
    reply = conn.recv(timeout=5)
    assert reply["t"] == "error" and "invalid event" in reply["message"]
    conn.close()
    st = replica_only.status()
    assert st["sources"].get("h1", {}).get("received", 0) == 0  # nothing journaled
    assert st["applied_events"] == 0
    assert sorted(os.listdir(outside)) == ["keep"] and (outside / "keep").read_text() == "unchanged"
    assert list(os.listdir(replica_only.target)) == []
    assert "refused a batch from h1" in _log(replica_only)


def test_a_node_cannot_ship_in_another_sources_name(replica_only: LocalCluster) -> None:
    conn = wire.connect(replica_only.replica_addr, replica_only.token, name="h1", role="node")
    conn.send({"t": "hello", "source": "h1"})
    conn.recv(timeout=5)
    ok = Write(source="h2", seq=1, after=0, path="f", offset=0, data=b"x")
    from clusterrep.events import encode

    conn.send({"t": "batch", "events": [encode(ok)], "captured": 1})
    reply = conn.recv(timeout=5)
    assert reply["t"] == "error" and "h2" in reply["message"]
    conn.close()
    assert replica_only.status()["applied_events"] == 0
