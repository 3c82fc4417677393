"""Consistency across hosts, and many programs blocked on one lock.

A read, stat or lock on one host that starts after a write returned on another sees that write;
32 processes waiting for a lock held on another host neither hang the mount nor lose their turn.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from clusterrep.localcluster import LocalCluster


def test_a_read_on_one_host_sees_a_write_that_returned_on_the_other(identical, cluster) -> None:
    """Same-size rewrites in place, read through a descriptor held open on the other host (its
    page cache must not answer with the old bytes), and the size seen by stat at once."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "shared").write_bytes(b"0" * 8192)
    writer = os.open(m1 / "shared", os.O_WRONLY)
    reader = os.open(m2 / "shared", os.O_RDONLY)
    try:
        assert os.pread(reader, 8192, 0) == b"0" * 8192  # now cached on h2
        stale = []
        for i in range(200):
            data = f"{i:08d}".encode() * 1024
            os.pwrite(writer, data, 0)
            got = os.pread(reader, 8192, 0)
            if got != data:
                stale.append(i)
        assert not stale, f"h2 read stale data after {len(stale)} of 200 writes on h1: {stale[:10]}"
        os.pwrite(writer, b"tail", 8192)
        assert os.stat(m2 / "shared").st_size == 8196
    finally:
        os.close(writer)
        os.close(reader)
    identical(cluster)


WAITER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_APPEND)
fcntl.lockf(fd, fcntl.LOCK_EX)  # F_SETLKW: waits while another host holds it
os.write(fd, b"x")
fcntl.lockf(fd, fcntl.LOCK_UN)
"""


def test_32_programs_blocked_on_a_lock_do_not_hang_the_mount(identical, cluster: LocalCluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "db").write_bytes(b"")
    holder = os.open(m1 / "db", os.O_RDWR)
    fcntl.lockf(holder, fcntl.LOCK_EX)
    waiters = [subprocess.Popen([sys.executable, "-c", WAITER, str(m2 / "db")]) for _ in range(32)]
    try:
        time.sleep(2.0)  # all 32 are blocked in the file system on h2 now
        assert all(w.poll() is None for w in waiters), "a waiter got the lock h1 holds"
        started = time.monotonic()
        (m2 / "other").write_text("the mount still answers")  # create, write, close on h2
        assert os.stat(m2 / "other").st_size == 23
        assert time.monotonic() - started < 5, "h2's mount hangs behind the blocked programs"
    finally:
        fcntl.lockf(holder, fcntl.LOCK_UN)
        os.close(holder)
    for w in waiters:
        assert w.wait(60) == 0, "a waiter failed or never got the lock"
    assert (m1 / "db").read_bytes() == b"x" * 32  # each got it once, one after the other
    identical(cluster)


HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def _hold(path: object) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


def _flock_now(path: object, wait: float = 0) -> int:
    args = ["flock", "-w", str(wait)] if wait else ["flock", "-n"]
    return subprocess.run([*args, str(path), "true"], timeout=wait + 60).returncode


def test_a_lock_survives_a_coordinator_restart(identical, make_cluster) -> None:
    """The holder reclaims it: during the restart and after it, the other host is refused."""
    import signal

    cluster = make_cluster(("h1", "h2"))
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "lock").write_bytes(b"")
    holder = _hold(m1 / "lock")
    try:
        cluster.stop_process("coordinator", signal.SIGKILL)
        cluster.start_coordinator()
        assert _flock_now(m2 / "lock") == 1, "h2 got the lock h1 holds after a coordinator restart"
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(30)
    assert _flock_now(m2 / "lock", wait=20) == 0, "h2 never got the lock h1 released"
    identical(cluster)


def test_the_locks_of_a_dead_node_are_freed_after_its_lease(identical, make_cluster) -> None:
    import signal

    cluster = make_cluster(("h1", "h2"), coordinator_args=["--lease", "2"])
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "lock").write_bytes(b"")
    holder = _hold(m1 / "lock")
    try:
        cluster.stop_process("h1", signal.SIGKILL)  # the node dies with the lock held
        started = time.monotonic()
        assert _flock_now(m2 / "lock", wait=30) == 0, "h2 never got the dead node's lock"
        assert time.monotonic() - started < 15
    finally:
        holder.kill()
        holder.wait(30)
    cluster.start_node("h1")
    identical(cluster)


def test_300_programs_blocked_on_a_flock_do_not_freeze_the_mount(identical, cluster) -> None:
    """Found by review: with 256 or more programs waiting (each held a FUSE worker) the mount
    froze, and the holder's own unlock could no longer be served."""
    m1 = cluster.mount("h1")
    (m1 / "lk").write_bytes(b"")
    holder = os.open(m1 / "lk", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    waiters = [subprocess.Popen(["flock", "-x", str(m1 / "lk"), "true"]) for _ in range(300)]
    try:
        time.sleep(3.0)
        assert all(w.poll() is None for w in waiters), "a waiter got the lock while it was held"
        done = subprocess.run(["stat", str(m1 / "lk")], capture_output=True, timeout=20)
        assert done.returncode == 0, "the mount does not answer while programs wait"
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    for w in waiters:
        assert w.wait(120) == 0
    identical(cluster)


def test_a_path_the_kernel_cannot_spell_is_refused_never_left_unrecorded(identical, cluster) -> None:
    """Found by review: below a directory whose full path on the volume is longer than
    PATH_MAX, files were taken for files without a name: writes, truncates and chmods reached
    the volume and were never recorded, so the replica silently differed."""
    import errno

    dfd = os.open(cluster.mount("h1"), os.O_RDONLY)
    refused = []
    try:
        for _ in range(20):  # 4,020 bytes of directories: under the 4,096 events carry ...
            os.mkdir("d" * 200, dir_fd=dfd)
            nxt = os.open("d" * 200, os.O_RDONLY, dir_fd=dfd)
            os.close(dfd)
            dfd = nxt
        name = "f" * 59  # ... and with the volume's own path, over PATH_MAX for the node
        steps = [lambda: os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd),
                 lambda: os.open(name, os.O_WRONLY, dir_fd=dfd)]
        for i, step in enumerate(steps):
            try:
                fd = step()
                os.write(fd, b"first" if i == 0 else b"SECOND")
                os.close(fd)
            except OSError as exc:
                assert exc.errno == errno.ENAMETOOLONG, exc
                refused.append(i)
        try:
            os.chmod(name, 0o600, dir_fd=dfd)
        except OSError as exc:
            assert exc.errno == errno.ENAMETOOLONG, exc
            refused.append("chmod")
    finally:
        os.close(dfd)
    identical(cluster)  # everything that succeeded is on the replica
    assert refused, "nothing was refused: was the volume's path short enough for PATH_MAX?"


