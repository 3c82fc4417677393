"""Unit tests of the merger: waiting, duplicates, conflicts, stamping rules, restart."""

from __future__ import annotations

import pytest

from clusterrep.errors import ConflictingCopies, InvalidEvent, StampViolation
from clusterrep.events import Create, Event, Join, Leave, MetaEvent, Mkdir, Tick, Write
from clusterrep.replica.merger import Merger
from clusterrep.replica.position import Position


def meta(cls: type[MetaEvent], g: int, origin: str, source: str = "coordinator", seq: int | None = None,
         **kw: object) -> MetaEvent:
    return cls(source=source, seq=g if seq is None else seq, gseq=g, op_id=f"{origin}-op{g}",
               origin=origin, **kw)


def write(node: str, seq: int, after: int, data: bytes = b"x", offset: int = 0) -> Write:
    return Write(source=node, seq=seq, after=after, path="f", offset=offset, data=data)


def keys(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.source, e.seq) for e in events]


def placement(events: list[Event]) -> dict[tuple[str, int], tuple[int, int]]:
    """Where each event landed: (metadata events before it, its rank within its source).

    Two merges with the same placement differ only in how different nodes' events between the
    same two marks interleave, which the merge leaves free (they cannot conflict)."""
    out: dict[tuple[str, int], tuple[int, int]] = {}
    marks = 0
    rank: dict[str, int] = {}
    for e in events:
        if isinstance(e, MetaEvent):
            marks += 1
        rank[e.source] = rank.get(e.source, 0) + 1
        out[(e.source, e.seq)] = (marks, rank[e.source])
    return out


def test_waits_for_a_gap_in_a_node_stream_and_says_so() -> None:
    m = Merger()
    m.add([meta(Join, 1, "h1"), meta(Create, 2, "h1", path="f")])
    m.add([meta(Join, 1, "h1", source="h1", seq=1), write("h1", 3, 2)])  # seq 2 missing
    out = m.drain()
    assert keys(out) == [("coordinator", 1)]
    assert m.waiting_for() == ["node h1: seq 2 (gap: have seq 3..3)"]
    m.add([meta(Create, 2, "h1", source="h1", seq=2, path="f")])
    assert keys(m.drain()) == [("coordinator", 2), ("h1", 3)]
    assert m.waiting_for() == []


def test_waits_for_missing_metadata() -> None:
    m = Merger()
    m.add([meta(Join, 1, "h1"), write("h1", 1, 2)])
    assert keys(m.drain()) == [("coordinator", 1)]
    assert m.waiting_for() == ["gseq 2: not yet received from the coordinator or any node"]


def test_waits_for_an_idle_member_until_it_ticks() -> None:
    m = Merger()
    m.add([meta(Join, 1, "h1"), meta(Join, 2, "h2"), meta(Create, 3, "h2", path="f")])
    m.add([Tick(source="h1", seq=1, after=1)])
    assert keys(m.drain()) == [("coordinator", 1), ("h1", 1)]  # h1 has shown only gseq 1
    assert m.waiting_for() == [
        "node h1: events after seq 1, to place them before gseq 2 (coordinator#2 join g2 by h2)"
    ]
    m.add([Tick(source="h1", seq=2, after=3), Tick(source="h2", seq=1, after=3)])
    assert keys(m.drain()) == [("coordinator", 2), ("coordinator", 3), ("h1", 2), ("h2", 1)]


def test_each_metadata_event_once_from_either_copy() -> None:
    m = Merger()
    node_copies = [meta(Join, 1, "h1", source="h1", seq=1),
                   meta(Mkdir, 2, "h1", source="h1", seq=2, path="d")]
    m.add(node_copies)  # the coordinator's stream never arrives
    out = m.drain()
    assert [e.gseq for e in out] == [1, 2]  # type: ignore[attr-defined]
    m.add([meta(Join, 1, "h1"), meta(Mkdir, 2, "h1", path="d")])  # now it does: duplicates
    assert m.drain() == []
    assert m.duplicates == 2


