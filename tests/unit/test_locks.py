"""Unit and property tests of the cluster-wide lock table (POSIX byte-range and flock locks)."""

from __future__ import annotations

import fcntl
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterrep.errors import InvalidLock, ReclaimConflict
from clusterrep.locks import (
    MAX,
    FlockType,
    LockTable,
    LockType,
    Owner,
    PosixLock,
)

R, W, U = LockType.READ, LockType.WRITE, LockType.UNLOCK
SH, EX, UN = FlockType.SHARED, FlockType.EXCLUSIVE, FlockType.UNLOCK
A1: Owner = ("a", 1)
A2: Owner = ("a", 2)
B1: Owner = ("b", 1)
C1: Owner = ("c", 1)
INO = 7


def held(table: LockTable, owner: Owner, ino: int = INO) -> list[tuple[LockType, int, int]]:
    """An owner's ranges on a file, as (type, start, end), by start."""
    return [(lock.type, lock.start, lock.end) for lock in table.locks(ino) if lock.owner == owner]


def table_with(*locks: tuple[Owner, LockType, int, int], ino: int = INO) -> LockTable:
    table = LockTable()
    for owner, ltype, start, end in locks:
        assert table.set(ino, owner, ltype, start, end)
    return table


# --- POSIX: one owner's ranges ---

def test_kernel_values() -> None:
    assert (R, W, U) == (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK)
    assert (SH, EX, UN) == (fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_UN)
    table = LockTable()
    assert table.set(INO, A1, fcntl.F_WRLCK, 0, 9)
    assert held(table, A1) == [(W, 0, 9)]
    assert isinstance(table.locks(INO)[0].type, LockType)


def test_split_by_other_type_inside() -> None:
    table = table_with((A1, W, 0, 99), (A1, R, 40, 59))
    assert held(table, A1) == [(W, 0, 39), (R, 40, 59), (W, 60, 99)]


def test_split_at_one_end() -> None:
    table = table_with((A1, W, 0, 99), (A1, R, 50, 149))
    assert held(table, A1) == [(W, 0, 49), (R, 50, 149)]


def test_merge_adjacent_same_type() -> None:
    table = table_with((A1, R, 0, 9), (A1, R, 10, 19))
    assert held(table, A1) == [(R, 0, 19)]


def test_merge_overlapping_and_bridging() -> None:
    table = table_with((A1, R, 0, 9), (A1, R, 20, 29), (A1, R, 5, 24))
    assert held(table, A1) == [(R, 0, 29)]
    table = table_with((A1, R, 0, 9), (A1, R, 20, 29), (A1, R, 10, 19))
    assert held(table, A1) == [(R, 0, 29)]


def test_adjacent_other_type_not_merged() -> None:
    table = table_with((A1, R, 0, 9), (A1, W, 10, 19))
    assert held(table, A1) == [(R, 0, 9), (W, 10, 19)]


def test_same_type_inside_leaves_one_range() -> None:
    table = table_with((A1, W, 0, 99), (A1, W, 40, 59))
    assert held(table, A1) == [(W, 0, 99)]


def test_conversion_whole_range() -> None:
    table = table_with((A1, R, 0, 99), (A1, W, 0, 99))
    assert held(table, A1) == [(W, 0, 99)]
    assert table.set(INO, A1, R, 0, 99)
    assert held(table, A1) == [(R, 0, 99)]


def test_conversion_merges_with_neighbours() -> None:
    table = table_with((A1, W, 0, 9), (A1, R, 10, 19), (A1, W, 20, 29), (A1, W, 10, 19))
    assert held(table, A1) == [(W, 0, 29)]


def test_conversion_over_several_ranges() -> None:
    table = table_with((A1, R, 0, 9), (A1, W, 20, 29), (A1, R, 40, 49), (A1, W, 5, 44))
    assert held(table, A1) == [(R, 0, 4), (W, 5, 44), (R, 45, 49)]


def test_unlock_in_the_middle() -> None:
    table = table_with((A1, W, 0, 99), (A1, U, 40, 59))
    assert held(table, A1) == [(W, 0, 39), (W, 60, 99)]


