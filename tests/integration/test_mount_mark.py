"""`clusterrep mount-mark` with real processes: a restore point mounted read-only, browsed and
copied from while the volume has moved on.

The replica runs with ``--retain``; at a quiet point a marker file is created and the volume
copied aside (``cp -a --sparse=always``); then files are changed and deleted through a node's
mount. The marker's mark, mounted, must equal that copy as ``rsync -aHAXn --numeric-ids``
judges it and byte for byte, refuse every change with EROFS, and unmount cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_history import cli, marks, quiet_point, same
from test_sync import MIB, populate, settled

from clusterrep.capture.check import mounted_here
from clusterrep.localcluster import LocalCluster, free_port
from clusterrep.timing import pause
from clusterrep.verify import compare_trees


@pytest.fixture
def mounts() -> Iterator[list[tuple[subprocess.Popen[bytes], Path]]]:
    """Every ``mount-mark`` process a test starts: stopped, and its mount gone, at the end (this
    fixture is set up after ``clusters``, so it is torn down before the cluster stops)."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    yield started
    for proc, mnt in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if mounted_here(str(mnt)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def wait_for(what: str, done: Callable[[], bool], timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.05)):
        if done():
            return
        pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def mount_mark(c: LocalCluster, mounts: list, mnt: Path, *which: str) -> subprocess.Popen[bytes]:
    """Start ``mount-mark`` (output to files beside ``mnt``) and wait until it has mounted."""
    out, err = mnt.with_suffix(".out"), mnt.with_suffix(".err")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "clusterrep", "mount-mark", *which,
                                 "--replica", c.replica_addr, "--token-file", str(c.token_file),
                                 str(mnt)], stdout=fo, stderr=fe)
    mounts.append((proc, mnt))

    def up() -> bool:
        assert proc.poll() is None, f"mount-mark exited {proc.returncode}: {err.read_text()}"
        return mounted_here(str(mnt)) is not None and "mounted g" in out.read_text()
    wait_for(f"{mnt} to be mounted", up)
    return proc


