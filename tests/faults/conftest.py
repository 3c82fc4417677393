"""Integration fixtures: a real cluster (replica, coordinator, node agents) in tmp_path.

These tests need FUSE. If FUSE is not usable they FAIL (never skip): CI must install it
(.ci/run does)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterrep.capture.check import check_fuse
from clusterrep.localcluster import LocalCluster


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
