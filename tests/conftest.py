"""Shared test configuration: hypothesis profiles, and fixtures for tests with real processes.

Tests that need FUSE FAIL (never skip) when it is not usable: CI must install it (.ci/run does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from clusterrep.capture.check import check_fuse
from clusterrep.localcluster import LocalCluster

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "soak", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Directories no test may change: a canary for anything acting outside its volume or target
# (once, /etc was found mode 0600 with a 1984 modification time after a test run).
_OUTSIDE = ("/", "/etc", "/usr", "/var", "/root", "/tmp", "/bin", "/lib")


def _outside_state() -> dict[str, tuple[int, ...]]:
    out = {}
    for path in _OUTSIDE:
        st = os.lstat(path)
        # /tmp and / gain entries all the time: only their mode and owner are watched
        times = () if path in ("/", "/tmp", "/root") else (st.st_mtime_ns,)
        out[path] = (st.st_mode, st.st_uid, st.st_gid, *times)
    return out


@pytest.fixture(autouse=True)
def nothing_outside_changes() -> Iterator[None]:
    """Fail the test that changed the mode, owner or time of a system directory."""
    before = _outside_state()
    yield
    after = _outside_state()
    changed = {p: (before[p], after[p]) for p in _OUTSIDE if before[p] != after[p]}
    assert not changed, f"this test changed directories outside its own: {changed}"


def assert_identical(cluster: LocalCluster, timeout: float = 120.0) -> dict:
    ok, why, status = cluster.wait(timeout=timeout)
    assert ok, "replica did not catch up:\n" + "\n".join(why)
    diffs = cluster.verify()
    assert not diffs, "replica differs:\n" + "\n".join(str(d) for d in diffs[:20])
    return status


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator:
    check_fuse()  # raises FuseUnavailable with install instructions: a failure, not a skip
    clusters: list[LocalCluster] = []

    def make(nodes: tuple[str, ...] = ("h1", "h2"), **kw: object) -> LocalCluster:
        c = LocalCluster(tmp_path / f"c{len(clusters)}", nodes, **kw)  # type: ignore[arg-type]
        clusters.append(c)
        return c.start()

    yield make
    for c in clusters:
        c.stop()


@pytest.fixture
def identical():
    """``identical(cluster)``: wait until the replica caught up, then verify byte for byte."""
    return assert_identical


@pytest.fixture
def cluster(make_cluster) -> LocalCluster:
    return make_cluster()
