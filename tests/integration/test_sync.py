"""Taking over a volume that already holds data: synchronisation with real processes (issue 10).

Each test ends with the replica identical to the volume (`compare_trees`: bytes, names, owners,
modes, times, xattrs, links), and, where it matters, rsync as referee. Inputs:

* a coordinator started on a populated volume, into an empty replica (no flag needed);
* a replica that lost its state, on a stale copy of the volume (``--adopt-target``): only what
  differs moves;
* a replica that lost its state and its target while both hosts keep writing (renames,
  deletes, truncates, random writes to an image the sync is copying);
* a target replaced under a replica that kept its state;
* ``wait`` is not caught up while a sync runs (``--sync-rate`` makes it last).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from clusterrep.localcluster import LocalCluster
from clusterrep.timing import pause

MIB = 1 << 20
USER = 4242


def populate(vol: Path, *, images: int = 2, image_mib: int = 8, seed: int = 1) -> None:
    """A real tree: images of random data, a sparse file, small files, symlinks, hard links,
    empty directories, names that are not UTF-8, owners, modes, xattrs, a FIFO, old times."""
    rnd = random.Random(seed)
    (vol / "images").mkdir()
    for i in range(images):
        (vol / "images" / f"vm{i}.img").write_bytes(rnd.randbytes(image_mib * MIB))
    with open(vol / "images" / "sparse.img", "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, 2 MiB of it data
        f.seek(300 << 30)
        f.write(rnd.randbytes(MIB))
        f.seek((1 << 40) - MIB)
        f.write(rnd.randbytes(MIB))
    for d in range(3):
        sub = vol / "tree" / f"d{d}" / "deeper"
        sub.mkdir(parents=True)
        for i in range(15):
            (sub.parent / f"f{i}.txt").write_bytes(rnd.randbytes(rnd.randint(0, 40_000)))
    (vol / "empty" / "dirs" / "only").mkdir(parents=True)
    raw = os.fsencode(str(vol)) + b"/caf\xe9-\xff"
    os.mkdir(raw)
    with open(raw + b"/n\xe4me", "wb") as f:
        f.write(b"latin-1 name")
    os.symlink("images/vm0.img", vol / "current.img")
    os.symlink("/nowhere/at/all", vol / "dangling")
    os.link(vol / "tree" / "d0" / "f1.txt", vol / "tree" / "hardlink.txt")
    os.chown(vol / "tree" / "d1", USER, USER)
    os.chmod(vol / "tree" / "d2" / "f3.txt", 0o600)
    os.setxattr(vol / "images" / "vm0.img", "user.vm", b"uuid-1234")
    os.mkfifo(vol / "fifo")
    os.utime(vol / "tree" / "d0" / "f0.txt", ns=(1, 86_400 * 10**9))


def rsync_differences(vol: Path, target: Path) -> str:
    r = subprocess.run(["rsync", "-aHAXn", "--numeric-ids", "--delete", "--itemize-changes",
                        f"{vol}/", f"{target}/"], capture_output=True, text=True, check=True)
    return r.stdout


def settled(c: LocalCluster, timeout: float = 180) -> dict:
    ok, why, status = c.wait(timeout)
    assert ok, why
    diffs = c.verify()
    assert not diffs, "\n".join(map(str, diffs[:20]))
    return status


def test_a_coordinator_started_on_a_populated_volume_fills_an_empty_replica(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c")
    clusters.append(c)
    populate(c.volume)
    c.start()
    (c.mount("h1") / "tree" / "after-the-sync").write_text("written through a mount")
    st = settled(c)
    assert rsync_differences(c.volume, c.target) == ""
    assert st["last_sync"]["phase"] == "done"
    sparse = os.stat(c.target / "images" / "sparse.img")
    assert sparse.st_size == 1 << 40 and sparse.st_blocks * 512 < 64 * MIB  # holes stayed holes


def test_a_replica_that_lost_its_state_on_a_stale_copy_gets_only_what_differs(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", replica_args=["--adopt-target"])
    clusters.append(c)
    populate(c.volume, images=4)
    c.start()
    settled(c)
    c.stop()
    shutil.rmtree(c.replica_state)  # the replica's state is lost; its target is an old copy
    vol = c.volume
    with open(vol / "images" / "vm2.img", "r+b") as f:  # changed in place: two small runs
        f.seek(3 * MIB + 100)
        f.write(b"changed")
        f.seek(7 * MIB)
        f.write(b"\x00" * 4096)
    os.rename(vol / "tree" / "d1" / "f2.txt", vol / "tree" / "renamed.txt")
    os.unlink(vol / "tree" / "d2" / "f4.txt")
    shutil.rmtree(vol / "empty")
    (vol / "tree" / "new.txt").write_bytes(os.urandom(10_000))
    os.truncate(vol / "images" / "vm3.img", 5 * MIB)
    (c.target / "tree" / "only-in-the-replica").write_text("left over")
    c.start()
    st = settled(c)
    assert rsync_differences(c.volume, c.target) == ""
    moved = st["last_sync"]["bytes"]
    assert moved < 2 * MIB, f"{moved} bytes moved for a few small changes"
    assert not (c.target / "tree" / "only-in-the-replica").exists()
    log = (c.logs / "replica.log").read_text()
    assert "only-in-the-replica" in log  # every file the sync deletes is logged


class Writers:
    """Two hosts writing at once: an image written at random places (while it is synchronised),
    appends, creates, renames, truncates and deletes."""

    def __init__(self, c: LocalCluster) -> None:
        self.c = c
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guard, args=(f,)) for f in
                        (self._image, self._churn)]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors

    def _guard(self, f) -> None:  # type: ignore[no-untyped-def]
        try:
            f()
        except BaseException as exc:
            self.errors.append(exc)

    def _image(self) -> None:  # (its first 4 MiB only: tests plant differences past them)
        rnd = random.Random(5)
        fd = os.open(self.c.mount("h1") / "images" / "vm0.img", os.O_RDWR)
        try:
            while not self.stop.is_set():
                os.pwrite(fd, rnd.randbytes(4096), rnd.randrange(0, 4 * MIB // 4096) * 4096)
                if rnd.random() < 0.05:
                    os.fsync(fd)
        finally:
            os.close(fd)

    def _churn(self) -> None:
        rnd = random.Random(6)
        m1, m2 = self.c.mount("h1"), self.c.mount("h2")
        (m2 / "churn").mkdir(exist_ok=True)
        n = 0
        while not self.stop.is_set():
            n += 1
            m = m1 if n % 2 else m2
            name = m / "churn" / f"f{n % 20}"
            with contextlib.suppress(FileNotFoundError):  # (a name the other mount renamed a
                self._step(rnd, m, name)  # moment ago, seen through a kernel cache; no vm1.img)
            pause(0.002)

    @staticmethod
    def _step(rnd: random.Random, m: Path, name: Path) -> None:
        op = rnd.random()
        if op < 0.4:
            with open(name, "ab") as f:
                f.write(rnd.randbytes(rnd.randint(1, 20_000)))
        elif op < 0.55 and name.exists():
            os.rename(name, m / "churn" / f"f{rnd.randrange(20)}")
        elif op < 0.7 and name.exists():
            os.truncate(name, rnd.randint(0, 5000))
        elif op < 0.8 and name.exists():
            os.unlink(name)
        else:
            with open(m / "images" / "vm1.img", "r+b") as f:  # the other host's image, past
                f.seek(8 * MIB + rnd.randrange(0, MIB))  # what fio writes and verifies
                f.write(rnd.randbytes(100))


def test_a_replica_that_lost_state_and_target_is_resynchronised_while_hosts_write(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    # (small spools: their journals drop what the replica had, as long-running ones do, so the
    # new replica cannot replay history and needs a synchronisation)
    c = LocalCluster(workdir / "c", node_args=["--spool-limit", "4M"])
    clusters.append(c)
    populate(c.volume)
    c.start()
    settled(c)
    assert shutil.which("fio"), "fio is required (apt-get install fio)"
    fio = subprocess.Popen(  # and fio, verifying what it wrote, on h2, into an image being copied
        ["fio", "--name=vm", f"--filename={c.mount('h2') / 'images' / 'vm1.img'}", "--ioengine=psync",
         "--rw=randwrite", "--bs=4k", "--size=8m", "--verify=crc32c", "--verify_fatal=1",
         "--do_verify=1", "--randrepeat=0", "--verify_state_save=0", "--time_based", "--runtime=5",
         "--verify_backlog=64"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with Writers(c):
        time.sleep(1)  # the writers run before the loss
        c.stop_process("replica", signal.SIGKILL)
        shutil.rmtree(c.replica_state)
        shutil.rmtree(c.target)
        time.sleep(0.5)  # and while the replica is gone
        c.start_replica()
        time.sleep(4)  # and during the sync
    out, _ = fio.communicate(timeout=120)
    assert fio.returncode == 0, out[-2000:]
    st = settled(c)
    assert st["last_sync"]["phase"] == "done"
    assert "needs a synchronisation" in (c.logs / "replica.log").read_text()


def test_a_sync_under_back_pressure_from_small_spools_loses_nothing(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    """Nodes with a 1 MiB spool limit keep writing while the replica resynchronises: their
    writes wait for room (back-pressure), nothing is dropped, and nothing deadlocks (the
    replica keeps taking their streams during a sync; the tokens a sync recalls come back)."""
    c = LocalCluster(workdir / "c", node_args=["--spool-limit", "1M", "--on-spool-full", "block"],
                     coordinator_args=["--sync-rate", "32M"])
    clusters.append(c)
    populate(c.volume, images=3)
    c.start()
    settled(c)
    with Writers(c):
        time.sleep(2)  # the spools roll over: what the replica had is dropped from them
        c.stop_process("replica", signal.SIGKILL)
        shutil.rmtree(c.replica_state)
        shutil.rmtree(c.target)
        time.sleep(1)  # the spools fill up: writers wait
        c.start_replica()
        time.sleep(3)
    st = settled(c)
    assert st["last_sync"]["phase"] == "done"
    assert "needs a synchronisation" in (c.logs / "replica.log").read_text()


def test_a_replaced_target_is_resynchronised(workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c")
    clusters.append(c)
    populate(c.volume, images=1)
    c.start()
    (c.mount("h1") / "before").write_text("1")
    settled(c)
    c.stop_process("replica")
    os.rename(c.target, workdir / "old-target")
    c.target.mkdir()
    (c.mount("h2") / "while-gone").write_text("2")
    c.start_replica()
    st = settled(c)
    assert "replaced" in (st["last_sync"] or {}).get("reason", "")


def test_wait_is_not_caught_up_while_a_sync_runs(workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", coordinator_args=["--sync-rate", "4M"])
    clusters.append(c)
    populate(c.volume, images=3)  # 24 MiB at 4 MiB/s: about 6 s
    c.start()
    ok, why, _st = c.wait(1)
    assert not ok and any("synchronisation" in w for w in why), why
    settled(c)


def _sent_after_restart(log: Path) -> int:
    """Bytes the coordinator sent in its last run of a sync (its "done" log line)."""
    lines = [ln for ln in log.read_text().splitlines() if "synchronisation" in ln and " done: " in ln]
    assert lines, "the coordinator never finished the sync"
    return int(lines[-1].split("'bytes_sent': ")[1].split(",")[0])


def _kill_half_way(c: LocalCluster, name: str, full: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sync = c.status().get("sync") or {}
        if sync.get("bytes", 0) >= full * 0.45:
            c.stop_process(name, signal.SIGKILL)
            return
        pause(0.05)
    raise AssertionError("the sync never got half way")


def _one_big_image(vol: Path) -> None:
    """A 160 MiB image: three chunks of a sync (64, 64 and 32 MiB), so resuming inside a file
    is what is measured."""
    (vol / "images").mkdir()
    rnd = random.Random(9)
    with open(vol / "images" / "big.img", "wb") as f:
        for _ in range(160):
            f.write(rnd.randbytes(MIB))
    (vol / "small").write_bytes(rnd.randbytes(1000))


@pytest.mark.parametrize("killed", ["coordinator", "replica"])
def test_a_sync_interrupted_half_way_resumes_where_it_stopped(
        workdir: Path, clusters: list[LocalCluster], killed: str) -> None:
    rate = ["--sync-rate", "48M"]
    full_run = LocalCluster(workdir / "full", nodes=(), coordinator_args=rate)
    clusters.append(full_run)
    _one_big_image(full_run.volume)
    full_run.start()
    full = settled(full_run)["last_sync"]["bytes"]
    full_run.stop()
    c = LocalCluster(workdir / "c", coordinator_args=rate)
    clusters.append(c)
    _one_big_image(c.volume)
    c.start()
    _kill_half_way(c, killed, full)
    if killed == "coordinator":
        c.start_coordinator()
    else:
        c.start_replica()
    settled(c)
    after = _sent_after_restart(c.logs / "coordinator.log")
    assert after <= 0.55 * full, f"{after} bytes sent after the restart, of {full} for a whole sync"


def test_clusterrep_sync_by_hand_puts_a_damaged_target_right(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c")
    clusters.append(c)
    populate(c.volume, images=1)
    c.start()
    (c.mount("h1") / "written").write_bytes(os.urandom(100_000))
    settled(c)
    os.unlink(c.target / "tree" / "d0" / "f3.txt")  # damage done by hand in the target
    os.chmod(c.target / "tree" / "d1" / "f5.txt", 0o777)
    os.truncate(c.target / "images" / "vm0.img", MIB)
    r = subprocess.run(["python3", "-m", "clusterrep", "sync", "--coordinator", c.coordinator_addr,
                        "--token-file", str(c.token_file), "--timeout", "120"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "done" in r.stderr and "Traceback" not in r.stderr
    st = settled(c)
    assert "files compared" in subprocess.run(
        ["python3", "-m", "clusterrep", "status", "--replica", c.replica_addr, "--token-file",
         str(c.token_file)], capture_output=True, text=True, check=True).stdout
    assert st["last_sync"]["reason"].startswith("requested by an operator")


def _verify_online(c: LocalCluster, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["python3", "-m", "clusterrep", "verify", "--online", "--coordinator",
                           c.coordinator_addr, "--token-file", str(c.token_file), *extra],
                          capture_output=True, text=True, timeout=300)


def test_online_verify_trusted_with_writers_running_then_finds_and_repairs_what_was_planted(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c")
    clusters.append(c)
    populate(c.volume, images=2)
    c.start()
    settled(c)
    with Writers(c):
        time.sleep(1)
        r = _verify_online(c)
        assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr  # no phantom
        t = c.target
        st = os.stat(t / "tree" / "d0" / "f1.txt")
        with open(t / "tree" / "d0" / "f1.txt", "r+b") as f:  # a byte changed by hand...
            f.seek(5)
            b = f.read(1)
            f.seek(5)
            f.write(bytes([b[0] ^ 0xFF]))
        os.utime(t / "tree" / "d0" / "f1.txt", ns=(st.st_atime_ns, st.st_mtime_ns))  # ...unseen
        with open(t / "images" / "vm0.img", "r+b") as f:  # inside the image being written
            f.seek(6 * MIB + 12345)
            f.write(b"planted")
        os.unlink(t / "tree" / "d1" / "f2.txt")
        os.chmod(t / "tree" / "d2" / "f3.txt", 0o666)
        r = _verify_online(c)
        assert r.returncode == 1, r.stdout + r.stderr
        for path in ("tree/d0/f1.txt", "images/vm0.img", "tree/d1/f2.txt", "tree/d2/f3.txt"):
            assert path in r.stdout, (path, r.stdout)
        r = _verify_online(c, "--repair")
        assert r.returncode == 0 and "repaired" in r.stdout, r.stdout + r.stderr
        r = _verify_online(c, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
    settled(c)


def test_a_host_killed_for_good_is_evicted_and_the_others_keep_replicating(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", coordinator_args=["--lease", "3"])
    clusters.append(c)
    populate(c.volume, images=2)
    c.start()
    settled(c)
    stop = threading.Event()

    def h1_writes() -> None:  # the VM on h1 writes its image until its host dies
        rnd = random.Random(3)
        try:
            fd = os.open(c.mount("h1") / "images" / "vm0.img", os.O_RDWR)
            while not stop.is_set():
                os.pwrite(fd, rnd.randbytes(65536), rnd.randrange(0, 128) * 65536)
        except OSError:
            pass  # the host died under it

    writer = threading.Thread(target=h1_writes)
    writer.start()
    time.sleep(1.5)
    c.stop_process("h1", signal.SIGKILL)  # for good, with writes never shipped
    stop.set()
    writer.join(30)
    (c.mount("h2") / "tree" / "h2-goes-on").write_text("after h1 died")
    ok, why, _ = c.wait(8)
    assert not ok and any("h1" in w for w in why), why  # the merge waits for h1's stream
    r = subprocess.run(["python3", "-m", "clusterrep", "evict", "--coordinator", c.coordinator_addr,
                        "--token-file", str(c.token_file), "--node", "h1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "evicted" in r.stderr, r.stderr
    with open(c.mount("h2") / "images" / "vm1.img", "r+b") as f:  # h2 keeps writing
        f.write(b"h2 after the eviction")
    settled(c)
    with pytest.raises(Exception, match="evicted"):
        c.start_node("h1", timeout=30)  # a node that comes back is refused, saying why
    r = subprocess.run(["python3", "-m", "clusterrep", "evict", "--coordinator", c.coordinator_addr,
                        "--token-file", str(c.token_file), "--node", "h9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a member" in r.stderr and "Traceback" not in r.stderr


# -- found by review: each failed before its fix -------------------------------------------


def _many(vol: Path, n: int) -> None:
    d = vol / "many"
    d.mkdir()
    rnd = random.Random(4)
    for i in range(n):
        (d / f"f{i:05}").write_bytes(rnd.randbytes(16384))


def _cli(c: LocalCluster, *args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["python3", "-m", "clusterrep", *args, "--coordinator", c.coordinator_addr,
                           "--token-file", str(c.token_file)], capture_output=True, text=True,
                          timeout=timeout)


def test_a_verify_asked_for_during_a_needed_sync_waits_for_it_and_drops_nothing(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", coordinator_args=["--sync-rate", "4M"])
    clusters.append(c)
    _many(c.volume, 800)  # more files than one page of the plan
    populate(c.volume, images=1)
    c.start()
    time.sleep(1)
    assert (c.status().get("sync") or {}).get("phase") in ("structure", "content")
    r = _cli(c, "verify", "--online", "--timeout", "150")
    assert r.returncode == 0, r.stdout + r.stderr  # it ran after the sync: nothing differs
    settled(c)


def test_a_sync_asked_for_by_hand_during_a_sync_with_writers_leaves_nothing_unsent(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", coordinator_args=["--sync-rate", "3M"])
    clusters.append(c)
    _many(c.volume, 600)
    populate(c.volume, images=2)
    c.start()
    with Writers(c):
        time.sleep(3)
        r = _cli(c, "sync", "--timeout", "150")
        assert r.returncode == 0, r.stderr
    settled(c)


def test_a_sync_replayed_onto_another_copy_of_the_target_is_not_trusted(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    """An adopting sync sends only what differed from the old copy; a replica that then loses
    state and target replays it (nothing was trimmed from the streams yet) onto an empty one:
    the blocks' fingerprints tell it, and it asks for a sync of its own."""
    c = LocalCluster(workdir / "c", replica_args=["--adopt-target"])
    clusters.append(c)
    rnd = random.Random(1)
    (c.volume / "images").mkdir()
    for i in range(2):
        (c.volume / "images" / f"vm{i}.img").write_bytes(rnd.randbytes(8 * MIB))
    c.target.rmdir()
    subprocess.run(["cp", "-a", str(c.volume), str(c.target)], check=True)  # an old copy
    with open(c.volume / "images" / "vm0.img", "r+b") as f:
        f.seek(MIB)
        f.write(b"changed since the copy")
    c.start()
    assert settled(c)["last_sync"]["bytes"] < MIB
    c.stop_process("replica", signal.SIGKILL)
    shutil.rmtree(c.replica_state)
    shutil.rmtree(c.target)
    c.target.mkdir()
    c.start_replica()
    settled(c)


