"""Cluster-wide file locks, the coordinator's part: grants in one order for all hosts.

`FileLocking` is the part of `CoordinatorService` that answers lock requests against its
`LockTable` (`..locks`). A request never waits here: a refused one is answered at once and its
node waits for an "unlocked" push. A grant that moves a file's locks to another node is a
`Lock` mark (docs/architecture.md, rule 6). Locks are not journaled: after a restart their
holders reclaim them within a grace period, during which no new lock is granted (as NFSv4).
A silent node's locks go once its lease has run out.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidLock, OpFailed, UnsafePath
from ..events import Lock, MetaEvent, check_path, encode
from ..locks import MAX, FlockType, LockTable, LockType
from .namespace import UNKNOWN

log = logging.getLogger("clusterrep.coordinator")


@dataclass(frozen=True)
class LockRequest:
    """One lock request of a node: ``kind`` ``posix`` (byte range ``[start, end]``, inclusive,
    ``end`` = `locks.MAX` for "to end of file"; ``type`` a `LockType`) or ``flock`` (whole
    file; ``type`` a `FlockType`); ``owner`` the node's own number for the lock owner (POSIX)
    or open file (flock); ``test``: F_GETLK; ``wait``: the node waits if refused."""

    ino: int
    path: str
    kind: str
    owner: int
    type: int
    start: int = 0
    end: int = MAX
    test: bool = False
    wait: bool = False

    @property
    def unlock(self) -> bool:
        return self.type == (LockType.UNLOCK if self.kind == "posix" else FlockType.UNLOCK)

    @property
    def shared(self) -> bool:
        return self.type == (LockType.READ if self.kind == "posix" else FlockType.SHARED)

    @classmethod
    def parse(cls, msg: dict[str, Any]) -> LockRequest:
        """From a request map; raises InvalidLock for anything malformed."""
        try:
            req = cls(ino=msg["ino"], path=msg["path"], kind=msg["kind"], owner=msg["owner"],
                      type=msg["type"], start=msg.get("start", 0), end=msg.get("end", MAX),
                      test=bool(msg.get("test")), wait=bool(msg.get("wait")))
        except KeyError as exc:
            raise InvalidLock(f"lock request without {exc}") from None
        ints = (req.ino, req.owner, req.type, req.start, req.end)
        if not all(type(v) is int for v in ints) or not isinstance(req.path, str):
            raise InvalidLock("lock request: ino, owner, type, start, end must be integers")
        if req.kind not in ("posix", "flock"):
            raise InvalidLock(f"lock kind must be posix or flock, not {req.kind!r}")
        valid = LockType if req.kind == "posix" else FlockType
        if req.type not in set(valid):
            raise InvalidLock(f"{req.kind} lock type {req.type} is not one of {[int(v) for v in valid]}")
        if req.path != ".":  # "." : a file without a name (no mark is needed for it)
            try:
                check_path(req.path)
            except UnsafePath as exc:
                raise InvalidLock(f"lock request: {exc}") from None
        if not 0 <= req.start <= req.end <= MAX:
            raise InvalidLock(f"lock range [{req.start}, {req.end}] is not within [0, {MAX}]")
        return req


class FileLocking:
    """Mixed into `CoordinatorService`; uses its lock, journal and leases."""

    lock: threading.RLock
    gseq: int
    members: set[str]
    locks: LockTable
    lock_waiters: dict[int, set[str]]
    last_locker: dict[int, str]
    on_unlock: Callable[[set[str], int], None] | None
    grace_until: float
    reclaimed: set[str]

    # provided by CoordinatorService
    _record: Callable[..., MetaEvent]
    _resolve: Callable[[int, str], str | None]
    _durable: Callable[[], None]
    lease_left: Callable[[str], float]
    expire: Callable[[str, str], None]
    epoch: Callable[[str], int]

    def in_grace(self) -> bool:
        """After a restart, until every member reclaimed its locks (or the grace period ended),
        no new lock is granted: one could take a lock another node still holds."""
        if not self.grace_until:
            return False
        if time.monotonic() >= self.grace_until or self.members <= self.reclaimed:
            self.grace_until = 0.0
            log.info("grace period over: tokens and locks are granted again")
            return False
        return True

    def reclaim(self, node: str, records: list[Any], epoch: Any = None) -> dict[str, Any]:
        """``node`` (re)connected and says which locks it holds (in its ``epoch``); keep them.
        Raises `OpFailed` ESTALE if its epoch is over (its locks were taken when its lease ran
        out), `InvalidLock` for a malformed record, `ReclaimConflict` (nothing installed) if
        they clash with locks held by others."""
        if epoch is not None and epoch != self.epoch(node):
            raise OpFailed(f"node {node}'s locks of epoch {epoch} were taken when its lease ran "
                           f"out (now epoch {self.epoch(node)})", errno.ESTALE)
        for r in records:
            if not isinstance(r, dict) or not isinstance(r.get("owner"), list) or not r["owner"]:
                raise InvalidLock(f"a reclaimed lock must be a map with an owner list, not {r!r:.80}")
        with self.lock:
            owned = [{**r, "owner": [node, *r["owner"][1:]]} for r in records]
            self.locks.reclaim(owned)
            self.reclaimed.add(node)
            for r in owned:
                self.last_locker[int(r["ino"])] = node
        return {"gseq": self.gseq}

    def file_lock(self, node: str, op_id: str, req: LockRequest) -> dict[str, Any]:
        """Test, take or release one lock for ``node``; never waits. The answer says
        ``granted`` (or, for a test, ``conflict``: [type, start, end] or None) and carries a
        `Lock` event when the lock changes hands between nodes (a mark). A refused request with
        ``req.wait`` makes ``node`` a waiter: it is told when a lock on the file is released."""
        ev = None
        with self.lock:
            if self.in_grace() and not req.unlock:
                return {"gseq": self.gseq, "granted": False, "grace": True}
            owner = (node, req.owner)
            if req.test:
                c = self.locks.test(req.ino, owner, req.type, req.start, req.end)
                return {"gseq": self.gseq,
                        "conflict": None if c is None else [int(c.type), c.start, c.end]}
            if not self._set_lock(req, owner) and not self._expired_holders(req, owner):
                if req.wait:
                    self.lock_waiters.setdefault(req.ino, set()).add(node)
                return {"gseq": self.gseq, "granted": False}
            if req.unlock or req.shared:
                self._wake(req.ino)  # a release or a downgrade may let a waiter in
            if not req.unlock:
                ev = self._lock_mark(node, op_id, req)
        if ev is None:
            return {"gseq": self.gseq, "granted": True}
        self._durable()
        return {"gseq": ev.gseq, "granted": True, "event": encode(ev)}

    def _expired_holders(self, req: LockRequest, owner: tuple[Any, ...]) -> bool:
        """A refused request: free the locks of holders whose lease has run out (dead or cut
        off; they stopped trusting their locks by now), and try once more (lock held)."""
        expired = [n for n in self.locks.holders(req.ino) - {owner[0]} if self.lease_left(n) <= 0]
        for node in expired:
            self.expire(node, "holds a lock another node wants and its lease ran out")
        return bool(expired) and self._set_lock(req, owner)

    def _set_lock(self, req: LockRequest, owner: tuple[Any, ...]) -> bool:
        if req.kind == "posix":
            return self.locks.set(req.ino, owner, req.type, req.start, req.end)
        if self.locks.set_flock(req.ino, owner, req.type):
            return True
        # Linux converts a flock lock by dropping the old one first, also when the new one
        # cannot be had: two shared holders both upgrading must not wait on each other
        if owner in self.locks.flocks(req.ino) and self.locks.release_flock(req.ino, owner):
            self._wake(req.ino)
        return False

    def _lock_mark(self, node: str, op_id: str, req: LockRequest) -> MetaEvent | None:
        """Record a `Lock` mark if the last lock on this file went to another node (lock held)."""
        previous = self.last_locker.get(req.ino)
        self.last_locker[req.ino] = node
        if previous is None or previous == node or req.path == ".":
            return None
        path = self._resolve(req.ino, req.path)
        if path is None:
            return None  # no name: nothing on the replica to order
        # (a mark orders by its gseq; its path only names it: the node's, if no other is known)
        return self._record(Lock, node, op_id, path=req.path if path == UNKNOWN else path)

    def release_locks(self, node: str) -> None:
        """Drop every lock ``node`` holds (it left, or its link and lease are gone)."""
        with self.lock:
            for ino in self.locks.release_node(node):
                self._wake(ino)
            self.reclaimed.discard(node)

    def _wake(self, ino: int) -> None:
        waiters = self.lock_waiters.pop(ino, None)
        if waiters and self.on_unlock is not None:
            self.on_unlock(waiters, ino)
