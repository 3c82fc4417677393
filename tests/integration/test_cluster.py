"""Real processes, real FUSE mounts, real TCP: every test ends with wait + verify identical."""

from __future__ import annotations

import email
import os
import random
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from clusterrep.localcluster import LocalCluster


def test_plain_os_calls_through_both_mounts(identical, cluster: LocalCluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "a" / "b").mkdir(parents=True)
    (m1 / "a" / "b" / "f.txt").write_text("one\n")
    (m2 / "a" / "b" / "f.txt").open("a").write("two\n")  # append through the other host
    assert (m1 / "a" / "b" / "f.txt").read_text() == "one\ntwo\n"  # close-to-open across hosts
    (m2 / "a" / "c.bin").write_bytes(os.urandom(100_000))
    os.truncate(m1 / "a" / "c.bin", 5000)
    (m1 / "a" / "c.bin").chmod(0o600)
    (m2 / "a" / "b" / "f.txt").rename(m2 / "a" / "g.txt")
    os.symlink("../a/g.txt", m1 / "a" / "b" / "link")
    os.utime(m2 / "a" / "g.txt", ns=(10**18, 10**18))
    (m1 / "gone").write_text("x")
    (m2 / "gone").unlink()
    (m1 / "empty").mkdir()
    (m2 / "empty").rmdir()
    assert sorted(os.listdir(m2 / "a")) == ["b", "c.bin", "g.txt"]
    identical(cluster)


def test_concurrent_writers_on_one_file_are_recorded_in_volume_order(identical, cluster) -> None:
    """Several threads write overlapping ranges of one file: the replica ends equal."""
    path = cluster.mount("h1") / "shared.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 1 << 20)

    def writer(k: int) -> None:
        rng = random.Random(k)
        for _ in range(300):
            off = rng.randrange(0, (1 << 20) - 65536)
            os.pwrite(fd, bytes([k]) * rng.randrange(1, 65536), off)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(fd)
    identical(cluster)


