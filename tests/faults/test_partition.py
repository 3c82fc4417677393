"""A network partition: the replica runs in its own network namespace behind a veth link, which
goes down under load for 30 s (CLUSTERREP_PARTITION_SECONDS) and comes back. Nodes keep writing
into their spools; afterwards the replica is identical and every event was applied once."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_crashes import Writers, assert_applied_exactly_once

from clusterrep.localcluster import LocalCluster, free_port

log = logging.getLogger("faults")


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr} (network namespaces need root)"


@pytest.fixture
def replica_namespace():
    tag = f"cr{os.getpid() % 100000}"
    ns, host_end, ns_end = f"{tag}ns", f"{tag}a", f"{tag}b"
    net = f"10.{os.getpid() % 200 + 20}.{random.randrange(1, 250)}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        ip("link", "set", ns_end, "netns", ns)
        ip("addr", "add", f"{net}.1/24", "dev", host_end)
        ip("link", "set", host_end, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", ns_end)
        ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_end, f"{net}.2"
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_replica_link_down_under_load(tmp_path, identical, replica_namespace) -> None:
    ns, link, addr = replica_namespace
    seconds = float(os.environ.get("CLUSTERREP_PARTITION_SECONDS", "30"))
    seed = int(os.environ.get("CLUSTERREP_SEED", random.randrange(1 << 30)))
    log.warning("seed %d, partition %g s", seed, seconds)
    c = LocalCluster(tmp_path / "c", ("h1", "h2"), replica_listen=f"{addr}:{free_port()}",
                     replica_prefix=["ip", "netns", "exec", ns])
    with c.start():
        with Writers(c, seed, pace=0.003):  # paced: each spool fits one segment (countable)
            time.sleep(1.0)
            ip("link", "set", link, "down")  # the replica is cut off ...
            time.sleep(seconds)
            st_nodes = [c.mount(n) for n in c.nodes]
            assert all(os.path.ismount(m) for m in st_nodes)  # ... the nodes kept working
            ip("link", "set", link, "up")  # ... and comes back
            time.sleep(1.0)
        identical(c, timeout=180)
        assert_applied_exactly_once(c, seed)
