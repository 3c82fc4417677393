"""Back-pressure: with the replica away, the spool grows to --spool-limit, then writes wait or
fail with ENOSPC; nothing is dropped, and everything arrives once the replica is back."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

from clusterrep.localcluster import LocalCluster


def test_spool_full_fails_writes_with_enospc_then_recovers(tmp_path, identical) -> None:
    args = ["--spool-limit", "2M", "--on-spool-full", "fail"]
    with LocalCluster(tmp_path / "c", ("h1",), node_args=args).start() as c:
        m = c.mount("h1")
        (m / "warm").write_text("x")
        c.stop_process("replica", signal.SIGKILL)
        fd = os.open(m / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
        with pytest.raises(OSError) as info:
            for i in range(2000):  # 8 MiB: more than the spool may hold
                os.pwrite(fd, os.urandom(4096), i * 4096)
        assert info.value.errno == errno.ENOSPC
        assert "reached its limit" in (c.logs / "h1.log").read_text()
        c.start_replica()
        deadline = time.monotonic() + 30
        while True:  # the spool drains; writes work again
            try:
                os.pwrite(fd, b"after" * 100, 0)
                break
            except OSError:
                assert time.monotonic() < deadline, "writes never recovered"
                time.sleep(0.2)
        os.close(fd)
        identical(c)


def test_spool_full_blocks_writes_until_the_replica_is_back(tmp_path, identical) -> None:
    with LocalCluster(tmp_path / "c", ("h1",), node_args=["--spool-limit", "2M"]).start() as c:
        m = c.mount("h1")
        (m / "warm").write_text("x")
        c.stop_process("replica", signal.SIGKILL)
        done = threading.Event()

        def writer() -> None:
            fd = os.open(m / "vm.img", os.O_RDWR | os.O_CREAT, 0o600)
            for i in range(1500):  # 6 MiB
                os.pwrite(fd, os.urandom(4096), i * 4096)
            os.close(fd)
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        assert not done.wait(3), "writes should block while the spool is full"
        c.start_replica()
        assert done.wait(60), "writes did not resume after the replica came back"
        t.join()
        identical(c)