def test_overlapping_writers_on_two_hosts_hand_over_by_token(identical, cluster: LocalCluster) -> None:
    """h1 and h2 both have the image open and alternate writing overlapping blocks."""
    fd1 = os.open(cluster.mount("h1") / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
    fd2 = os.open(cluster.mount("h2") / "vm.img", os.O_RDWR)
    rng = random.Random(3)
    for i in range(200):
        fd = fd1 if (i // 7) % 2 == 0 else fd2
        os.pwrite(fd, rng.randbytes(8192), rng.randrange(64) * 4096)
    os.close(fd1)
    os.close(fd2)
    identical(cluster)


FIO = ["fio", "--ioengine=psync", "--bs=4k", "--size=16m", "--verify=crc32c",
       "--verify_fatal=1", "--do_verify=1", "--randrepeat=0", "--verify_state_save=0"]


def _fio(name: str, filename: Path, rw: str, seed: int) -> None:
    args = [*FIO, f"--name={name}", f"--filename={filename}", f"--rw={rw}", f"--randseed={seed}"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_fio_verify_then_migration_with_target_opening_first(identical, cluster: LocalCluster) -> None:
    assert shutil.which("fio"), "fio is required (apt-get install fio)"
    img1 = cluster.mount("h1") / "vm.img"
    img2 = cluster.mount("h2") / "vm.img"
    _fio("before", img1, "randwrite", 1)
    held = os.open(img1, os.O_RDWR)  # the VM still runs on h1 ...
    opened = os.open(img2, os.O_RDWR)  # ... when h2 opens the image (live migration starts)
    os.pwrite(held, b"\xab" * 4096, 0)  # h1's last write before the switch
    os.close(held)  # h1 closes after h2 opened
    _fio("after", img2, "randwrite", 2)
    os.close(opened)
    identical(cluster)


def test_sqlite_transactions_through_a_mount(identical, cluster: LocalCluster) -> None:
    assert shutil.which("sqlite3"), "sqlite3 is required (apt-get install sqlite3)"
    db = cluster.mount("h1") / "app.db"
    script = ["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"]
    for i in range(50):
        script.append("BEGIN;")
        script += [f"INSERT INTO t (v) VALUES ('row {i}-{j} {'x' * (i * 7 % 300)}');" for j in range(20)]
        script.append(f"DELETE FROM t WHERE id % 7 = {i % 7};")
        script.append("COMMIT;")
    script.append("VACUUM;")
    result = subprocess.run(["sqlite3", str(db)], input="\n".join(script), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    count = subprocess.run(["sqlite3", str(cluster.mount("h2") / "app.db"),
                            "SELECT count(*) FROM t;"], capture_output=True, text=True)
    assert count.returncode == 0 and int(count.stdout) > 0
    identical(cluster)


def test_tar_extract_then_renames_and_deletes(identical, cluster: LocalCluster, tmp_path: Path) -> None:
    source = Path(email.__file__).parent  # the standard library's email package: a real tree
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname="email")
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    result = subprocess.run(["tar", "-xf", str(archive), "-C", str(m1)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    (m2 / "email").rename(m2 / "mail")
    shutil.rmtree(m1 / "mail" / "mime")
    for p in sorted((m2 / "mail").glob("*.py"))[:10]:
        p.rename(p.with_suffix(".txt"))
    identical(cluster)


def test_skewed_clocks_with_faketime(identical, make_cluster) -> None:
    assert shutil.which("faketime"), "faketime is required (apt-get install faketime)"
    cluster = make_cluster(("h1", "h2"), clock_offsets={"h1": "+5h", "h2": "-3h"})
    rng = random.Random(5)
    fd = os.open(cluster.mount("h1") / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
    for _ in range(300):
        os.pwrite(fd, rng.randbytes(4096), rng.randrange(256) * 4096)
    os.close(fd)
    fd = os.open(cluster.mount("h2") / "vm.img", os.O_RDWR)
    for _ in range(300):
        os.pwrite(fd, rng.randbytes(4096), rng.randrange(256) * 4096)
    os.close(fd)
    identical(cluster)
    for node in ("h1", "h2"):  # a skewed node stops cleanly too (time.sleep failed under faketime)
        cluster.stop_process(node)  # (its exit status is faketime's: killed by the SIGTERM)
        text = (cluster.logs / f"{node}.log").read_text()
        assert "Traceback" not in text and "unmounted; flushing" in text, text[-2000:]
    cluster.stop()
    # the premise: the nodes' clocks really were skewed (their events carry those clocks)
    from clusterrep.events import decode
    from clusterrep.journal import Journal

    now = time.time_ns()
    for node, hours in (("h1", 5), ("h2", -3)):
        with Journal(cluster.workdir / f"state-{node}" / "spool") as spool:
            walls = [decode(raw).wall for _, raw in spool.read(spool.first_index)]
        skew = (sum(walls) / len(walls) - now) / 3600e9
        assert abs(skew - hours) < 0.5, (node, skew)


@pytest.mark.parametrize("node", ["h1", "h2"])
def test_mount_survives_a_bad_request(identical, cluster: LocalCluster, node: str) -> None:
    """Errors come back as errno; the mount stays up."""
    m = cluster.mount(node)
    with pytest.raises(FileNotFoundError):
        (m / "missing" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        os.mkdir(m)
        os.mkdir(m / "d")
        os.mkdir(m / "d")
    with pytest.raises(OSError):
        os.link(m / "d", m / "hard")
    (m / "ok").write_text("still works")
    identical(cluster)


def test_a_node_leaves_cleanly_and_rejoins(identical, cluster: LocalCluster) -> None:
    """A stopped node leaves the cluster, so the replica does not wait for it; it can come back."""
    m1 = cluster.mount("h1")
    (cluster.mount("h2") / "from-h2").write_text("before the stop")
    assert cluster.stop_process("h2") == 0
    assert not os.path.ismount(cluster.mount("h2"))
    (m1 / "d").mkdir()
    (m1 / "d" / "f").write_text("while h2 is away")
    st = identical(cluster)
    assert st["members"] == ["h1"]
    cluster.start_node("h2")
    (cluster.mount("h2") / "d" / "f").write_text("h2 is back")
    (cluster.mount("h2") / "from-h2").unlink()
    st = identical(cluster)
    assert st["members"] == ["h1", "h2"]


def test_fio_with_o_direct_and_append_through_a_mount(identical, cluster: LocalCluster) -> None:
    """O_DIRECT opens work (the backing file is not opened O_DIRECT), and O_APPEND writes from
    two hosts are recorded at the offsets where the data really landed."""
    assert shutil.which("fio"), "fio is required (apt-get install fio)"
    args = [*FIO, "--name=direct", f"--filename={cluster.mount('h1') / 'direct.img'}",
            "--rw=randwrite", "--direct=1", "--size=4m"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for i in range(5):
        for node in ("h1", "h2"):
            with open(cluster.mount(node) / "log.txt", "a") as fh:
                fh.write(f"{node} line {i}\n")
    identical(cluster)


def test_a_node_clock_jumping_back_and_forth_while_running(identical, make_cluster, tmp_path) -> None:
    """h1's clock jumps by hours, forwards and backwards, while it writes; nothing changes."""
    clock = tmp_path / "h1-clock"
    clock.write_text("+0\n")
    cluster = make_cluster(("h1", "h2"), clock_offsets={"h1": f"file:{clock}"})
    rng = random.Random(9)
    fd = os.open(cluster.mount("h1") / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
    for offset in ("+5h", "-7h", "+0", "+12h", "-1h"):
        clock.write_text(offset + "\n")
        for _ in range(60):
            os.pwrite(fd, rng.randbytes(4096), rng.randrange(128) * 4096)
        (cluster.mount("h1") / f"at{offset}").write_text(offset)
        (cluster.mount("h2") / f"at{offset}").rename(cluster.mount("h2") / f"moved{offset}")
    os.close(fd)
    fd = os.open(cluster.mount("h2") / "vm.img", os.O_RDWR)
    for _ in range(100):
        os.pwrite(fd, rng.randbytes(4096), rng.randrange(128) * 4096)
    os.close(fd)
    identical(cluster)
    cluster.stop()
    from clusterrep.events import decode
    from clusterrep.journal import Journal

    with Journal(cluster.workdir / "state-h1" / "spool") as spool:
        walls = [decode(raw).wall for _, raw in spool.read(spool.first_index)]
    span = (max(walls) - min(walls)) / 3600e9
    assert span > 15, f"the clock did not jump (span {span:.1f} h)"  # the premise held
