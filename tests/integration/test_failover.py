"""Failover and failback with real processes (issue 11): cluster generations.

A coordinator started on a fresh state is a new incarnation of the cluster (a *generation*):
after a failover to a restored volume, members of the old generation must not mix their
streams or operations into the new one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sync import MIB, rsync_differences, settled

from clusterrep.errors import ClusterrepError
from clusterrep.localcluster import LocalCluster
from clusterrep.timing import pause


def test_members_of_an_older_generation_are_refused(workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c")
    clusters.append(c)
    c.start()
    (c.mount("h1") / "a.txt").write_text("generation one")
    settled(c)
    c.stop()
    first = (workdir / "c" / "state-coordinator" / "generation").read_text()
    assert (workdir / "c" / "state-h1" / "generation").read_text() == first
    assert (c.replica_state / "generation").read_text() == first
    # a new incarnation on the same volume (as after a failover): the coordinator's state is new
    shutil.rmtree(workdir / "c" / "state-coordinator")
    c.start_replica()
    c.start_coordinator()
    with pytest.raises(ClusterrepError) as info:
        c.start_node("h1")  # its state belongs to the old generation
    assert "belongs to cluster generation" in str(info.value) and "remove its state" in str(info.value)
    second = (workdir / "c" / "state-coordinator" / "generation").read_text()
    assert second != first
    log = c.logs / "replica.log"
    for _ in range(100):  # the coordinator keeps trying; the replica keeps refusing
        if f"belongs to cluster generation {second}" in log.read_text():
            break
        pause(0.1)
    assert f"replicates generation {first}" in log.read_text()
    assert not (c.target / "b.txt").exists()


def test_failover_to_a_restored_volume_then_failback_and_switch_back(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    """The whole round trip (docs/operations.md, "Failover and failback"): site A's volume is
    replicated to R (with history); site A is lost with writes R never got; the latest restore
    point becomes a new volume at site B with a new cluster generation; when site A returns,
    a replica there adopts its old volume: what A wrote after the failover mark is saved aside
    and listed, then only what differs moves; finally the planned switch back to site A moves
    nothing."""
    a = LocalCluster(workdir / "a", replica_args=["--retain", "1h"])
    clusters.append(a)
    a.start()
    mnt = a.mount("h1")
    (mnt / "images").mkdir()
    for i in range(2):
        (mnt / "images" / f"vm{i}.img").write_bytes(os.urandom(8 * MIB))
    (mnt / "notes.txt").write_text("before the failover\n")
    settled(a)

    # site A goes on writing while its replica link is down, then is lost
    a.stop_process("replica", signal.SIGKILL)
    with open(mnt / "images" / "vm0.img", "r+b") as f:
        f.seek(3 * MIB)
        f.write(b"LOST" * 1024)
    (mnt / "late.txt").write_text("written at site A after the last replication\n")
    lost_at = time.monotonic()
    for name in ("h1", "h2", "coordinator"):
        a.stop_process(name, signal.SIGKILL)
    a.start_replica()  # (R lives at site B: it is still there, with its history)

    # failover: the latest restore point becomes the new volume at site B, a new generation
    (workdir / "b").mkdir()
    shutil.copy(a.token_file, workdir / "b" / "token")  # (one cluster secret for both sites)
    b = LocalCluster(workdir / "b", nodes=("h3", "h4"))
    clusters.append(b)
    r = subprocess.run([sys.executable, "-m", "clusterrep", "restore", "--latest", "--quiet",
                        "--to", str(b.volume), "--replica", a.replica_addr, "--token-file",
                        str(a.token_file)], capture_output=True, text=True, check=True)
    mark = int(r.stdout.split()[1].removeprefix("g"))
    b.target = a.volume  # the replica of the new cluster will be site A's old volume, adopted
    b.replica_args = ["--adopt-target", "--failback-from", a.replica_addr, "--failback-mark", str(mark)]
    b.start_coordinator()
    for node in b.nodes:
        b.start_node(node)
    rto = time.monotonic() - lost_at
    assert (b.mount("h3") / "notes.txt").read_text() == "before the failover\n"
    assert not (b.mount("h3") / "late.txt").exists()

    # the new site works; 64 scattered 4 KiB writes and a new file
    rnd = random.Random(4)
    changed = rnd.sample(range(8 * MIB // 4096), 64)
    with open(b.mount("h3") / "images" / "vm1.img", "r+b") as f:
        for block in changed:
            f.seek(block * 4096)
            f.write(os.urandom(4096))
    (b.mount("h4") / "b-new.txt").write_text("written at site B\n")

    # failback: site A returns; its replica adopts the old volume
    b.start_replica()
    st = settled(b)
    assert rsync_differences(b.volume, a.volume) == ""
    saved = b.replica_state / "failback-saved"
    listed = json.loads((saved / "failback.json").read_text())
    assert listed["mark"] == mark and "late.txt" in listed["new"]
    assert listed["changed"]["images/vm0.img"] == [[3 * MIB, 3 * MIB + 65536]]
    assert (saved / "late.txt").read_text() == "written at site A after the last replication\n"
    with open(saved / "images" / "vm0.img", "rb") as f:
        f.seek(3 * MIB)
        assert f.read(4096) == b"LOST" * 1024
    log = (b.logs / "replica.log").read_text()
    assert "late.txt: made after the failover mark" in log
    moved = st["last_sync"]["bytes"]
    print(f"failover RTO {rto:.1f} s; failback moved {moved} bytes for {len(changed)} 4 KiB blocks "
          f"changed since the failover ({moved / (len(changed) * 4096):.1f}x)")
    assert moved < 8 * MIB  # (an image is 8 MiB: no full copy)

    # planned switch back to site A: writers stop, the old volume is current, nothing moves
    for node in b.nodes:
        b.stop_process(node)
    settled(b)
    b.stop()
    (workdir / "a2").mkdir()
    shutil.copy(a.token_file, workdir / "a2" / "token")
    back = LocalCluster(workdir / "a2", replica_args=["--adopt-target"])
    clusters.append(back)
    back.volume, back.target = a.volume, b.volume
    back.start()
    st = settled(back)
    assert st["last_sync"]["bytes"] < MIB
    (back.mount("h1") / "home-again.txt").write_text("site A again\n")
    settled(back)
    assert rsync_differences(back.volume, back.target) == ""
