"""Review findings (real processes, real FUSE): each test first demonstrated a bug; all fixed."""

from __future__ import annotations

import os
import time

from clusterrep.localcluster import LocalCluster


def test_replica_restart_after_a_journal_trim_resumes_the_merge(identical, cluster: LocalCluster) -> None:
    m1 = cluster.mount("h1")
    (cluster.mount("h2") / "from-h2").write_text("h2 was here")
    assert cluster.stop_process("h2") == 0  # h2 leaves: its stream ends with its Leave copy
    # more than one 64 MiB journal segment after it, so the replica's checkpoint trims it away
    chunk = os.urandom(1 << 20)
    with open(m1 / "big.img", "wb") as f:
        for _ in range(72):
            f.write(chunk)
    identical(cluster)
    cluster.stop_process("replica")  # clean stop: checkpoint + trim
    cluster.start_replica()
    cluster.start_node("h2")  # h2 rejoins; its next seq follows the trimmed Leave copy
    (cluster.mount("h2") / "after").write_text("after the restart")
    identical(cluster, timeout=30)


def test_a_gseq_push_before_the_join_reply_does_not_stop_the_replica(
        identical, make_cluster, tmp_path) -> None:
    from clusterrep.node.agent import NodeAgent

    cluster = make_cluster(("h1",))
    (cluster.mount("h1") / "a").write_text("gseq > 0")
    agent = NodeAgent("h3", cluster.coordinator_addr, cluster.replica_addr, tmp_path / "h3",
                      cluster.token)
    real_call = agent.client.call

    def slow_join(op: str, **fields):  # a coordinator busy with fsyncs answers the join late
        if op == "join":
            time.sleep(0.5)
        return real_call(op, **fields)

    agent.client.call = slow_join  # type: ignore[method-assign]
    agent.start()
    try:
        (cluster.mount("h1") / "b").write_text("more")
        time.sleep(1.0)
        assert cluster.status()["error"] is None
    finally:
        agent.stop()
    identical(cluster, timeout=20)