def test_out_of_order_node_copies_cannot_deadlock() -> None:
    """Two threads: the copy of gseq 3 recorded before the copy of gseq 2, data between them.
    Even with no coordinator stream at all, everything comes out."""
    m = Merger()
    stream = [
        meta(Join, 1, "h1", source="h1", seq=1),
        meta(Mkdir, 3, "h1", source="h1", seq=2, path="b"),
        Tick(source="h1", seq=3, after=3),
        meta(Mkdir, 2, "h1", source="h1", seq=4, path="a"),
        Tick(source="h1", seq=5, after=3),
    ]
    m.add(reversed(stream))
    out = m.drain()
    assert [getattr(e, "gseq", None) for e in out] == [1, 2, 3, None, None]
    assert m.pending == 0 and m.waiting_for() == []


def test_conflicting_metadata_copies_are_refused() -> None:
    m = Merger()
    m.add([meta(Mkdir, 1, "h1", path="a")])
    with pytest.raises(ConflictingCopies, match="gseq 1"):
        m.add([meta(Mkdir, 1, "h1", source="h1", seq=1, path="b")])


def test_conflicting_data_copies_are_refused() -> None:
    m = Merger()
    m.add([write("h1", 1, 0, b"a")])
    m.add([write("h1", 1, 0, b"a")])  # an identical retransmit is fine
    with pytest.raises(ConflictingCopies, match="h1#1"):
        m.add([write("h1", 1, 0, b"b")])


def test_after_going_backwards_is_a_stamp_violation() -> None:
    m = Merger()
    m.add([meta(Join, 1, "h1"), meta(Create, 2, "h1", path="f"),
           write("h1", 1, 2), write("h1", 2, 1)])
    with pytest.raises(StampViolation, match="goes back"):
        m.drain()


def test_data_from_a_node_that_never_joined_is_refused() -> None:
    m = Merger()
    m.add([meta(Join, 1, "h1"), write("h2", 1, 1)])
    with pytest.raises(StampViolation, match="not a member"):
        m.drain()


def test_coordinator_cannot_record_data() -> None:
    with pytest.raises(InvalidEvent, match="coordinator"):
        Merger().add([write("coordinator", 1, 0)])


def test_a_node_that_left_is_no_longer_waited_for() -> None:
    m = Merger()
    m.add([meta(Join, 1, "h1"), meta(Join, 2, "h2"), meta(Leave, 3, "h2"),
           meta(Create, 4, "h1", path="f")])
    m.add([Tick(source="h1", seq=1, after=4), meta(Join, 2, "h2", source="h2", seq=1),
           meta(Leave, 3, "h2", source="h2", seq=2)])
    out = m.drain()
    assert [getattr(e, "gseq", None) for e in out] == [1, 2, 3, 4, None]
    assert m.position.members == {"h1"}


def test_restart_from_a_position_emits_exactly_the_rest() -> None:
    events: list[Event] = [meta(Join, 1, "h1"), meta(Join, 2, "h2"), meta(Create, 3, "h1", path="f")]
    events += [write("h1", k, 3, bytes([k]), k) for k in range(1, 30)]
    events += [meta(Create, 4, "h2", path="g")]
    events += [Write(source="h2", seq=k, after=4, path="g", offset=k, data=b"y") for k in range(1, 30)]
    events += [Tick(source="h1", seq=30, after=4)]
    full = Merger()
    full.add(events)
    order = full.drain()
    assert len(order) == len(events)
    for cut in range(len(order) + 1):
        pos = Position()
        for ev in order[:cut]:
            pos.advance(ev)
        again = Merger(Position.loads(pos.dumps()))
        again.add(events)  # the journal is re-fed in full
        rest = again.drain()
        assert placement(rest) == placement(order[cut:]), cut
