"""The history with the real applier on a real directory: crashes at the worst moments, pins
between events, listings of long windows (review findings of issue 11, each a named test)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from clusterrep.errors import SimulatedCrash
from clusterrep.events import Create, Event, Join, Mkdir, Rename, SetAttr, Unlink, Write
from clusterrep.history.recorder import Recorder
from clusterrep.history.restore import write_tree
from clusterrep.history.store import Store
from clusterrep.history.view import Marks, MarkView
from clusterrep.replica import applier as applier_module
from clusterrep.replica.applier import Applier
from clusterrep.sim.volume import read_tree


class Stream:
    """Coordinator events (gseq) and h1's writes, numbered as a real cluster numbers them."""

    def __init__(self) -> None:
        self.g = 0
        self.seq = itertools.count(1)

    def meta(self, cls: type, **fields: object) -> Event:
        self.g += 1
        return cls(source="coordinator", seq=self.g, gseq=self.g, op_id=f"op-{self.g}", origin="h1",
                   **fields)

    def write(self, path: str, offset: int, data: bytes) -> Event:
        return Write(source="h1", seq=next(self.seq), after=self.g, path=path, offset=offset, data=data)


class Replica:
    """An applier keeping history in ``tmp``; `crash` drops what was not committed."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "target").mkdir(exist_ok=True)
        self.start()

    def start(self) -> None:
        self.applier = Applier(self.tmp / "target", self.tmp / "state", checkpoint_every=10_000)
        self.recorder = Recorder(Store(self.tmp / "state" / "history"), self.applier.target)
        self.recorder.ready = True
        self.applier.history = self.recorder

    def crash(self) -> None:
        self.applier.target.close()
        self.recorder.store.close()  # (an open transaction is rolled back)
        self.start()

    def apply(self, events: list[Event]) -> None:
        self.applier.apply(events)


def restore(tmp: Path, rec: Recorder, gseq: int, name: str) -> dict:
    view = MarkView(rec, gseq)
    out = tmp / name
    out.mkdir()
    write_tree(out, view.entries(), lambda e: view.blocks(e.inode[1]))
    return read_tree(out)


def test_a_crash_between_the_history_commit_and_the_checkpoint_file_keeps_the_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The history commits its position at a checkpoint before the applier writes
    checkpoint.json; killed in between, the restart re-applies a rename and an unlink the
    history already holds: it must skip them, not drop every restore point."""
    s, r = Stream(), Replica(tmp_path)
    r.apply([s.meta(Join), s.meta(Mkdir, path="d", mode=0o755), s.meta(Create, path="d/a", mode=0o644)])
    r.apply([s.write("d/a", 0, b"first"), s.meta(SetAttr, path="d/a", mode=0o640)])
    r.applier.checkpoint()
    first = s.g
    before = read_tree(tmp_path / "target")
    events = [s.meta(Create, path="d/b", mode=0o644), s.write("d/b", 0, b"bee"),
              s.meta(Rename, path="d/b", dst="d/c"), s.meta(Unlink, path="d/a")]
    real = applier_module.atomic_write
    crashed = []

    def crash_at_the_last_checkpoint(path: Path, data: bytes, **kw: object) -> None:
        if Path(path).name == "checkpoint.json" and b'"gseq":%d' % s.g in data and not crashed:
            crashed.append(path)
            raise SimulatedCrash("killed after the history committed, before checkpoint.json")
        real(path, data, **kw)

    monkeypatch.setattr(applier_module, "atomic_write", crash_at_the_last_checkpoint)
    with pytest.raises(SimulatedCrash):
        r.apply(events)
    monkeypatch.setattr(applier_module, "atomic_write", real)
    assert crashed
    r.crash()
    r.apply(events)  # the journal gives them again
    r.apply([s.meta(SetAttr, path="d/c", mode=0o600)])
    r.applier.checkpoint()
    assert r.recorder.active and r.recorder.gaps == []
    assert restore(tmp_path, r.recorder, first, "at-first") == before
    assert restore(tmp_path, r.recorder, s.g, "latest") == read_tree(tmp_path / "target")


def test_a_pin_between_events_then_a_crash_keeps_the_history(tmp_path: Path) -> None:
    """Pinning commits the database; it must commit the position its rows reach, or a crash
    makes the restart record an event twice (two names for one path) and drop the history."""
    s, r = Stream(), Replica(tmp_path)
    r.apply([s.meta(Join), s.meta(Create, path="f", mode=0o644), s.write("f", 0, b"one"),
             s.meta(SetAttr, path="f", mode=0o600)])
    r.applier.checkpoint()
    pinned = s.g
    before = read_tree(tmp_path / "target")
    create = s.meta(Create, path="g", mode=0o644)
    r.apply([create])  # recorded, not committed yet
    Marks(r.recorder).pin(pinned, "before-g")
    r.crash()  # the applier restarts before the Create of g, and applies it again
    r.apply([create, s.meta(Rename, path="g", dst="h"), s.meta(Unlink, path="h")])
    r.applier.checkpoint()
    assert r.recorder.active and r.recorder.gaps == []
    assert Marks(r.recorder).pinned("before-g") == pinned
    assert restore(tmp_path, r.recorder, pinned, "pinned") == before
    assert sorted(restore(tmp_path, r.recorder, create.gseq, "with-g")) == ["f", "g"]


def test_marks_of_a_path_are_found_past_the_first_ten_thousand(tmp_path: Path) -> None:
    s, r = Stream(), Replica(tmp_path)
    r.apply([s.meta(Join), s.meta(Create, path="early", mode=0o644)])
    r.apply([s.meta(SetAttr, path="early", mode=0o600 | (i % 2)) for i in range(10_050)])
    r.apply([s.meta(Create, path="late", mode=0o644)])
    r.applier.checkpoint()
    found = Marks(r.recorder).list(path="late")
    assert [m["kind"] for m in found] == ["create"] and found[0]["gseq"] == s.g
    assert len(Marks(r.recorder).list(path="early", limit=5)) == 5