def test_unlock_across_ranges_and_unheld() -> None:
    table = table_with((A1, R, 0, 9), (A1, W, 20, 29), (A1, U, 5, 24))
    assert held(table, A1) == [(R, 0, 4), (W, 25, 29)]
    assert table.set(INO, A1, U, 100, 200)
    assert table.set(INO, B1, U, 0, MAX)
    assert held(table, A1) == [(R, 0, 4), (W, 25, 29)]


def test_unlock_everything_forgets_the_file() -> None:
    table = table_with((A1, W, 0, 9), (A1, U, 0, MAX))
    assert table.locks(INO) == []
    assert table.holders(INO) == set()
    assert table.held_by("a") == []


# --- POSIX: end of file ---

def test_eof_range_split_and_unlock() -> None:
    table = table_with((A1, W, 100, MAX), (A1, U, 200, MAX))
    assert held(table, A1) == [(W, 100, 199)]
    assert table.set(INO, A1, R, 150, MAX)
    assert held(table, A1) == [(W, 100, 149), (R, 150, MAX)]


def test_eof_range_conflicts_far_out() -> None:
    table = table_with((A1, W, 100, MAX))
    assert table.set(INO, B1, W, 0, 99)
    assert not table.set(INO, B1, R, 2**40, 2**40)
    assert not table.set(INO, B1, R, MAX, MAX)
    assert table.test(INO, B1, R, 99, 100) == PosixLock(W, 100, MAX, A1)


def test_whole_file_merges_with_eof_range() -> None:
    table = table_with((A1, R, 100, MAX), (A1, R, 0, 99))
    assert held(table, A1) == [(R, 0, MAX)]


def test_invalid_requests() -> None:
    table = LockTable()
    for start, end in [(5, 4), (-1, 3), (0, MAX + 1), (True, 4), (0, 1.5)]:
        with pytest.raises(InvalidLock):
            table.set(INO, A1, W, start, end)  # type: ignore[arg-type]
    with pytest.raises(InvalidLock):
        table.set(INO, A1, 9, 0, 1)
    with pytest.raises(InvalidLock):
        table.test(INO, A1, U, 0, 1)
    with pytest.raises(InvalidLock):
        table.set(INO, ("a", [1]), W, 0, 1)
    with pytest.raises(InvalidLock):
        table.set(INO, (1, 2), W, 0, 1)
    with pytest.raises(InvalidLock):
        table.set(-1, A1, W, 0, 1)
    assert table.locks(INO) == []


# --- POSIX: conflicts ---

def test_read_read_no_conflict() -> None:
    table = table_with((A1, R, 0, 99), (B1, R, 50, 149))
    assert table.test(INO, C1, R, 0, MAX) is None
    assert held(table, B1) == [(R, 50, 149)]


@pytest.mark.parametrize(("first", "second"), [(R, W), (W, R), (W, W)])
def test_read_write_conflict(first: LockType, second: LockType) -> None:
    table = table_with((A1, first, 10, 19))
    assert not table.set(INO, B1, second, 19, 30)
    assert table.set(INO, B1, second, 20, 30)
    assert not table.set(INO, C1, second, 0, 10)
    assert table.set(INO, C1, second, 0, 9)  # touching is not overlapping
    assert table.set(INO, C1, R, 15, 15) == (first is R)


def test_owner_never_conflicts_with_itself() -> None:
    table = table_with((A1, W, 0, 99))
    assert table.test(INO, A1, W, 0, 99) is None
    assert table.set(INO, A1, R, 50, 59)
    assert table.set(INO, A1, W, 0, MAX)
    assert held(table, A1) == [(W, 0, MAX)]


def test_other_owner_of_same_node_conflicts() -> None:
    table = table_with((A1, W, 0, 99))
    assert not table.set(INO, A2, R, 0, 0)


def test_refused_set_changes_nothing() -> None:
    table = table_with((A1, R, 0, 9), (A1, W, 50, 59), (B1, R, 90, 95))
    before = table.locks(INO)
    assert not table.set(INO, A1, W, 0, 99)
    assert table.locks(INO) == before


