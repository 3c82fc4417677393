"""Acknowledgement levels: when a write returns, what is already where."""

from __future__ import annotations

import os
import signal
import time

import pytest

from clusterrep.localcluster import LocalCluster


@pytest.mark.parametrize("ack", ["async", "local", "received", "replicated"])
def test_every_ack_level_replicates_identically(tmp_path, identical, ack: str) -> None:
    with LocalCluster(tmp_path / "c", ("h1",), node_args=["--ack", ack]).start() as c:
        fd = os.open(c.mount("h1") / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
        for i in range(100):
            os.pwrite(fd, os.urandom(4096), (i * 7 % 64) * 4096)
        os.close(fd)
        identical(c)


def test_replicated_means_fsynced_on_the_replica_when_the_write_returns(tmp_path) -> None:
    with LocalCluster(tmp_path / "c", ("h1",), node_args=["--ack", "replicated"]).start() as c:
        fd = os.open(c.mount("h1") / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
        for i in range(50):
            os.pwrite(fd, os.urandom(4096), i * 4096)
        received = c.status()["sources"]["h1"]["received"]  # durable on the replica
        assert received >= 51, received  # the join and all 50 writes, without any waiting
        os.close(fd)


def test_replicated_degrades_to_local_when_the_replica_is_away(tmp_path, identical) -> None:
    with LocalCluster(tmp_path / "c", ("h1",),
                      node_args=["--ack", "replicated", "--ack-timeout", "1"]).start() as c:
        m = c.mount("h1")
        (m / "warm").write_text("x")
        c.stop_process("replica", signal.SIGKILL)
        fd = os.open(m / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
        start = time.monotonic()
        os.pwrite(fd, b"a" * 4096, 0)  # waits for the replica, then gives up
        first = time.monotonic() - start
        start = time.monotonic()
        for i in range(20):
            os.pwrite(fd, b"b" * 4096, i * 4096)  # degraded: no waiting
        rest = time.monotonic() - start
        os.close(fd)
        assert first >= 0.9 and rest < 5, (first, rest)
        assert "did not acknowledge" in (c.logs / "h1.log").read_text()
        c.start_replica()
        identical(c)
