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