def test_files_are_independent() -> None:
    table = table_with((A1, W, 0, MAX), ino=1)
    assert table.set(2, B1, W, 0, MAX)
    assert table.holders(1) == {"a"}
    assert table.holders(2) == {"b"}


def test_getlk_reports_whole_range_of_holder() -> None:
    table = table_with((A1, W, 0, 9), (A1, W, 10, 19))
    assert table.test(INO, B1, R, 15, 15) == PosixLock(W, 0, 19, A1)


def test_getlk_reports_lowest_conflict() -> None:
    table = table_with((B1, R, 50, 59), (A1, W, 30, 39), (C1, R, 20, 29))
    assert table.test(INO, A2, W, 0, 99) == PosixLock(R, 20, 29, C1)
    assert table.test(INO, A2, R, 0, 99) == PosixLock(W, 30, 39, A1)
    assert table.test(INO, A2, R, 40, 99) is None
    assert table.test(INO, A1, R, 0, 99) is None


def test_getlk_changes_nothing() -> None:
    table = table_with((A1, W, 0, 9))
    assert table.test(INO, B1, W, 20, 29) is None
    assert held(table, B1) == []


# --- POSIX: release ---

def test_release_posix_on_close() -> None:
    table = table_with((A1, W, 0, 9), (A1, R, 20, 29), (A2, R, 40, 49))
    assert table.set(8, A1, W, 0, 9)
    assert table.release_posix(INO, A1)
    assert not table.release_posix(INO, A1)
    assert [lock.owner for lock in table.locks(INO)] == [A2]
    assert held(table, A1, 8) == [(W, 0, 9)]


def test_release_owner_everywhere() -> None:
    table = table_with((A1, W, 0, 9), (A2, R, 40, 49))
    assert table.set(8, A1, W, 0, 9)
    assert table.set(9, B1, W, 0, 9)
    assert table.release_owner(A1) == {INO, 8}
    assert table.release_owner(A1) == set()
    assert held(table, A2) == [(R, 40, 49)]
    assert held(table, B1, 9) == [(W, 0, 9)]


# --- flock ---

def test_flock_shared() -> None:
    table = LockTable()
    assert table.set_flock(INO, A1, SH)
    assert table.set_flock(INO, B1, SH)
    assert table.flocks(INO) == {A1: SH, B1: SH}
    assert not table.set_flock(INO, C1, EX)
    assert table.test_flock(INO, C1, EX) in {(SH, A1), (SH, B1)}


def test_flock_exclusive() -> None:
    table = LockTable()
    assert table.set_flock(INO, A1, fcntl.LOCK_EX)
    assert not table.set_flock(INO, B1, SH)
    assert not table.set_flock(INO, B1, EX)
    assert table.test_flock(INO, B1, SH) == (EX, A1)
    assert table.test_flock(INO, A1, EX) is None
    assert table.set_flock(INO, A1, EX)
    assert table.flocks(INO) == {A1: EX}


def test_flock_conversion() -> None:
    table = LockTable()
    assert table.set_flock(INO, A1, SH)
    assert table.set_flock(INO, A1, EX)
    assert table.flocks(INO) == {A1: EX}
    assert table.set_flock(INO, A1, SH)
    assert table.set_flock(INO, B1, SH)
    assert table.flocks(INO) == {A1: SH, B1: SH}


def test_flock_refused_conversion_keeps_old_lock() -> None:
    table = LockTable()
    assert table.set_flock(INO, A1, SH)
    assert table.set_flock(INO, B1, SH)
    assert not table.set_flock(INO, A1, EX)
    assert table.flocks(INO) == {A1: SH, B1: SH}


def test_flock_unlock() -> None:
    table = LockTable()
    assert table.set_flock(INO, A1, EX)
    assert table.set_flock(INO, A1, UN)
    assert table.set_flock(INO, A1, UN)
    assert table.flocks(INO) == {}
    assert table.set_flock(INO, B1, EX)
    assert table.release_flock(INO, B1)
    assert not table.release_flock(INO, B1)
    assert table.holders(INO) == set()