def test_a_replica_restarted_while_it_awaits_its_sync_resumes_the_streams_after_their_gap(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", node_args=["--spool-limit", "1M"])
    clusters.append(c)
    populate(c.volume, images=1)
    c.start()
    settled(c)
    with Writers(c):
        time.sleep(2)  # the spools roll over
        c.stop_process("replica", signal.SIGKILL)
        shutil.rmtree(c.replica_state)
        shutil.rmtree(c.target)
        os.kill(c.procs["coordinator"].pid, signal.SIGSTOP)  # the sync cannot start yet
        try:
            c.start_replica()
            time.sleep(2)  # the replica takes the streams from after their gap, awaiting
            c.stop_process("replica", signal.SIGKILL)
            c.start_replica()
        finally:
            os.kill(c.procs["coordinator"].pid, signal.SIGCONT)
        time.sleep(2)
    settled(c)


def test_evicting_a_live_node_is_refused_after_its_lease(
        workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c", coordinator_args=["--lease", "3"])
    clusters.append(c)
    c.start()
    start = time.monotonic()
    r = _cli(c, "evict", "--node", "h1", timeout=60)
    assert r.returncode != 0 and "alive" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert time.monotonic() - start < 15
    (c.mount("h1") / "still-a-member").write_text("yes")
    settled(c)