QUEUED = r"""
import fcntl, os, sys
for _ in range(5):
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    os.close(fd)  # the close drops the lock
"""


def test_waiters_queued_on_one_host_all_get_the_lock_and_it_ends_free(identical, cluster) -> None:
    """Found by review: when a waiter's grant overtook the previous holder's release on the same
    host, the node's copy never showed the new holder, its close sent no unlock, and the lock
    stayed taken for good (waiters hung, the other host got EAGAIN for ever)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "db.lock").write_bytes(b"")
    holder = os.open(m1 / "db.lock", os.O_RDWR)
    fcntl.lockf(holder, fcntl.LOCK_EX)
    waiters = [subprocess.Popen([sys.executable, "-c", QUEUED, str(m1 / "db.lock")])
               for _ in range(20)]
    time.sleep(1.0)
    os.close(holder)
    for w in waiters:
        assert w.wait(60) == 0, "a waiter never got the lock"
    fd = os.open(m2 / "db.lock", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nobody holds it any more
    finally:
        os.close(fd)
    identical(cluster)


def test_names_and_link_targets_that_are_not_utf8_work_on_the_mount(identical, cluster) -> None:
    """Found by review: mkdir and symlink with such names failed with EIO (the request to the
    coordinator could not be encoded)."""
    m1 = os.fsencode(cluster.mount("h1"))
    os.mkdir(m1 + b"/caf\xe9")
    os.symlink(b"\xff/target", m1 + b"/caf\xe9/l\xfe")
    with open(m1 + b"/caf\xe9/f\xfd", "wb") as f:
        f.write(b"latin-1 name")
    os.rename(m1 + b"/caf\xe9/f\xfd", m1 + b"/caf\xe9/g\xfc")
    assert os.readlink(m1 + b"/caf\xe9/l\xfe") == b"\xff/target"
    identical(cluster)