def test_flock_invalid() -> None:
    table = LockTable()
    with pytest.raises(InvalidLock):
        table.set_flock(INO, A1, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(InvalidLock):
        table.test_flock(INO, A1, UN)
    with pytest.raises(InvalidLock):
        table.set_flock(INO, "a", SH)  # type: ignore[arg-type]


def test_flock_and_posix_are_independent() -> None:
    table = table_with((A1, W, 0, MAX))
    assert table.set_flock(INO, B1, EX)
    assert table.set_flock(INO, A1, SH) is False
    assert table.set(INO, B1, U, 0, MAX)
    assert held(table, A1) == [(W, 0, MAX)]
    assert table.release_owner(B1) == set()
    assert table.flocks(INO) == {B1: EX}
    assert table.release_flock(INO, B1)
    assert held(table, A1) == [(W, 0, MAX)]
    assert table.set_flock(INO, A1, EX)
    assert not table.release_posix(INO, ("x", 1))
    assert table.release_posix(INO, A1)
    assert table.flocks(INO) == {A1: EX}


# --- nodes ---

def test_holders() -> None:
    table = table_with((A1, R, 0, 9), (A2, R, 0, 9))
    assert table.set_flock(INO, C1, SH)
    assert table.holders(INO) == {"a", "c"}
    assert table.holders(INO + 1) == set()


def test_release_node() -> None:
    table = table_with((A1, W, 0, 9), (A2, R, 20, 29), (B1, R, 20, 29))
    assert table.set(8, B1, W, 0, 9)
    assert table.set_flock(9, A1, EX)
    assert table.set_flock(10, B1, EX)
    assert table.release_node("a") == {INO, 9}
    assert table.release_node("a") == set()
    assert table.holders(INO) == {"b"}
    assert [lock.owner for lock in table.locks(INO)] == [B1]
    assert table.flocks(9) == {}
    assert table.flocks(10) == {B1: EX}
    assert table.set(INO, C1, W, 0, 19)


# --- held_by and reclaim ---

def populated() -> LockTable:
    table = table_with((A1, W, 0, 9), (A1, R, 20, MAX), (A2, R, 30, 39), (B1, R, 25, 35))
    assert table.set(3, A1, W, 0, MAX)
    assert table.set_flock(INO, A1, SH)
    assert table.set_flock(INO, B1, SH)
    assert table.set_flock(4, A2, EX)
    return table


def test_held_by_records() -> None:
    records = populated().held_by("a")
    assert records[0] == {"kind": "posix", "ino": 3, "owner": ["a", 1], "type": int(W),
                          "start": 0, "end": MAX}
    assert {"kind": "flock", "ino": 4, "owner": ["a", 2], "type": int(EX)} in records
    assert len(records) == 6
    assert msgpack.unpackb(msgpack.packb(records)) == records


def test_reclaim_round_trip() -> None:
    old = populated()
    new = LockTable()
    for node in ("b", "a"):
        new.reclaim(msgpack.unpackb(msgpack.packb(old.held_by(node))))
    for ino in (3, 4, INO):
        assert new.locks(ino) == old.locks(ino)
        assert new.flocks(ino) == old.flocks(ino)
        assert new.holders(ino) == old.holders(ino)


def test_reclaim_same_locks_twice_is_harmless() -> None:
    old = populated()
    new = LockTable()
    new.reclaim(old.held_by("a"))
    new.reclaim(old.held_by("a"))
    assert new.locks(INO) == [lock for lock in old.locks(INO) if lock.owner[0] == "a"]
    assert new.flocks(4) == {A2: EX}


def test_reclaim_conflict_with_other_owner() -> None:
    table = table_with((B1, W, 5, 5))
    records = [{"kind": "posix", "ino": INO, "owner": ["a", 1], "type": int(R), "start": 0, "end": 9}]
    with pytest.raises(ReclaimConflict, match=r"READ lock \[0, 9\] of owner \('a', 1\).*WRITE lock \[5, 5\]"):
        table.reclaim(records)
    assert table.locks(INO) == [PosixLock(W, 5, 5, B1)]


def test_reclaim_conflict_with_same_owner_other_type() -> None:
    table = table_with((A1, W, 5, MAX))
    records = [{"kind": "posix", "ino": INO, "owner": ["a", 1], "type": int(R), "start": 0, "end": 9}]
    with pytest.raises(ReclaimConflict, match=r"WRITE lock \[5, EOF\]"):
        table.reclaim(records)
    assert held(table, A1) == [(W, 5, MAX)]


def test_reclaim_flock_conflict() -> None:
    table = LockTable()
    assert table.set_flock(INO, B1, SH)
    with pytest.raises(ReclaimConflict, match="flock EXCLUSIVE"):
        table.reclaim([{"kind": "flock", "ino": INO, "owner": ["a", 1], "type": int(EX)}])
    with pytest.raises(ReclaimConflict):
        table.reclaim([{"kind": "flock", "ino": INO, "owner": ["b", 1], "type": int(EX)}])
    assert table.flocks(INO) == {B1: SH}


def test_reclaim_conflict_installs_nothing() -> None:
    table = table_with((B1, W, 100, 100), ino=1)
    records: list[dict[str, Any]] = [
        {"kind": "posix", "ino": 1, "owner": ["a", 1], "type": int(R), "start": 0, "end": 9},
        {"kind": "flock", "ino": 2, "owner": ["a", 1], "type": int(EX)},
        {"kind": "posix", "ino": 3, "owner": ["a", 1], "type": int(W), "start": 0, "end": MAX},
        {"kind": "posix", "ino": 1, "owner": ["a", 2], "type": int(R), "start": 50, "end": MAX},
    ]
    with pytest.raises(ReclaimConflict):
        table.reclaim(records)
    assert table.locks(1) == [PosixLock(W, 100, 100, B1)]
    assert table.flocks(2) == {}
    assert table.locks(3) == []
    assert table.holders(2) == table.holders(3) == set()


def test_reclaim_records_conflicting_among_themselves() -> None:
    table = LockTable()
    records = [{"kind": "flock", "ino": 1, "owner": ["a", 1], "type": int(EX)},
               {"kind": "flock", "ino": 1, "owner": ["b", 1], "type": int(SH)}]
    with pytest.raises(ReclaimConflict):
        table.reclaim(records)
    assert table.flocks(1) == {}


@pytest.mark.parametrize("record", [
    {"kind": "posix", "ino": 1, "owner": ["a", 1], "type": int(U), "start": 0, "end": 9},
    {"kind": "posix", "ino": 1, "owner": ["a", 1], "type": int(R), "start": 9, "end": 0},
    {"kind": "posix", "ino": 1, "owner": ["a", 1], "type": int(R), "start": 0},
    {"kind": "posix", "ino": 1, "owner": "a1", "type": int(R), "start": 0, "end": 9},
    {"kind": "posix", "ino": 1, "owner": [["a"], 1], "type": int(R), "start": 0, "end": 9},
    {"kind": "flock", "ino": "1", "owner": ["a", 1], "type": int(SH)},
    {"kind": "flock", "ino": 1, "owner": ["a", 1], "type": int(UN)},
    {"kind": "other", "ino": 1, "owner": ["a", 1], "type": int(SH)},
    ["posix", 1],
])
def test_reclaim_malformed_record(record: Any) -> None:
    table = LockTable()
    good = {"kind": "flock", "ino": 1, "owner": ["a", 1], "type": int(SH)}
    with pytest.raises(InvalidLock):
        table.reclaim([good, record])
    assert table.flocks(1) == {}


# --- property test against a byte-by-byte reference model ---

OWNERS: list[Owner] = [A1, A2, B1, C1]
CELLS = 33
"""Bytes 0..31, and cell 32 standing for [32, MAX]: generated ranges end at 31 or MAX."""

Model = dict[int, list[dict[Owner, LockType]]]


def cell_range(a: int, b: int) -> tuple[int, int]:
    start, end = min(a, b), max(a, b)
    return start, MAX if end == CELLS - 1 else end


def cells_of(start: int, end: int) -> range:
    return range(start, min(end, CELLS - 1) + 1)


ranges = st.builds(cell_range, st.integers(0, CELLS - 1), st.integers(0, CELLS - 1))
steps = st.one_of(
    st.tuples(st.just("set"), st.sampled_from([1, 2]), st.sampled_from(OWNERS),
              st.sampled_from([R, W, U]), ranges),
    st.tuples(st.just("test"), st.sampled_from([1, 2]), st.sampled_from(OWNERS),
              st.sampled_from([R, W]), ranges),
    st.tuples(st.just("close"), st.sampled_from([1, 2]), st.sampled_from(OWNERS)),
)


def model_conflicts(cells: list[dict[Owner, LockType]], owner: Owner, ltype: LockType,
                    start: int, end: int) -> list[tuple[Owner, LockType, int]]:
    return [(other, held, c) for c in cells_of(start, end) for other, held in cells[c].items()
            if other != owner and W in (ltype, held)]


def model_set(cells: list[dict[Owner, LockType]], owner: Owner, ltype: LockType,
              start: int, end: int) -> bool:
    if ltype is not U and model_conflicts(cells, owner, ltype, start, end):
        return False
    for c in cells_of(start, end):
        if ltype is U:
            cells[c].pop(owner, None)
        else:
            cells[c][owner] = ltype
    return True


def model_locks(cells: list[dict[Owner, LockType]]) -> set[PosixLock]:
    """Each owner's maximal runs of one type: the coalesced ranges the kernel would hold."""
    out: set[PosixLock] = set()
    for owner in OWNERS:
        run: tuple[LockType, int] | None = None
        for c in range(CELLS + 1):
            ltype = cells[c].get(owner) if c < CELLS else None
            if run is not None and ltype != run[0]:
                out.add(PosixLock(run[0], run[1], MAX if c == CELLS else c - 1, owner))
                run = None
            if ltype is not None and run is None:
                run = (ltype, c)
    return out


def check_step(table: LockTable, model: Model, step: tuple[Any, ...]) -> None:
    kind, ino, owner = step[:3]
    cells = model[ino]
    if kind == "set":
        ltype, (start, end) = step[3:]
        assert table.set(ino, owner, ltype, start, end) == model_set(cells, owner, ltype, start, end)
    elif kind == "test":
        ltype, (start, end) = step[3:]
        check_test(table, cells, ino, owner, ltype, start, end)
    else:
        assert table.release_posix(ino, owner) == any(owner in cell for cell in cells)
        for cell in cells:
            cell.pop(owner, None)


def check_test(table: LockTable, cells: list[dict[Owner, LockType]], ino: int, owner: Owner,
               ltype: LockType, start: int, end: int) -> None:
    got = table.test(ino, owner, ltype, start, end)
    expected = model_conflicts(cells, owner, ltype, start, end)
    assert (got is None) == (not expected)
    if got is not None:
        assert got in table.locks(ino)
        assert got.owner != owner and W in (ltype, got.type)
        assert max(got.start, start) <= min(got.end, end)
        assert got.start == min(lock.start for lock in table.locks(ino)
                                if (lock.owner, lock.type) in {(o, t) for o, t, _ in expected}
                                and max(lock.start, start) <= min(lock.end, end))


def check_state(table: LockTable, model: Model) -> None:
    for ino, cells in model.items():
        locks = table.locks(ino)
        assert len(locks) == len(set(locks))
        assert set(locks) == model_locks(cells)
        assert table.holders(ino) == {owner[0] for cell in cells for owner in cell}


@given(st.lists(steps, min_size=8, max_size=80))
def test_posix_matches_byte_model(ops: list[tuple[Any, ...]]) -> None:
    table = LockTable()
    model: Model = {ino: [{} for _ in range(CELLS)] for ino in (1, 2)}
    for step in ops:
        check_step(table, model, step)
        check_state(table, model)
    copy = LockTable()
    for node in ("a", "b", "c"):
        copy.reclaim(msgpack.unpackb(msgpack.packb(table.held_by(node))))
    for ino in model:
        assert copy.locks(ino) == table.locks(ino)
    assert copy.release_node("a") == {ino for ino, cells in model.items()
                                       if any(owner[0] == "a" for cell in cells for owner in cell)}
    for cells in model.values():
        for cell in cells:
            for owner in [owner for owner in cell if owner[0] == "a"]:
                del cell[owner]
    check_state(copy, model)
