"""Fixtures of the tests with real processes: a work directory where FUSE works, and clusters
stopped at the end of each test whatever happened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterrep.capture.check import check_fuse
from clusterrep.localcluster import LocalCluster


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
