"""Fencing: write tokens are leases. A node cut off from the coordinator (its link to the replica
still up) stops writing before its lease ends; only then does the coordinator give the file to
another host. Network namespaces: the coordinator runs in its own, reached by h1 over one veth
link and by h2 (and the replica) over another; h1's link goes down while a program writes on it.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_partition import ip

from clusterrep.localcluster import LocalCluster, free_port

log = logging.getLogger("faults")
BLOCK = 4096


@pytest.fixture
def coordinator_namespace() -> Iterator[tuple[str, str, str, str]]:
    """A namespace with two veth links: (ns, h1's link, h1's address of it, the other's net)."""
    tag = f"cf{os.getpid() % 100000}"
    ns = f"{tag}ns"
    nets = [f"10.{os.getpid() % 200 + 20}.{random.randrange(1, 125) * 2 + k}" for k in (0, 1)]
    ip("netns", "add", ns)
    try:
        for k, net in enumerate(nets):
            host_end, ns_end = f"{tag}h{k}", f"{tag}n{k}"
            ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            ip("link", "set", ns_end, "netns", ns)
            ip("addr", "add", f"{net}.1/24", "dev", host_end)
            ip("link", "set", host_end, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", ns_end)
            ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, f"{tag}h0", nets[0], nets[1]
    finally:
        for k in (0, 1):
            subprocess.run(["ip", "link", "del", f"{tag}h{k}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Writer(threading.Thread):
    """Writes its tag and a number over block 0 of the image (contested) and block 1+i (its own)
    until stopped; records when each write returned success."""

    def __init__(self, path: Path, tag: str, own: int) -> None:
        super().__init__(daemon=True)
        self.path, self.tag, self.own = path, tag, own
        self.stop = threading.Event()
        self.done: list[tuple[float, int]] = []  # (monotonic time it returned, number)
        self.errors: list[str] = []

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        i = 0
        try:
            while not self.stop.is_set():
                data = f"{self.tag} {i}".encode().ljust(BLOCK, b".")
                try:
                    os.pwrite(fd, data, 0)
                    os.pwrite(fd, data, (self.own + i) * BLOCK)
                except OSError as exc:
                    self.errors.append(f"{i}: {exc}")
                    continue
                self.done.append((time.monotonic(), i))
                i += 1
                time.sleep(0.01)
        finally:
            os.close(fd)


def test_a_node_cut_off_from_the_coordinator_stops_writing_before_another_takes_over(
        tmp_path: Path, identical, coordinator_namespace) -> None:
    ns, h1_link, h1_net, other_net = coordinator_namespace
    port = free_port()
    c = LocalCluster(tmp_path / "c", ("h1", "h2"), replica_listen=f"{other_net}.1:{free_port()}",
                     coordinator_listen=f"0.0.0.0:{port}", coordinator_addr=f"{other_net}.2:{port}",
                     coordinator_for={"h1": f"{h1_net}.2:{port}"},
                     coordinator_prefix=["ip", "netns", "exec", ns],
                     coordinator_args=["--lease", "3"], node_args=["--coordinator-timeout", "60"])
    with c.start():
        image = "vm.img"
        (c.mount("h1") / image).write_bytes(b"")
        w1 = Writer(c.mount("h1") / image, "h1", 1)
        w1.start()
        time.sleep(1.0)
        ip("link", "set", h1_link, "down")  # h1 loses the coordinator, keeps the replica
        cut = time.monotonic()
        w2 = Writer(c.mount("h2") / image, "h2", 100_000)
        w2.start()  # h2 takes the image over: the coordinator must wait for h1's lease
        deadline = time.monotonic() + 30
        while not w2.done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w2.done, f"h2 could not take the file over: {w2.errors[:3]}"
        time.sleep(2.0)  # both keep trying for a while
        h1_during = [t for t, _ in w1.done if t >= w2.done[0][0]]
        took_over = w2.done[0][0] - cut
        w2.stop.set()
        w2.join(30)
        ip("link", "set", h1_link, "up")
        time.sleep(1.5)  # h1 gets the file back and writes on
        w1.stop.set()
        w1.join(90)
        assert not w1.is_alive(), "h1's writer hangs after its link came back"
        log.warning("h2 took over %.1f s after the cut; h1 wrote %d times before", took_over,
                    len([t for t, _ in w1.done if t < cut]))
        assert not h1_during, (f"h1 wrote {len(h1_during)} times after h2 had taken the file "
                               "over: its lease did not fence it")
        assert took_over < 10, f"h2 waited {took_over:.1f} s for a 3 s lease"
        assert not w1.errors and not w2.errors, (w1.errors[:3], w2.errors[:3])
        identical(c, timeout=120)  # every write that returned success is on the replica
        data = (c.volume / image).read_bytes()
        last = max([(t, "h1", i) for t, i in w1.done] + [(t, "h2", i) for t, i in w2.done])
        assert data[:BLOCK].rstrip(b".") == f"{last[1]} {last[2]}".encode(), \
            "block 0 is not the last write that returned"


def test_a_node_stopped_longer_than_its_lease_gets_its_files_again_before_writing(
        tmp_path: Path, identical) -> None:
    """h1 holds the tokens of two files and is stopped (SIGSTOP) for longer than its lease;
    h2 takes both over (the second without any recall to h1). When h1 runs again, its answers
    say its epoch changed: it must drop every token and ask again, never write on an old one."""
    import signal

    c = LocalCluster(tmp_path / "c", ("h1", "h2"), coordinator_args=["--lease", "2"])
    with c.start():
        m1, m2 = c.mount("h1"), c.mount("h2")
        fds1 = {n: os.open(m1 / n, os.O_RDWR | os.O_CREAT, 0o644) for n in ("F1", "F2")}
        for n, fd in fds1.items():
            os.pwrite(fd, f"h1-{n}-0".encode().ljust(BLOCK, b"."), 0)  # h1 holds both tokens
        node = c.procs["h1"].pid
        os.kill(node, signal.SIGSTOP)
        try:
            fds2 = {n: os.open(m2 / n, os.O_RDWR) for n in ("F1", "F2")}
            os.pwrite(fds2["F1"], b"h2-F1".ljust(BLOCK, b"."), BLOCK)  # waits for h1's lease
            os.pwrite(fds2["F2"], b"h2-F2".ljust(BLOCK, b"."), BLOCK)  # h1's token was taken too
        finally:
            os.kill(node, signal.SIGCONT)
        time.sleep(1.5)  # h1 renews its lease and hears that its epoch changed
        os.pwrite(fds1["F2"], b"h1-F2-6".ljust(BLOCK, b"."), 6 * BLOCK)
        os.pwrite(fds2["F2"], b"h2-F2-5".ljust(BLOCK, b"."), 5 * BLOCK)
        os.pwrite(fds1["F2"], b"h1-F2-5".ljust(BLOCK, b"."), 5 * BLOCK)
        for fd in [*fds1.values(), *fds2.values()]:
            os.close(fd)
        identical(c, timeout=120)
        data = (c.volume / "F2").read_bytes()
        assert data[5 * BLOCK:6 * BLOCK].rstrip(b".") == b"h1-F2-5"
        log_h1 = (c.logs / "h1.log").read_text()
        assert "lease ran out" in log_h1, "h1 was not told that its tokens were taken"