def _two_hosts_write_one_file_at_once(cluster: LocalCluster, name: str, writes: int = 300) -> None:
    import random
    import threading

    fd1 = os.open(cluster.mount("h1") / name, os.O_RDWR | os.O_CREAT, 0o600)
    fd2 = os.open(cluster.mount("h2") / name, os.O_RDWR)

    def writer(fd: int, k: int) -> None:
        rng = random.Random(k)
        for i in range(writes):
            os.pwrite(fd, bytes([k]) * 4096 + i.to_bytes(4, "big"), rng.randrange(4) * 4096)

    threads = [threading.Thread(target=writer, args=(fd, k))
               for k, fd in ((1, fd1), (2, fd2), (3, fd1), (4, fd2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(fd1)
    os.close(fd2)


def test_two_hosts_writing_one_file_concurrently(identical, cluster: LocalCluster) -> None:
    for r in range(40):  # each round hits the race with some probability
        _two_hosts_write_one_file_at_once(cluster, f"vm{r}.img")
    identical(cluster, timeout=60)


def test_ftruncate_of_an_open_file_another_host_renamed(identical, cluster: LocalCluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "f").write_bytes(b"x" * 10000)
    fd = os.open(m1 / "f", os.O_RDWR)
    try:
        os.rename(m2 / "f", m2 / "g")
        (m2 / "f").write_bytes(b"another file")
        os.ftruncate(fd, 100)
    finally:
        os.close(fd)
    assert (cluster.volume / "f").read_bytes() == b"another file"  # resized instead of g
    assert os.path.getsize(cluster.volume / "g") == 100
    identical(cluster)


def test_touch_sets_the_current_time(identical, cluster: LocalCluster) -> None:
    p = cluster.mount("h1") / "t"
    p.write_text("x")
    os.utime(p, ns=(10**18, 10**18))
    os.utime(p)  # utimensat(NULL): both times UTIME_NOW
    assert abs(os.stat(cluster.volume / "t").st_mtime - time.time()) < 600
    identical(cluster)


def test_touch_m_leaves_atime_alone(identical, cluster: LocalCluster) -> None:
    import subprocess

    p = cluster.mount("h1") / "t"
    p.write_text("x")
    os.utime(p, ns=(5 * 10**17, 5 * 10**17))
    subprocess.run(["touch", "-m", "-d", "@1000000000", str(p)], check=True)  # atime: UTIME_OMIT
    st = os.stat(cluster.volume / "t")
    assert st.st_mtime_ns == 10**18
    assert st.st_atime_ns == 5 * 10**17
    identical(cluster)


def test_rename_exchange_is_refused_or_exchanges(identical, cluster: LocalCluster) -> None:
    import ctypes

    m = cluster.mount("h1")
    (m / "c").write_text("c")
    (m / "d").write_text("d")
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    r = libc.renameat2(at_fdcwd, str(m / "c").encode(), at_fdcwd, str(m / "d").encode(),
                       rename_exchange)
    v = cluster.volume
    assert sorted(os.listdir(v)) == ["c", "d"], f"renameat2 returned {r}"
    if r != 0:  # refused (EINVAL/ENOSYS): nothing changed
        assert (v / "c").read_text() == "c" and (v / "d").read_text() == "d"
    else:
        assert (v / "c").read_text() == "d" and (v / "d").read_text() == "c"
    identical(cluster)


# -- probes that pass today (regression tests) ----------------------------------------------------

def test_writes_to_a_file_another_host_unlinked_or_replaced(identical, cluster: LocalCluster) -> None:
    """h1 keeps writing files h2 deleted or renamed another file over: orphans, never the new names."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    a = os.open(m1 / "a", os.O_RDWR | os.O_CREAT, 0o644)
    b = os.open(m1 / "b", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(a, b"a" * 5000, 0)
    os.pwrite(b, b"b" * 5000, 0)
    (m2 / "a").unlink()
    (m2 / "new").write_bytes(b"n" * 100)
    (m2 / "new").rename(m2 / "b")  # b's old file is gone
    os.pwrite(a, b"A" * 5000, 100)
    os.pwrite(b, b"B" * 5000, 10)
    (m2 / "a").write_bytes(b"fresh a")  # a new file under the old name
    os.pwrite(a, b"Z" * 50, 0)  # still the orphan
    os.close(a)
    os.close(b)
    assert (m1 / "a").read_bytes() == b"fresh a" and (m1 / "b").read_bytes() == b"n" * 100
    identical(cluster)


def test_o_trunc_open_and_directory_rename_while_another_host_writes(identical, cluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "d" / "e").mkdir(parents=True)
    fd = os.open(m1 / "d" / "e" / "img", os.O_RDWR | os.O_CREAT, 0o644)
    for i in range(50):
        os.pwrite(fd, bytes([i]) * 4096, i * 4096)
    with open(m2 / "d" / "e" / "img", "r+b") as f:  # O_TRUNC open on the other host
        pass
    with open(m2 / "d" / "e" / "img", "wb") as f:
        f.write(b"h2" * 1000)
    os.pwrite(fd, b"h1 again" * 100, 3000)
    (m2 / "d").rename(m2 / "D")  # the directory moves under the open file
    os.pwrite(fd, b"h1 after the move" * 100, 100)
    os.close(fd)
    identical(cluster)


def test_ftruncate_after_another_host_renamed_the_directory(identical, cluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "d").mkdir()
    fd = os.open(m1 / "d" / "img", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 10000, 0)
        (m2 / "d").rename(m2 / "D")
        os.ftruncate(fd, 5000)
    finally:
        os.close(fd)
    assert os.path.getsize(cluster.volume / "D" / "img") == 5000
    identical(cluster)


def test_mmap_writes_through_a_mount(identical, cluster: LocalCluster) -> None:
    import mmap

    p = cluster.mount("h1") / "mapped"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 1 << 20)
        for i in range(0, 1 << 20, 65536):
            mm[i:i + 100] = bytes([i // 65536 + 1]) * 100
        mm.flush()
        mm.close()
    identical(cluster)


def _kill_h2_mid_write(cluster: LocalCluster) -> None:
    import signal

    with open(cluster.mount("h2") / "img", "wb") as f:
        for i in range(64):
            f.write(bytes([i]) * 65536)
    assert cluster.stop_process("h2", signal.SIGKILL) == -signal.SIGKILL
    (cluster.mount("h1") / "img").open("r+b").write(b"h1 took over")


def test_a_node_killed_mid_write_and_restarted_loses_nothing(identical, cluster) -> None:
    """SIGKILL: no Leave, the node stays a member; its spool is shipped when it runs again."""
    import subprocess

    _kill_h2_mid_write(cluster)
    subprocess.run(["fusermount3", "-u", "-z", str(cluster.mount("h2"))], check=False)
    cluster.start_node("h2")
    (cluster.mount("h2") / "img").open("ab").write(b"h2 is back")
    identical(cluster)


def test_a_crashed_node_restarts_on_its_dead_mount_point(identical, cluster) -> None:
    import subprocess

    _kill_h2_mid_write(cluster)
    try:
        cluster.start_node("h2")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(cluster.mount("h2"))], check=False)
    identical(cluster)