def stopped_cleanly(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    assert proc.wait(timeout=60) == 0, mnt.with_suffix(".err").read_text()
    assert mounted_here(str(mnt)) is None and not os.path.ismount(mnt)
    assert os.listdir(mnt) == []
    err = mnt.with_suffix(".err").read_text()
    assert "Traceback" not in err and "ERROR" not in err, err
    assert f"unmounted {mnt}" in mnt.with_suffix(".out").read_text()


def refused(op: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        op()
    assert info.value.errno == errno.EROFS, info.value


def test_a_mounted_mark_is_the_volume_then_read_only(
        workdir: Path, clusters: list[LocalCluster], mounts: list) -> None:
    c = LocalCluster(workdir / "c", replica_args=["--retain", "1h"])
    clusters.append(c)
    vol = c.volume
    populate(vol, images=1)
    os.unlink(vol / "images" / "sparse.img")  # (1 TiB: rsync and compare_trees would read it all)
    with open(vol / "images" / "sparse.img", "wb") as f:  # a smaller sparse file instead
        f.truncate(40 * MIB)
        f.seek(17 * MIB + 123)
        f.write(os.urandom(MIB))
    (vol / "doomed.bin").write_bytes(os.urandom(3 * MIB + 17))  # chunks of 1 MiB, and a tail
    (vol / "markers").mkdir()
    c.start()
    refs = workdir / "refs"
    point = quiet_point(c, "m0", refs)
    ref = refs / "m0"

    # the volume moves on: rewrites, appends, deletions, renames, attributes, new files
    host = c.mount("h1")
    with open(host / "images" / "vm0.img", "r+b") as f:
        for off in range(0, 8 * MIB, 2 * MIB):
            f.seek(off)
            f.write(os.urandom(4096))
    with open(host / "tree" / "d0" / "f2.txt", "ab") as f:
        f.write(b"appended after the mark")
    os.unlink(host / "doomed.bin")
    os.unlink(host / "tree" / "d2" / "f3.txt")
    os.rename(host / "tree" / "d1" / "f4.txt", host / "tree" / "renamed.txt")
    os.rmdir(host / "empty" / "dirs" / "only")
    os.chmod(host / "tree" / "d0" / "f5.txt", 0o640)
    os.setxattr(host / "images" / "vm0.img", "user.vm", b"changed")
    (host / "after.txt").write_text("written after the mark")
    settled(c)
    assert not (vol / "doomed.bin").exists()

    mnt = workdir / "mnt"
    mnt.mkdir()
    proc = mount_mark(c, mounts, mnt, "--mark", str(point["gseq"]))
    assert f"mounted g{point['gseq']}" in mnt.with_suffix(".out").read_text()

    same(ref, mnt)  # everything as at the mark: names, attributes, links, bytes
    assert (mnt / "doomed.bin").read_bytes() == (ref / "doomed.bin").read_bytes()
    assert (mnt / "tree" / "d2" / "f3.txt").read_bytes() == (ref / "tree" / "d2" / "f3.txt").read_bytes()
    assert not (mnt / "after.txt").exists() and not (mnt / "tree" / "renamed.txt").exists()
    assert os.getxattr(mnt / "images" / "vm0.img", "user.vm") == b"uuid-1234"
    hard = os.stat(mnt / "tree" / "hardlink.txt")
    assert hard.st_nlink == 2 and hard.st_ino == os.stat(mnt / "tree" / "d0" / "f1.txt").st_ino
    assert os.readlink(mnt / "current.img") == "images/vm0.img"
    with open(mnt / "doomed.bin", "rb") as f:  # reads at odd offsets, across chunks, past the end
        f.seek(MIB - 5)
        assert f.read(10) == (ref / "doomed.bin").read_bytes()[MIB - 5:MIB + 5]
        f.seek(3 * MIB + 10)
        assert f.read(100) == (ref / "doomed.bin").read_bytes()[-7:]
        assert f.read(100) == b""

    # holes show: st_blocks, SEEK_DATA/SEEK_HOLE, and cp keeps the image sparse by itself
    sparse = mnt / "images" / "sparse.img"
    assert os.stat(sparse).st_blocks * 512 <= 4 * MIB
    with open(sparse, "rb") as f:
        data = os.lseek(f.fileno(), 0, os.SEEK_DATA)
        assert 16 * MIB <= data <= 17 * MIB + 123
        assert os.lseek(f.fileno(), data, os.SEEK_HOLE) >= 18 * MIB + 123
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 0
        f.seek(17 * MIB + 123)
        assert f.read(MIB) == (ref / "images" / "sparse.img").read_bytes()[17 * MIB + 123:18 * MIB + 123]

    # files copied out as an operator would
    out = workdir / "copied"
    out.mkdir()
    subprocess.run(["cp", "-a", str(sparse), f"{out}/"], check=True)
    assert os.stat(out / "sparse.img").st_blocks * 512 <= 4 * MIB
    assert (out / "sparse.img").read_bytes() == (ref / "images" / "sparse.img").read_bytes()
    subprocess.run(["cp", "-a", str(mnt / "doomed.bin"), str(mnt / "tree"), f"{out}/"], check=True)
    assert (out / "doomed.bin").read_bytes() == (ref / "doomed.bin").read_bytes()
    assert not list(compare_trees(ref / "tree", out / "tree"))

    # nothing can change it
    f1 = mnt / "tree" / "d0" / "f1.txt"
    refused(lambda: os.open(f1, os.O_RDWR))
    refused(lambda: os.open(f1, os.O_RDONLY | os.O_TRUNC))
    refused(lambda: (mnt / "new.txt").write_text("x"))
    refused(lambda: os.unlink(f1))
    refused(lambda: os.rename(f1, mnt / "tree" / "elsewhere.txt"))
    refused(lambda: os.mkdir(mnt / "newdir"))
    refused(lambda: os.rmdir(mnt / "empty" / "dirs" / "only"))
    refused(lambda: os.symlink("x", mnt / "sym"))
    refused(lambda: os.link(f1, mnt / "tree" / "another-link"))
    refused(lambda: os.chmod(f1, 0o777))
    refused(lambda: os.chown(f1, 1, 1))
    refused(lambda: os.utime(f1, ns=(0, 0)))
    refused(lambda: os.truncate(f1, 0))
    refused(lambda: os.setxattr(f1, "user.x", b"1"))
    refused(lambda: os.removexattr(mnt / "images" / "vm0.img", "user.vm"))
    refused(lambda: os.mkfifo(mnt / "fifo2"))
    same(ref, mnt)

    proc.send_signal(signal.SIGTERM)
    stopped_cleanly(proc, mnt)


def test_mount_mark_refuses_what_it_cannot_do_and_mounts_nothing(
        workdir: Path, clusters: list[LocalCluster], mounts: list) -> None:
    c = LocalCluster(workdir / "c", replica_args=["--retain", "1h"])
    clusters.append(c)
    c.start()
    (c.mount("h1") / "a.txt").write_text("a")
    settled(c)
    newest = marks(c)[-1]["gseq"]
    mnt = workdir / "mnt"
    mnt.mkdir()

    def fails(*args: str, code: int, says: str, mounted: str | None = None) -> None:
        r = cli(c, "mount-mark", *args, check=False)
        assert r.returncode == code, (r.returncode, r.stderr)
        assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert mounted_here(str(mnt)) == mounted  # nothing (more) mounted

    fails("--mark", str(newest + 1000), str(mnt), code=1, says="window")
    fails("--name", "nope", str(mnt), code=1, says="pinned")
    fails("--time", "yesterday", str(mnt), code=1, says="ISO 8601")
    fails("--latest", str(workdir / "missing"), code=2, says="does not exist")
    (workdir / "file").write_text("")
    fails("--latest", str(workdir / "file"), code=2, says="not a directory")
    (mnt / "keep").write_text("mine")
    fails("--latest", str(mnt), code=2, says="not empty")
    assert [p.name for p in mnt.iterdir()] == ["keep"]
    (mnt / "keep").unlink()
    r = subprocess.run([sys.executable, "-m", "clusterrep", "mount-mark", "--latest", "--replica",
                        f"127.0.0.1:{free_port()}", "--token-file", str(c.token_file), str(mnt)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "clusterrep: error:" in r.stderr and "Traceback" not in r.stderr
    assert mounted_here(str(mnt)) is None

    # the newest mark, unmounted from outside: it exits 0 as well
    proc = mount_mark(c, mounts, mnt, "--latest")
    assert f"mounted g{newest}" in mnt.with_suffix(".out").read_text()
    assert (mnt / "a.txt").read_text() == "a"
    fails("--latest", str(mnt), code=2, says="already a mount point", mounted=f"clusterrep-g{newest}")
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    stopped_cleanly(proc, mnt)

    # Ctrl-C, while a program has a file open in it
    proc = mount_mark(c, mounts, mnt, "--mark", str(newest))
    fd = os.open(mnt / "a.txt", os.O_RDONLY)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(OSError):  # (its server is gone: the close may say so)
            os.close(fd)
    stopped_cleanly(proc, mnt)
