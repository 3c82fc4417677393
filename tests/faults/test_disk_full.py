"""The replica's disk fills up under load: acknowledgements stop, nothing is dropped or half
applied, and everything arrives once space returns."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from clusterrep.localcluster import LocalCluster


def test_replica_journal_disk_full_then_space_returns(tmp_path: Path, identical) -> None:
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a small tmpfs (needs root): {r.stderr}"
    try:
        c = LocalCluster(tmp_path / "c", ("h1",), replica_state=small / "state")
        with c.start():
            m = c.mount("h1")
            (m / "warm").write_text("x")
            ok, why, _ = c.wait(30)
            assert ok, why
            free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
            with open(small / "ballast", "wb") as fh:  # leave about 1 MiB
                fh.write(b"\0" * max(0, free - (1 << 20)))
            fd = os.open(m / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
            for i in range(1280):  # 5 MiB: more than the replica's disk can take now
                os.pwrite(fd, os.urandom(4096), i * 4096)
            os.close(fd)
            time.sleep(2)
            st = c.status()["sources"]["h1"]
            assert st["received"] < st["captured"], st  # acknowledgements stopped
            assert "full" in (c.logs / "replica.log").read_text().lower()
            (small / "ballast").unlink()
            identical(c)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_replica_target_disk_full_pauses_applying_then_resumes(tmp_path: Path, identical) -> None:
    c = LocalCluster(tmp_path / "c", ("h1",))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(c.target)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a small tmpfs (needs root): {r.stderr}"
    try:
        with c.start():
            m = c.mount("h1")
            (m / "small").write_bytes(os.urandom(1000))
            fd = os.open(m / "big.img", os.O_RDWR | os.O_CREAT, 0o600)
            for i in range(3000):  # 12 MiB: more than the replica's target can hold
                os.pwrite(fd, os.urandom(4096), i * 4096)
            os.close(fd)
            deadline = time.monotonic() + 30
            while not (c.status().get("stalled")):
                assert time.monotonic() < deadline, "applying never reported the full disk"
                time.sleep(0.2)
            while True:  # receiving and acknowledging go on while applying is paused
                st = c.status()
                assert st["error"] is None  # paused, not given up
                if st["sources"]["h1"]["received"] == st["sources"]["h1"]["captured"]:
                    break
                assert time.monotonic() < deadline, st
                time.sleep(0.2)
            assert st["stalled"]
            shown = subprocess.run([sys.executable, "-m", "clusterrep", "status", "--replica",
                                    c.replica_addr, "--token-file", str(c.token_file)],
                                   capture_output=True, text=True, timeout=60)
            assert "PAUSED: applying waits" in shown.stdout, shown.stdout  # the operator sees it
            subprocess.run(["mount", "-o", "remount,size=64m", str(c.target)], check=True)
            identical(c)
            assert c.status()["stalled"] is None
    finally:
        subprocess.run(["umount", "-l", str(c.target)], check=False)
