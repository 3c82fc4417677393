"""Fault tests with real processes: kill -9 at random moments, then wait + verify identical and
count that every event was applied exactly once. Each test logs its random seed."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time

import pytest

from clusterrep.events import DataEvent, decode
from clusterrep.journal import Journal
from clusterrep.localcluster import LocalCluster
from clusterrep.replica.applier import load_position

log = logging.getLogger("faults")


class Writers:
    """VM-like writers on every node plus file churn, until stopped; errors are collected."""

    def __init__(self, cluster: LocalCluster, seed: int, pace: float = 0.001) -> None:
        self.cluster, self.seed, self.pace = cluster, seed, pace
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._vm, args=(n, i)) for i, n in
                        enumerate(cluster.nodes)]
        self.threads.append(threading.Thread(target=self._files))

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        assert not self.errors, self.errors

    def _vm(self, node: str, k: int) -> None:
        rng = random.Random(self.seed * 100 + k)
        try:
            fd = os.open(self.cluster.mount(node) / f"vm{k}.img", os.O_RDWR | os.O_CREAT, 0o600)
            while not self.stop.is_set():
                # paced, so that every stream fits in one journal segment and can be counted
                os.pwrite(fd, rng.randbytes(rng.choice((512, 1024, 4096))),
                          rng.randrange(1024) * 4096)
                time.sleep(self.pace)
            os.close(fd)
        except BaseException as exc:
            if not (self.stop.is_set() and isinstance(exc, OSError)):
                self.errors.append(exc)  # (after stop: the node was killed under the writer)

    def _files(self) -> None:
        rng = random.Random(self.seed)
        m = self.cluster.mount(self.cluster.nodes[0])
        try:
            (m / "files").mkdir(exist_ok=True)
            i = 0
            while not self.stop.is_set():
                i += 1
                p = m / "files" / f"f{i}"
                p.write_bytes(rng.randbytes(rng.randrange(1, 20000)))
                if i % 3 == 0:
                    p.rename(m / "files" / f"r{i}")
                if i % 5 == 0:
                    (m / "files" / f"r{i - 2}").unlink(missing_ok=True)
                time.sleep(0.01)
        except BaseException as exc:
            if not (self.stop.is_set() and isinstance(exc, OSError)):
                self.errors.append(exc)  # (after stop: the node was killed under the writer)


def assert_applied_exactly_once(cluster: LocalCluster, seed: int) -> None:
    """Stop the cluster, then: every distinct event was applied, and none twice."""
    cluster.stop()
    applied, expected = applied_exactly_once(cluster)
    assert applied == expected, f"seed {seed}: applied {applied} events, {expected} exist"


def applied_exactly_once(cluster: LocalCluster) -> tuple[int, int]:
    """(events the replica's checkpoint counts as applied, distinct events that exist)."""
    expected = 0
    with Journal(cluster.workdir / "state-coordinator" / "stream") as stream:
        assert stream.first_index == 1, "the test workload must fit in one journal segment"
        expected += stream.next_index - 1  # one metadata event per gseq
    for node in cluster.nodes:
        with Journal(cluster.workdir / f"state-{node}" / "spool") as spool:
            assert spool.first_index == 1
            expected += sum(isinstance(decode(raw), DataEvent)
                            for _, raw in spool.read(1, max_records=10**9))
    applied = load_position(cluster.workdir / "state-replica" / "apply").applied
    return applied, expected


@pytest.mark.parametrize("tls", [False, True], ids=["token", "tls"])
def test_replica_killed_at_random_moments_under_load(make_cluster, identical, tls: bool) -> None:
    """Also with TLS: every reconnect is a new TLS session, and a replica killed mid-record must
    cost nothing more than a resend."""
    seed = int(os.environ.get("CLUSTERREP_SEED", random.randrange(1 << 30)))
    rounds = int(os.environ.get("CLUSTERREP_KILL_ROUNDS", "20"))
    if tls:
        rounds = max(1, rounds // 4)  # the same paths, fewer rounds: CI time
    log.warning("seed %d, %d rounds, tls %s", seed, rounds, tls)
    rng = random.Random(seed)
    cluster = make_cluster(("h1", "h2"), tls=tls)
    with Writers(cluster, seed):
        for _ in range(rounds):
            time.sleep(rng.uniform(0.05, 0.6))
            cluster.stop_process("replica", signal.SIGKILL)
            time.sleep(rng.uniform(0, 0.3))
            cluster.start_replica()
        time.sleep(0.5)
    identical(cluster)
    assert_applied_exactly_once(cluster, seed)


def test_node_killed_mid_write_restarts_and_converges(make_cluster, identical) -> None:
    seed = int(os.environ.get("CLUSTERREP_SEED", random.randrange(1 << 30)))
    log.warning("seed %d", seed)
    rng = random.Random(seed)
    cluster = make_cluster(("h1", "h2"))
    for _ in range(3):
        with Writers(cluster, seed) as w:
            time.sleep(rng.uniform(0.3, 1.0))
            w.stop.set()  # the writers on the killed node would see ENOTCONN
            cluster.stop_process("h2", signal.SIGKILL)
        cluster.start_node("h2")
        seed += 1
    identical(cluster)


def test_a_node_killed_after_writing_a_sparse_image_keeps_its_holes_on_the_replica(
        make_cluster, identical) -> None:
    """The repair after an unclean stop re-reads the active extents: their holes travel as
    punched holes, not as megabytes of zeros (before: 3 MiB allocated on the replica for 12 KiB
    on the volume)."""
    cluster = make_cluster(("h1", "h2"))
    image = cluster.mount("h2") / "sparse.img"
    fd = os.open(image, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 30)
    for offset in (100 << 20, 300 << 20, (600 << 20) + 12345):
        os.pwrite(fd, os.urandom(4096), offset)
    os.close(fd)
    cluster.stop_process("h2", signal.SIGKILL)
    cluster.start_node("h2")
    identical(cluster)
    vol, rep = os.stat(cluster.volume / "sparse.img"), os.stat(cluster.target / "sparse.img")
    assert rep.st_blocks * 512 <= vol.st_blocks * 512 + (1 << 20), (rep.st_blocks, vol.st_blocks)


def test_coordinator_killed_and_restarted(make_cluster, identical) -> None:
    seed = int(os.environ.get("CLUSTERREP_SEED", random.randrange(1 << 30)))
    log.warning("seed %d", seed)
    cluster = make_cluster(("h1", "h2"))
    m = cluster.mount("h1")
    (m / "before").write_text("x")
    cluster.stop_process("coordinator", signal.SIGKILL)
    cluster.start_coordinator()
    time.sleep(1.0)  # the nodes reconnect
    (m / "after").write_text("y")
    (cluster.mount("h2") / "before").rename(cluster.mount("h2") / "moved")
    fd = os.open(m / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, os.urandom(65536), 0)
    os.close(fd)
    identical(cluster)


def test_torn_replica_journal_tail_is_cut_and_resent(make_cluster, identical) -> None:
    cluster = make_cluster(("h1",))
    m = cluster.mount("h1")
    for i in range(20):
        (m / f"f{i}").write_bytes(os.urandom(5000))
    ok, why, _ = cluster.wait(60)
    assert ok, why
    cluster.stop_process("replica", signal.SIGKILL)
    segs = sorted((cluster.workdir / "state-replica" / "journal").glob("*.seg"))
    with open(segs[-1], "r+b") as fh:  # tear the last record
        size = fh.seek(0, 2)
        fh.truncate(size - 7)
    cluster.start_replica()
    (m / "later").write_text("after the tear")
    identical(cluster)
    assert "cut" in (cluster.logs / "replica.log").read_text().lower()




def test_coordinator_killed_under_a_metadata_workload_runs_each_operation_once(
        make_cluster, identical) -> None:
    """Nodes retry a metadata operation whose answer was lost; the coordinator, restarted, runs
    it once (a rename run twice would fail the second time) and the application sees no error."""
    seed = int(os.environ.get("CLUSTERREP_SEED", random.randrange(1 << 30)))
    log.warning("seed %d", seed)
    rng = random.Random(seed)
    cluster = make_cluster(("h1", "h2"))
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn(node: str) -> None:
        m = cluster.mount(node) / node
        try:
            m.mkdir()
            i = 0
            while not stop.is_set():
                i += 1
                (m / f"f{i}").write_text(str(i))
                (m / f"f{i}").rename(m / f"g{i}")
                if i % 4 == 0:
                    (m / f"g{i - 1}").unlink()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in cluster.nodes]
    for t in threads:
        t.start()
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 1.0))
        cluster.stop_process("coordinator", signal.SIGKILL)
        time.sleep(rng.uniform(0, 0.5))
        cluster.start_coordinator()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    identical(cluster)
