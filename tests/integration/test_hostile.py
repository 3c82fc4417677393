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


def test_a_symlink_swapped_in_under_the_target_during_apply_leads_nowhere(make_cluster,
                                                                          tmp_path: Path) -> None:
    """Someone on the backup host swaps a directory of the live replica for a symlink to a
    directory outside it, while a node keeps writing there. The replica never follows it: while
    running, it goes on through the directory it already holds open (inside the target); after a
    restart, it refuses the symlink and stops applying, saying why. Nothing outside changes, and
    verify reports the tampered directory."""
    c = make_cluster(("h1",))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("unchanged")

    def untouched() -> None:
        assert sorted(os.listdir(outside)) == ["keep"]
        assert (outside / "keep").read_text() == "unchanged"

    m = c.mount("h1")
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(b"a" * 65536)
    ok, why, _ = c.wait(timeout=60)
    assert ok, why

    def write_for(seconds: float, swap_at: int | None = None) -> None:
        end, k = time.monotonic() + seconds, 0
        with open(m / "d" / "f", "r+b") as f:
            while time.monotonic() < end:
                k += 1
                os.pwrite(f.fileno(), bytes([k % 251]) * 4096, (k % 16) * 4096)
                if k % 20 == 0:
                    (m / "d" / f"new{k}").write_bytes(b"n" * 100)
                if k == swap_at:  # the attack, on the live replica
                    os.rename(c.target / "d", c.target / "d.moved")
                    os.symlink(outside, c.target / "d")
                time.sleep(0.002)

    write_for(2.0, swap_at=50)
    ok, why, _ = c.wait(timeout=60)
    untouched()

    c.stop_process("replica")
    c.start_replica()
    write_for(0.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not c.status().get("error"):
        time.sleep(0.1)
    st = c.status()
    assert st["error"], "after a restart the replica must refuse the symlink and stop applying"
    assert "symlink" in st["error"].lower() or "outside" in st["error"].lower(), st["error"]
    untouched()
    assert os.path.islink(c.target / "d")  # left as found: the replica does not "repair" it
    assert any(d.path == "d" for d in c.verify()), "verify must report the tampered directory"
