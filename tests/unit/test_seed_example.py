"""The seed's live-migration example, as a named test.

Host A writes a VM's disk image and closes it; host B opens it and writes. A's clock is two
hours ahead of B's, so ordering by timestamps would put B's writes first. The replica must put
every A write before every B write, using only the time marks.
"""

from __future__ import annotations

import pytest

from clusterrep.events import Close, Mkdir, Open, Write
from clusterrep.replica.merger import Merger
from clusterrep.sim import Cluster, SimConfig, run

IMAGE = "vms/vm1.vhd"


def migrate(overlap: bool) -> Cluster:
    c = Cluster(["A", "B"], skews_hours={"A": 2.0, "B": 0.0})
    c.join("A")
    c.join("B")
    c.meta("A", Mkdir, path="vms", mode=0o755)
    c.create("A", IMAGE, 0o600)
    c.meta("A", Open, path=IMAGE)
    for i in range(20):  # overlapping writes: their order decides the bytes
        c.write("A", IMAGE, (i % 5) * 512, bytes([0xA0 + i % 16]) * 1024)
        c.step()
    if overlap:
        c.meta("B", Open, path=IMAGE)  # B opens before A closes ...
        c.write("A", IMAGE, 0, b"\xaa" * 4096)  # ... and A still writes
        c.acquire("B", IMAGE)  # writer changes: a mark
        c.meta("A", Close, path=IMAGE)
    else:
        c.meta("A", Close, path=IMAGE)
        c.meta("B", Open, path=IMAGE)
        c.acquire("B", IMAGE)
    for i in range(20):
        c.write("B", IMAGE, (i % 7) * 300, bytes([0xB0 + i % 16]) * 1024)
        c.step()
    c.finish()
    return c


@pytest.mark.parametrize("overlap", [False, True], ids=["close-then-open", "open-before-close"])
def test_a_writes_land_before_b_writes_despite_clocks(overlap: bool, tmp_path) -> None:
    c = migrate(overlap)
    a_writes = [ev for ev in c.streams["A"] if isinstance(ev, Write)]
    b_writes = [ev for ev in c.streams["B"] if isinstance(ev, Write)]
    # the premise: by wall clock, every B write looks older than every A write
    assert max(ev.wall for ev in b_writes) < min(ev.wall for ev in a_writes)

    # deliver B first, then the coordinator, then A: the worst order for a timestamp sort
    merger = Merger()
    order = []
    for source in ("B", "coordinator", "A"):
        merger.add(c.streams[source])
        order.extend(merger.drain())
    assert merger.waiting_for() == [] and merger.pending == 0
    writes = [ev for ev in order if isinstance(ev, Write)]
    last_a = max(i for i, ev in enumerate(writes) if ev.source == "A")
    first_b = min(i for i, ev in enumerate(writes) if ev.source == "B")
    assert last_a < first_b, "an A write was ordered after a B write"

    # and through the real applier, the replica equals the volume
    report = run(SimConfig(seed=1), tmp_path, cluster=c)
    assert report.identical


def test_ordering_by_wall_clock_would_be_wrong(tmp_path) -> None:
    """Guard against a vacuous test: sorting the same writes by timestamp corrupts the image."""
    c = migrate(overlap=False)
    from clusterrep.sim.volume import Volume

    vol = Volume()
    for ev in sorted(c.streams["coordinator"], key=lambda e: e.gseq):
        if not isinstance(ev, Write):
            vol.apply(ev)
    writes = [ev for s in ("A", "B") for ev in c.streams[s] if isinstance(ev, Write)]
    for ev in sorted(writes, key=lambda e: e.wall):
        vol.apply(ev)
    assert vol.snapshot()[IMAGE] != c.volume.snapshot()[IMAGE]
