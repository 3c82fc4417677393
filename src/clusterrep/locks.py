"""The cluster-wide lock table: file locks taken through any host's mount, seen by every host.

The coordinator keeps one `LockTable` and asks it on every lock request, so locks behave as on
one local Linux file system. Pure logic: no I/O, no threads; the caller serialises calls.

Files are identified by inode number (``ino``). An *owner* is a non-empty tuple whose first
element is the name of the node (``str``) the lock was taken through, e.g. ``(node, lock_owner)``
for a POSIX lock (process-associated and open-file-description locks only differ in the owner
the caller passes) or ``(node, fh)`` for a flock lock. Owners must be hashable and, for
`held_by`, msgpack-serialisable.

**POSIX byte-range locks** (``fcntl`` F_SETLK, F_SETLKW, F_GETLK and the OFD variants):

- A range is inclusive, ``[start, end]`` in bytes, ``0 <= start <= end <= MAX``; ``end == MAX``
  (the kernel's OFFSET_MAX) means "to end of file", however far the file grows.
- Two locks *conflict* when they belong to different owners, overlap, and at least one of them is
  a write lock. An owner's own locks never conflict with each other.
- Setting type T over ``[start, end]`` for owner O fails, changing nothing, if another owner holds
  a conflicting lock. Otherwise it replaces whatever O held in the range: O's ranges are split at
  the boundaries and the part inside takes type T (unlock removes it). Then O's ranges of one
  type that overlap or touch (``a.end + 1 == b.start``) are coalesced into one, as the kernel
  does; ranges of different types are never merged.
- F_GETLK (`LockTable.test`) reports one conflicting lock, the whole coalesced range of its
  holder, or None if the lock could be set.
- Closing a file drops all of the closing owner's locks on it (`LockTable.release_posix`).

**flock locks** (whole file, BSD): the owner is the open file. LOCK_SH conflicts with another
owner's LOCK_EX; LOCK_EX conflicts with any other owner's lock. Converting (SH to EX or back) is
**atomic here**: if another owner conflicts, the owner keeps the lock it had. Linux instead drops
the old lock first, so that two SH holders that both wait to upgrade do not wait on each other
forever: a caller about to *wait* for a conversion (LOCK_EX without LOCK_NB) must therefore
release the old lock first, as the kernel does.

flock and POSIX locks are independent namespaces: they never conflict with each other, and the
release methods of one never touch the other.

Waiting (F_SETLKW, flock without LOCK_NB) and deadlock detection are the caller's: a refused
request changes nothing, and the release methods say which inodes changed so the caller can
retry its waiters.
"""

from __future__ import annotations

import fcntl
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping
from enum import IntEnum
from operator import attrgetter
from typing import Any, NamedTuple

from .errors import InvalidLock, ReclaimConflict

MAX = 2**63 - 1
"""The last byte offset (OFFSET_MAX): a lock ending there runs to end of file."""

Owner = tuple[Any, ...]
"""Who holds a lock: ``(node: str, ...)``, hashable; see the module docstring."""

Record = dict[str, Any]
"""One held lock as plain data (msgpack-serialisable), from `LockTable.held_by`."""


class LockType(IntEnum):
    """POSIX lock types; the values are the kernel's ``l_type`` (fcntl.F_RDLCK, ...)."""

    READ = fcntl.F_RDLCK
    WRITE = fcntl.F_WRLCK
    UNLOCK = fcntl.F_UNLCK


class FlockType(IntEnum):
    """flock operations; the values are the kernel's (fcntl.LOCK_SH, ...), without LOCK_NB."""

    SHARED = fcntl.LOCK_SH
    EXCLUSIVE = fcntl.LOCK_EX
    UNLOCK = fcntl.LOCK_UN


class PosixLock(NamedTuple):
    """A POSIX lock as held: type, inclusive byte range ``[start, end]``, owner."""

    type: LockType
    start: int
    end: int
    owner: Owner


class _Range(NamedTuple):
    """One of an owner's ranges on a file; an owner's list is sorted, disjoint and coalesced."""

    start: int
    end: int
    type: LockType


_PosixTable = dict[int, dict[Owner, list[_Range]]]
"""ino -> owner -> that owner's ranges on the file (never empty: emptied entries are removed)."""

_FlockTable = dict[int, dict[Owner, FlockType]]
"""ino -> owner -> its flock lock (SHARED or EXCLUSIVE)."""


class _PosixRecord(NamedTuple):
    ino: int
    lock: PosixLock


class _FlockRecord(NamedTuple):
    ino: int
    owner: Owner
    type: FlockType


