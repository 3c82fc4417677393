"""Going back in time with real processes (issue 11): restore points, restore, pins.

The replica runs with ``--retain``; two hosts write through their FUSE mounts; at quiet points a
marker file is created and the volume's state copied aside (``rsync -aHAX``). Each restore of
a marker's mark must equal that copy as ``rsync -aHAXn --numeric-ids`` judges it (bytes, names,
owners, modes, xattrs, hard links, symlinks, holes, times), while the hosts keep writing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from test_sync import MIB, populate, rsync_differences, settled

from clusterrep.localcluster import LocalCluster
from clusterrep.verify import compare_trees


def cli(c: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "clusterrep", *args, "--replica", c.replica_addr,
                        "--token-file", str(c.token_file)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"clusterrep {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def same(ref: Path, out: Path) -> None:
    """``out`` is ``ref``: rsync's judgement (names, owners, modes, xattrs, links, times) and
    every byte (rsync's quick check looks at sizes and times only)."""
    assert rsync_differences(ref, out) == ""
    diffs = list(compare_trees(ref, out))
    assert not diffs, "\n".join(map(str, diffs[:20]))


def marks(c: LocalCluster, *args: str) -> list[dict]:
    return json.loads(cli(c, "marks", "--json", *args).stdout)


def mark_of(c: LocalCluster, marker: str) -> dict:
    found = [m for m in marks(c, "--path", marker) if m["kind"] == "create"]
    assert len(found) == 1, found
    return found[0]


def work(mnt: Path, rnd: random.Random, round_: int) -> None:
    """One round of changes through a mount: overwrites, appends, truncates, renames, unlinks,
    hard links, attributes."""
    img = mnt / "images" / "vm0.img"
    with open(img, "r+b") as f:
        for _ in range(20):
            f.seek(rnd.randrange(8 * MIB - 4096))
            f.write(rnd.randbytes(4096))
    with open(mnt / "images" / "vm1.img", "ab") as f:
        f.write(rnd.randbytes(300_000))
    os.truncate(mnt / "tree" / "d0" / f"f{round_}.txt", rnd.randrange(100))
    os.rename(mnt / "tree" / "d1" / f"f{round_}.txt", mnt / "tree" / f"moved-{round_}.txt")
    os.unlink(mnt / "tree" / "d2" / f"f{round_}.txt")
    os.link(mnt / "tree" / f"moved-{round_}.txt", mnt / "tree" / f"link-{round_}.txt")
    (mnt / "tree" / f"new-{round_}.bin").write_bytes(rnd.randbytes(rnd.randrange(70_000)))
    os.chmod(mnt / "tree" / "d0" / "f5.txt", 0o600 + round_)
    os.setxattr(mnt / "images" / "vm0.img", "user.round", str(round_).encode())
    os.makedirs(mnt / "tree" / f"dir-{round_}" / "sub")


def quiet_point(c: LocalCluster, name: str, refs: Path) -> dict:
    """Everyone is quiet: create a marker, let the replica catch up, copy the volume aside."""
    settled(c)
    (c.mount("h1") / "markers" / name).write_text("")
    settled(c)
    ref = refs / name
    refs.mkdir(exist_ok=True)
    # (cp: it skips holes, where rsync would read the 1 TiB sparse file's zeros)
    subprocess.run(["cp", "-a", "--sparse=always", f"{c.volume}/.", f"{ref}/"], check=True)
    return mark_of(c, f"markers/{name}")


def test_restore_at_each_quiet_point_equals_the_volume_then(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", replica_args=["--retain", "1h"])
    clusters.append(c)
    populate(c.volume, images=2)
    (c.volume / "markers").mkdir()
    c.start()
    refs = workdir / "refs"
    rnd = random.Random(7)
    points = {"m0": quiet_point(c, "m0", refs)}
    for round_ in (1, 2, 3):
        host = c.mount("h1" if round_ % 2 else "h2")
        work(host, rnd, round_)
        points[f"m{round_}"] = quiet_point(c, f"m{round_}", refs)

    listed = marks(c)
    gseqs = [m["gseq"] for m in listed]
    assert gseqs == sorted(gseqs) and len(set(gseqs)) == len(gseqs)
    times = [m["received_at"] for m in listed]
    assert times == sorted(times) and all(t.endswith("Z") and "." in t for t in times)
    assert {"gseq", "kind", "paths", "origin", "received_at"} <= set(listed[0])

    # the hosts keep writing while every restore runs
    stop = threading.Event()

    def keep_writing() -> None:
        r = random.Random(99)
        while not stop.is_set():
            with open(c.mount("h2") / "images" / "vm1.img", "r+b") as f:
                f.seek(r.randrange(8 * MIB))
                f.write(r.randbytes(65536))
            (c.mount("h1") / "tree" / "d0" / "f6.txt").write_bytes(r.randbytes(5000))

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        for name, mark in points.items():
            out = workdir / f"restored-{name}"
            r = cli(c, "restore", "--mark", str(mark["gseq"]), "--to", str(out), "--quiet")
            assert f"restored g{mark['gseq']}" in r.stdout
            same(refs / name, out)
            sparse = os.stat(out / "images" / "sparse.img")
            assert sparse.st_size == 1 << 40 and sparse.st_blocks * 512 < 64 * MIB
        # by time: the newest mark received at or before the marker's arrival
        out = workdir / "by-time"
        cli(c, "restore", "--time", points["m2"]["received_at"], "--to", str(out), "--quiet")
        same(refs / "m2", out)
        # one path, as it was then
        out = workdir / "one-path"
        cli(c, "restore", "--mark", str(points["m1"]["gseq"]), "--path", "images/vm0.img",
            "--path", "tree/d1", "--to", str(out), "--quiet")
        assert (out / "images" / "vm0.img").read_bytes() == (refs / "m1" / "images" / "vm0.img").read_bytes()
        same(refs / "m1" / "tree" / "d1", out / "tree" / "d1")
        assert sorted(p.name for p in out.iterdir()) == ["images", "tree"]
        assert sorted(p.name for p in (out / "tree").iterdir()) == ["d1"]
    finally:
        stop.set()
        writer.join()
    settled(c)


def test_restore_refuses_what_it_cannot_do_and_changes_nothing(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", replica_args=["--retain", "1h"])
    clusters.append(c)
    c.start()
    (c.mount("h1") / "a.txt").write_text("a")
    settled(c)
    newest = marks(c)[-1]["gseq"]
    busy = workdir / "busy"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    r = cli(c, "restore", "--latest", "--to", str(busy), check=False)
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
    assert [p.name for p in busy.iterdir()] == ["keep"]
    out = workdir / "out"
    r = cli(c, "restore", "--mark", str(newest + 1000), "--to", str(out), check=False)
    assert r.returncode == 1 and "window" in r.stderr and not out.exists()
    r = cli(c, "restore", "--mark", str(newest), "--path", "no/such/file", "--to", str(out), check=False)
    assert r.returncode == 1 and "did not exist" in r.stderr and not out.exists()
    r = cli(c, "restore", "--time", "yesterday", "--to", str(out), check=False)
    assert r.returncode == 1 and "ISO 8601" in r.stderr and not out.exists()
    r = cli(c, "restore", "--name", "nope", "--to", str(out), check=False)
    assert r.returncode == 1 and "pinned" in r.stderr and not out.exists()
    for bad in (["--time", ""], ["--name", " "], ["--mark", str(2**70)], ["--mark", "-3"]):
        r = cli(c, "restore", *bad, "--to", str(out), check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists(), (bad, r.stderr)
    r = cli(c, "restore", "--latest", "--to", "/proc/1/cannot/be/made", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    cli(c, "marks", "--pin", str(newest), "--name", "before-upgrade")
    assert [m.get("pin") for m in marks(c) if m["gseq"] == newest] == ["before-upgrade"]
    cli(c, "restore", "--name", "before-upgrade", "--to", str(out), "--quiet")
    assert (out / "a.txt").read_text() == "a"
    cli(c, "marks", "--unpin", "before-upgrade")
    r = cli(c, "marks", "--unpin", "before-upgrade", check=False)
    assert r.returncode == 1 and "pinned" in r.stderr


def test_a_replica_killed_during_a_restore_loses_no_restore_point(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", replica_args=["--retain", "1h"])
    clusters.append(c)
    c.start()
    mnt = c.mount("h1")
    (mnt / "big.img").write_bytes(os.urandom(64 * MIB))
    (mnt / "markers").mkdir()
    refs = workdir / "refs"
    point = quiet_point(c, "m0", refs)
    with open(mnt / "big.img", "r+b") as f:  # rewrite a quarter of it after the mark
        for i in range(0, 64 * MIB, 4 * MIB):
            f.seek(i)
            f.write(os.urandom(MIB))
    settled(c)
    before = [m["gseq"] for m in marks(c)]
    out = workdir / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "clusterrep", "restore", "--mark", str(point["gseq"]),
                             "--to", str(out), "--quiet", "--replica", c.replica_addr,
                             "--token-file", str(c.token_file)], stderr=subprocess.PIPE, text=True)
    while not (out / "big.img").exists() and proc.poll() is None:
        threading.Event().wait(0.01)
    c.stop_process("replica", signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    c.start_replica()
    settled(c)
    after = [m["gseq"] for m in marks(c)]
    assert after[:len(before)] == before  # every listed restore point is still there
    out = workdir / "again"
    cli(c, "restore", "--mark", str(point["gseq"]), "--to", str(out), "--quiet")
    same(refs / "m0", out)
    shutil.rmtree(workdir / "interrupted")


def _verify_online(c: LocalCluster, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clusterrep", "verify", "--online", "--coordinator",
                           c.coordinator_addr, "--token-file", str(c.token_file), *extra],
                          capture_output=True, text=True, timeout=300)


def test_restore_before_and_after_a_repair_gives_the_volume_then(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    """Damage on the replica is put right by `verify --repair`; the repair corrects the past
    too (what it replaces was never the volume's): both marks restore to the volume."""
    c = LocalCluster(workdir / "c", replica_args=["--retain", "1h"])
    clusters.append(c)
    c.start()
    mnt = c.mount("h1")
    (mnt / "markers").mkdir()
    (mnt / "disk.img").write_bytes(os.urandom(8 * MIB))
    (mnt / "notes.txt").write_text("first\n")
    refs = workdir / "refs"
    before = quiet_point(c, "m0", refs)
    with open(c.target / "disk.img", "r+b") as f:  # bit rot on the replica, outside any event
        f.seek(3 * MIB)
        f.write(b"\xde\xad" * 2048)
    assert _verify_online(c).returncode == 1
    r = _verify_online(c, "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    with open(mnt / "notes.txt", "a") as f:
        f.write("second\n")
    after = quiet_point(c, "m1", refs)
    for name, mark in (("m0", before), ("m1", after)):
        out = workdir / f"restored-{name}"
        cli(c, "restore", "--mark", str(mark["gseq"]), "--to", str(out), "--quiet")
        same(refs / name, out)


def test_retention_by_size_prunes_the_oldest_and_a_replica_killed_meanwhile_restores_what_it_lists(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", replica_args=["--retain-size", "24M"])
    clusters.append(c)
    c.start()
    mnt = c.mount("h1")
    (mnt / "markers").mkdir()
    (mnt / "disk.img").write_bytes(os.urandom(16 * MIB))
    refs = workdir / "refs"
    points = {}
    rnd = random.Random(3)
    for i in range(8):  # each round overwrites 4 MiB: the undo outgrows 24 MiB
        with open(mnt / "disk.img", "r+b") as f:
            f.seek(rnd.randrange(12) * MIB)
            f.write(os.urandom(4 * MIB))
        points[f"m{i}"] = quiet_point(c, f"m{i}", refs)
        if i == 5:
            c.stop_process("replica", signal.SIGKILL)  # (pruning runs at its checkpoints)
            c.start_replica()
            settled(c)
    listed = {m["gseq"] for m in marks(c)}
    kept = [name for name, m in points.items() if m["gseq"] in listed]
    assert "m0" not in kept and "m7" in kept, kept  # the oldest went first
    status = c.status()
    assert status["history"]["bytes"] <= 24 * MIB
    for name in kept:
        out = workdir / f"restored-{name}"
        cli(c, "restore", "--mark", str(points[name]["gseq"]), "--to", str(out), "--quiet")
        same(refs / name, out)
    gone = points["m0"]["gseq"]
    r = cli(c, "restore", "--mark", str(gone), "--to", str(workdir / "gone"), check=False)
    assert r.returncode == 1 and "window" in r.stderr


def test_a_full_history_disk_prunes_the_oldest_raises_an_alarm_and_applying_goes_on(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    state = workdir / "replica-state"
    (state / "history").mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(state / "history")],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a small tmpfs (needs root): {r.stderr}"
    try:
        c = LocalCluster(workdir / "c", replica_args=["--retain", "1h"], replica_state=state)
        clusters.append(c)
        c.start()
        mnt = c.mount("h1")
        (mnt / "markers").mkdir()
        (mnt / "disk.img").write_bytes(os.urandom(16 * MIB))
        refs = workdir / "refs"
        points = {}
        for i in range(4):  # each round's undo is 4 MiB: the fourth cannot fit beside the first
            points[f"m{i}"] = quiet_point(c, f"m{i}", refs)
            with open(mnt / "disk.img", "r+b") as f:
                f.seek(i * 4 * MIB)
                f.write(os.urandom(4 * MIB))
        points["m4"] = quiet_point(c, "m4", refs)
        assert rsync_differences(c.volume, c.target) == ""  # applying went on
        status = c.status()
        assert "history disk full" in (status["history"]["alarm"] or "")
        listed = {m["gseq"] for m in marks(c)}
        assert points["m0"]["gseq"] not in listed and points["m4"]["gseq"] in listed
        for name in ("m3", "m4"):
            out = workdir / f"restored-{name}"
            cli(c, "restore", "--mark", str(points[name]["gseq"]), "--to", str(out), "--quiet")
            same(refs / name, out)
        c.stop()
    finally:
        subprocess.run(["umount", "-l", str(state / "history")], check=False)
