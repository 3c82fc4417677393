"""Failover and failback with real processes (issue 11): cluster generations.

A coordinator started on a fresh state is a new incarnation of the cluster (a *generation*):
after a failover to a restored volume, members of the old generation must not mix their
streams or operations into the new one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_sync import settled

from clusterrep.capture.check import check_fuse
from clusterrep.errors import ClusterrepError
from clusterrep.localcluster import LocalCluster
from clusterrep.timing import pause


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    check_fuse()
    return tmp_path


@pytest.fixture
def clusters() -> Iterator[list[LocalCluster]]:
    made: list[LocalCluster] = []
    yield made
    for c in made:
        c.stop()


def test_members_of_an_older_generation_are_refused(workdir: Path, clusters: list[LocalCluster]) -> None:
    c = LocalCluster(workdir / "c")
    clusters.append(c)
    c.start()
    (c.mount("h1") / "a.txt").write_text("generation one")
    settled(c)
    c.stop()
    first = (workdir / "c" / "state-coordinator" / "generation").read_text()
    assert (workdir / "c" / "state-h1" / "generation").read_text() == first
    assert (c.replica_state / "generation").read_text() == first
    # a new incarnation on the same volume (as after a failover): the coordinator's state is new
    shutil.rmtree(workdir / "c" / "state-coordinator")
    c.start_replica()
    c.start_coordinator()
    with pytest.raises(ClusterrepError) as info:
        c.start_node("h1")  # its state belongs to the old generation
    assert "belongs to cluster generation" in str(info.value) and "remove its state" in str(info.value)
    second = (workdir / "c" / "state-coordinator" / "generation").read_text()
    assert second != first
    log = c.logs / "replica.log"
    for _ in range(100):  # the coordinator keeps trying; the replica keeps refusing
        if f"belongs to cluster generation {second}" in log.read_text():
            break
        pause(0.1)
    assert f"replicates generation {first}" in log.read_text()
    assert not (c.target / "b.txt").exists()
