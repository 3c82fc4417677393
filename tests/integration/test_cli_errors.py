"""The CLI says clearly what is wrong and exits non-zero, changing nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clusterrep.localcluster import LocalCluster


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clusterrep", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def token(tmp_path: Path) -> str:
    p = tmp_path / "token"
    p.write_text("t" * 40 + "\n")
    p.chmod(0o600)
    return str(p)


def test_missing_volume(tmp_path: Path, token: str) -> None:
    r = run("coordinator", "--listen", "127.0.0.1:0", "--volume", str(tmp_path / "nope"),
            "--replica", "127.0.0.1:9", "--state", str(tmp_path / "s"), "--token-file", token)
    assert r.returncode != 0 and "is not a directory" in r.stderr
    r = run("node", "--id", "h1", "--volume", str(tmp_path / "nope"), "--mount", str(tmp_path / "m"),
            "--coordinator", "127.0.0.1:9", "--replica", "127.0.0.1:9", "--state",
            str(tmp_path / "n"), "--token-file", token)
    assert r.returncode != 0 and "is not a directory" in r.stderr


def test_busy_port(tmp_path: Path, token: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("replica", "--listen", f"127.0.0.1:{port}", "--target", str(tmp_path / "t"),
                "--state", str(tmp_path / "s"), "--token-file", token)
    assert r.returncode != 0 and "already in use" in r.stderr


def test_short_or_missing_token(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too short\n")
    r = run("status", "--replica", "127.0.0.1:9", "--token-file", str(short))
    assert r.returncode != 0 and "32" in r.stderr
    r = run("status", "--replica", "127.0.0.1:9", "--token-file", str(tmp_path / "missing"))
    assert r.returncode != 0
    assert "missing" in r.stderr.lower() or "no such" in r.stderr.lower()


def test_a_replica_without_state_refuses_a_target_that_holds_files(tmp_path: Path, token: str) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "existing").write_text("x")
    r = run("replica", "--listen", "127.0.0.1:0", "--target", str(target), "--state",
            str(tmp_path / "s"), "--token-file", token)
    assert r.returncode != 0 and "already holds files" in r.stderr and "--adopt-target" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()  # nothing created before every check passed
    assert os.listdir(target) == ["existing"]


def test_mount_point_in_use(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c", ("h1",)).start() as c:
        r = run("node", "--id", "h2", "--volume", str(c.volume), "--mount", str(c.mount("h1")),
                "--coordinator", c.coordinator_addr, "--replica", c.replica_addr, "--state",
                str(tmp_path / "n2"), "--token-file", str(c.token_file))
        assert r.returncode != 0 and "already a mount point" in r.stderr
        (c.mount("h1") / "still-works").write_text("yes")
        ok, why, _ = c.wait(30)
        assert ok, why


def test_wrong_token_node_cannot_join(tmp_path: Path, token: str) -> None:
    with LocalCluster(tmp_path / "c", ()).start() as c:
        r = run("node", "--id", "h9", "--volume", str(c.volume), "--mount", str(tmp_path / "m9"),
                "--coordinator", c.coordinator_addr, "--replica", c.replica_addr, "--state",
                str(tmp_path / "n9"), "--token-file", token, timeout=60)
        assert r.returncode != 0 and "could not join" in r.stderr
        assert "h9" not in c.status()["sources"]


def test_help_for_every_command() -> None:
    for cmd in ("replica", "coordinator", "node", "status", "wait", "verify", "demo", "sim"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "usage: clusterrep " + cmd in r.stdout


@pytest.mark.parametrize(("change", "says"), [
    ({"--coordinator": "127.0.0.1"}, "has no port"),
    ({"--replica": "nohost"}, "has no port"),
    ({"--state": "FILE"}, "exists and is not a directory"),
    ({"--ack-timeout": "-1"}, "out of range"),
    ({"--coordinator-timeout": "1e-9"}, "out of range"),
    ({"--coordinator-timeout": "abc"}, "not a number of seconds"),
])
def test_node_option_typos_are_refused_before_anything_starts(tmp_path: Path, token: str,
                                                              change: dict[str, str], says: str) -> None:
    """Found by review: these were accepted (and retried for ever), or gave a traceback."""
    (tmp_path / "FILE").write_text("")
    opts = {"--id": "h1", "--volume": str(tmp_path), "--mount": str(tmp_path / "m"),
            "--coordinator": "127.0.0.1:9", "--replica": "127.0.0.1:9",
            "--state": str(tmp_path / "s"), "--token-file": token}
    opts.update({k: str(tmp_path / v) if v == "FILE" else v for k, v in change.items()})
    r = run("node", *[x for kv in opts.items() for x in kv])
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--lease", "abc", "not a number of seconds"), ("--lease", "0", "out of range"),
    ("--replica", "nohost", "has no port"), ("--state", "FILE", "exists and is not a directory"),
])
def test_coordinator_option_typos_are_refused(tmp_path: Path, token: str, option: str, value: str,
                                              says: str) -> None:
    (tmp_path / "FILE").write_text("")
    opts = {"--listen": "127.0.0.1:0", "--volume": str(tmp_path), "--replica": "127.0.0.1:9",
            "--state": str(tmp_path / "s"), "--token-file": token,
            option: str(tmp_path / value) if value == "FILE" else value}
    r = run("coordinator", *[x for kv in opts.items() for x in kv])
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_demo_refuses_a_workdir_that_holds_files_and_deletes_nothing(tmp_path: Path) -> None:
    """Found by review: ``demo --workdir DIR`` removed DIR and what it held."""
    (tmp_path / "precious").write_text("mine")
    r = run("demo", "--workdir", str(tmp_path), "--writes", "10", "--no-install")
    assert r.returncode == 2 and "not an empty directory" in r.stderr, r.stderr
    assert (tmp_path / "precious").read_text() == "mine"


def test_verify_names_the_attribute_and_shows_names_that_are_not_utf8(tmp_path: Path) -> None:
    vol, rep = tmp_path / "vol", tmp_path / "rep"
    for d in (vol, rep):
        d.mkdir()
        (d / "f").write_text("same")
    os.chown(rep / "f", 4242, 4242)
    os.mkdir(os.fsencode(str(vol)) + b"/caf\xe9")
    r = subprocess.run([sys.executable, "-m", "clusterrep", "verify", "--volume", str(vol),
                        "--target", str(rep)], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "owner" in r.stdout and "caf\\xe9" in r.stdout