class LockTable:
    """All POSIX and flock locks of the volume, by inode; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._posix: _PosixTable = {}
        self._flock: _FlockTable = {}

    # --- POSIX byte-range locks ---

    def test(self, ino: int, owner: Owner, ltype: int, start: int, end: int) -> PosixLock | None:
        """F_GETLK: a lock conflicting with ``ltype`` (READ or WRITE) over ``[start, end]``, or None.

        Of several, the first in `locks` order (lowest start) is returned."""
        kind = _posix_type(ltype, unlock=False)
        _check_request(ino, owner, start, end)
        return self._conflict(ino, owner, kind, start, end)

    def set(self, ino: int, owner: Owner, ltype: int, start: int, end: int) -> bool:
        """F_SETLK: give ``owner`` type ``ltype`` over ``[start, end]`` (UNLOCK removes).

        Returns False, changing nothing, if another owner holds a conflicting lock."""
        kind = _posix_type(ltype, unlock=True)
        _check_request(ino, owner, start, end)
        if kind is not LockType.UNLOCK and self._conflict(ino, owner, kind, start, end) is not None:
            return False
        self._apply(ino, owner, kind, start, end)
        return True

    def release_posix(self, ino: int, owner: Owner) -> bool:
        """Drop every POSIX lock of ``owner`` on ``ino`` (close); True if it held any."""
        owners = self._posix.get(ino, {})
        if owners.pop(owner, None) is None:
            return False
        if not owners:
            del self._posix[ino]
        return True

    def release_owner(self, owner: Owner) -> set[int]:
        """Drop every POSIX lock of ``owner`` on every file; returns the inodes that changed."""
        return _drop(self._posix, lambda held: held == owner)

    def locks(self, ino: int) -> list[PosixLock]:
        """Every POSIX lock on ``ino`` (each owner's ranges coalesced), by start, end, then owner."""
        held = [PosixLock(r.type, r.start, r.end, owner)
                for owner, ranges in self._posix.get(ino, {}).items() for r in ranges]
        return sorted(held, key=_order)

    def _conflict(self, ino: int, owner: Owner, ltype: LockType, start: int, end: int) -> PosixLock | None:
        found = [PosixLock(r.type, r.start, r.end, other)
                 for other, ranges in self._posix.get(ino, {}).items() if other != owner
                 for r in _overlapping(ranges, start, end)
                 if LockType.WRITE in (ltype, r.type)]
        return min(found, key=_order, default=None)

    def _apply(self, ino: int, owner: Owner, ltype: LockType, start: int, end: int) -> None:
        owners = self._posix.setdefault(ino, {})
        ranges = owners.setdefault(owner, [])
        _replace(ranges, start, end, ltype)
        if not ranges:
            del owners[owner]
        if not owners:
            del self._posix[ino]

    # --- flock locks ---

    def test_flock(self, ino: int, owner: Owner, op: int) -> tuple[FlockType, Owner] | None:
        """Another owner's flock lock that conflicts with ``op`` (SHARED or EXCLUSIVE), or None."""
        kind = _flock_type(op, unlock=False)
        _check_ino(ino)
        _check_owner(owner)
        for other, held in self._flock.get(ino, {}).items():
            if other != owner and FlockType.EXCLUSIVE in (kind, held):
                return held, other
        return None

    def set_flock(self, ino: int, owner: Owner, op: int) -> bool:
        """flock(2) with LOCK_NB: take, convert or (UNLOCK) drop ``owner``'s lock on ``ino``.

        Returns False if another owner conflicts; the owner then keeps what it had (a conversion
        is atomic, unlike Linux's: see the module docstring)."""
        kind = _flock_type(op, unlock=True)
        if kind is FlockType.UNLOCK:
            _check_ino(ino)
            _check_owner(owner)
            self.release_flock(ino, owner)
            return True
        if self.test_flock(ino, owner, kind) is not None:
            return False
        self._flock.setdefault(ino, {})[owner] = kind
        return True

    def release_flock(self, ino: int, owner: Owner) -> bool:
        """Drop ``owner``'s flock lock on ``ino`` (last close of the open file); True if it held one."""
        owners = self._flock.get(ino, {})
        if owners.pop(owner, None) is None:
            return False
        if not owners:
            del self._flock[ino]
        return True

    def flocks(self, ino: int) -> dict[Owner, FlockType]:
        """Every flock lock on ``ino``: owner -> SHARED or EXCLUSIVE (a copy)."""
        return dict(self._flock.get(ino, {}))

    # --- nodes ---

    def release_node(self, node: str) -> set[int]:
        """Drop every lock (POSIX and flock) held through ``node``; returns the inodes that changed."""
        def through(owner: Owner) -> bool:
            return bool(owner[0] == node)

        return _drop(self._posix, through) | _drop(self._flock, through)

    def holders(self, ino: int) -> set[str]:
        """The nodes holding any lock (POSIX or flock) on ``ino``."""
        owners = [*self._posix.get(ino, {}), *self._flock.get(ino, {})]
        return {owner[0] for owner in owners}

    def held_by(self, node: str) -> list[Record]:
        """Every lock held through ``node``, as plain records for `reclaim`: POSIX, then flock, by inode.

        POSIX: ``{"kind": "posix", "ino": int, "owner": list, "type": int (LockType),
        "start": int, "end": int}``; flock: ``{"kind": "flock", "ino": int, "owner": list,
        "type": int (FlockType)}``. Owners are lists, as msgpack gives them back."""
        posix = [_posix_record(ino, lock) for ino in sorted(self._posix)
                 for lock in self.locks(ino) if lock.owner[0] == node]
        flock = [_flock_record(ino, owner, op) for ino in sorted(self._flock)
                 for owner, op in self._flock[ino].items() if owner[0] == node]
        return posix + flock

    def reclaim(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Re-install locks from `held_by` records (after a coordinator restart), all or none.

        Raises `InvalidLock` for a malformed record and `ReclaimConflict` if a record conflicts
        with a lock of another owner, or overlaps one of the same owner with another type; then
        nothing was installed. A lock the owner already holds with the same type is accepted."""
        parsed = [_parse_record(record) for record in records]
        inos = {record.ino for record in parsed}
        saved = self._save(inos)
        try:
            for record in parsed:
                self._reclaim_one(record)
        except ReclaimConflict:
            self._restore(inos, saved)
            raise

    def _reclaim_one(self, record: _PosixRecord | _FlockRecord) -> None:
        if isinstance(record, _PosixRecord):
            self._reclaim_posix(record.ino, record.lock)
        else:
            self._reclaim_flock(record.ino, record.owner, record.type)

    def _reclaim_posix(self, ino: int, lock: PosixLock) -> None:
        held = self._conflict(ino, lock.owner, lock.type, lock.start, lock.end)
        if held is None:
            ranges = self._posix.get(ino, {}).get(lock.owner, [])
            other = [r for r in _overlapping(ranges, lock.start, lock.end) if r.type != lock.type]
            held = PosixLock(other[0].type, other[0].start, other[0].end, lock.owner) if other else None
        if held is not None:
            raise ReclaimConflict(f"cannot reclaim {_describe(lock)} on ino {ino}: "
                                  f"{_describe(held)} is already held")
        self._apply(ino, lock.owner, lock.type, lock.start, lock.end)

    def _reclaim_flock(self, ino: int, owner: Owner, op: FlockType) -> None:
        held = self.test_flock(ino, owner, op)
        own = self._flock.get(ino, {}).get(owner)
        if held is None and own not in (None, op):
            held = own, owner
        if held is not None:
            raise ReclaimConflict(f"cannot reclaim flock {op.name} of owner {owner!r} on ino {ino}: "
                                  f"flock {held[0].name} of owner {held[1]!r} is already held")
        self._flock.setdefault(ino, {})[owner] = op

    def _save(self, inos: set[int]) -> tuple[_PosixTable, _FlockTable]:
        posix = {ino: {owner: list(ranges) for owner, ranges in self._posix[ino].items()}
                 for ino in inos if ino in self._posix}
        flock = {ino: dict(self._flock[ino]) for ino in inos if ino in self._flock}
        return posix, flock

    def _restore(self, inos: set[int], saved: tuple[_PosixTable, _FlockTable]) -> None:
        for ino in inos:
            self._posix.pop(ino, None)
            self._flock.pop(ino, None)
        self._posix.update(saved[0])
        self._flock.update(saved[1])


def _order(lock: PosixLock) -> tuple[int, int, str]:
    """The order `LockTable.locks` lists locks in: deterministic, whatever the insertion order."""
    return lock.start, lock.end, repr(lock.owner)


# --- one owner's ranges on one file: sorted by start, disjoint, coalesced ---


def _span(ranges: list[_Range], start: int, end: int) -> tuple[int, int]:
    """Indices ``[i, j)`` of the ranges that overlap ``[start, end]``."""
    return (bisect_left(ranges, start, key=attrgetter("end")),
            bisect_right(ranges, end, key=attrgetter("start")))


def _overlapping(ranges: list[_Range], start: int, end: int) -> list[_Range]:
    i, j = _span(ranges, start, end)
    return ranges[i:j]


def _replace(ranges: list[_Range], start: int, end: int, ltype: LockType) -> None:
    """Give ``[start, end]`` type ``ltype`` (UNLOCK: none), splitting at the ends, then coalesce."""
    i, j = _span(ranges, start, end)
    pieces: list[_Range] = []
    if i < j and ranges[i].start < start:
        pieces.append(ranges[i]._replace(end=start - 1))
    if ltype is not LockType.UNLOCK:
        pieces.append(_Range(start, end, ltype))
    if i < j and ranges[j - 1].end > end:
        pieces.append(ranges[j - 1]._replace(start=end + 1))
    ranges[i:j] = pieces
    _coalesce(ranges, i - 1, i + len(pieces))


def _coalesce(ranges: list[_Range], first: int, last: int) -> None:
    """Merge touching ranges of one type among ``ranges[first..last]`` (indices clipped)."""
    k = max(first, 0) + 1
    while k <= min(last, len(ranges) - 1):
        a, b = ranges[k - 1], ranges[k]
        if a.type == b.type and a.end + 1 == b.start:
            ranges[k - 1:k + 1] = [_Range(a.start, b.end, a.type)]
            last -= 1
        else:
            k += 1


def _drop(table: dict[int, dict[Owner, Any]], pick: Callable[[Owner], bool]) -> set[int]:
    """Remove the owners ``pick`` selects from every inode of ``table``; the inodes changed."""
    changed: set[int] = set()
    for ino, owners in list(table.items()):
        for owner in [owner for owner in owners if pick(owner)]:
            del owners[owner]
            changed.add(ino)
        if not owners:
            del table[ino]
    return changed


# --- validation and records ---

def _posix_type(value: int, *, unlock: bool) -> LockType:
    try:
        ltype = LockType(value)
    except ValueError:
        raise InvalidLock(f"unknown POSIX lock type {value!r}") from None
    if ltype is LockType.UNLOCK and not unlock:
        raise InvalidLock("a lock test or held lock has type READ or WRITE, not UNLOCK")
    return ltype


def _flock_type(value: int, *, unlock: bool) -> FlockType:
    try:
        op = FlockType(value)
    except ValueError:
        raise InvalidLock(f"unknown flock operation {value!r} (LOCK_NB must be stripped)") from None
    if op is FlockType.UNLOCK and not unlock:
        raise InvalidLock("a flock test or held flock has type SHARED or EXCLUSIVE, not UNLOCK")
    return op


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ino(ino: object) -> None:
    if isinstance(ino, bool) or not isinstance(ino, int) or ino < 0:
        raise InvalidLock(f"inode number must be an int >= 0, not {ino!r}")


def _check_owner(owner: object) -> None:
    if not isinstance(owner, tuple) or not owner or not isinstance(owner[0], str):
        raise InvalidLock(f"lock owner must be a tuple (node: str, ...), not {owner!r}")
    try:
        hash(owner)
    except TypeError:
        raise InvalidLock(f"lock owner must be hashable, not {owner!r}") from None


def _check_request(ino: int, owner: Owner, start: int, end: int) -> None:
    _check_ino(ino)
    _check_owner(owner)
    if not (_is_int(start) and _is_int(end) and 0 <= start <= end <= MAX):
        raise InvalidLock(f"lock range [{start!r}, {end!r}] is not 0 <= start <= end <= 2**63-1")


def _describe(lock: PosixLock) -> str:
    end = "EOF" if lock.end == MAX else str(lock.end)
    return f"{lock.type.name} lock [{lock.start}, {end}] of owner {lock.owner!r}"


def _posix_record(ino: int, lock: PosixLock) -> Record:
    return {"kind": "posix", "ino": ino, "owner": list(lock.owner), "type": int(lock.type),
            "start": lock.start, "end": lock.end}


def _flock_record(ino: int, owner: Owner, op: FlockType) -> Record:
    return {"kind": "flock", "ino": ino, "owner": list(owner), "type": int(op)}


def _parse_record(record: Mapping[str, Any]) -> _PosixRecord | _FlockRecord:
    """A `held_by` record (possibly after a msgpack round trip), validated."""
    try:
        kind, ino, owner = record["kind"], record["ino"], record["owner"]
        if not isinstance(owner, list | tuple):
            raise TypeError("owner is not a list")
        owner = tuple(owner)
        if kind == "posix":
            lock = PosixLock(_posix_type(record["type"], unlock=False), record["start"], record["end"], owner)
            _check_request(ino, owner, lock.start, lock.end)
            return _PosixRecord(ino, lock)
        if kind == "flock":
            _check_ino(ino)
            _check_owner(owner)
            return _FlockRecord(ino, owner, _flock_type(record["type"], unlock=False))
    except (KeyError, TypeError) as exc:
        raise InvalidLock(f"malformed lock record {record!r}: {exc!r}") from None
    raise InvalidLock(f"lock record {record!r} has unknown kind {kind!r}")
