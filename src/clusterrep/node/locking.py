"""The node's part of cluster-wide file locks: asking the coordinator, and its own copy.

`NodeLocking` is mixed into `NodeAgent`. Every flock, POSIX and open-file-description lock a
program takes through the mount is decided by the coordinator (its `LockTable` holds every
host's locks). The node keeps a copy of the locks it holds (``my_locks``), following the
coordinator's grants, so that it can reclaim them after a coordinator restart or a broken
control link; a waiter is woken by the coordinator's "unlocked" push (`lock_released`).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..locks import MAX, FlockType, LockTable, LockType
from .client import CoordinatorClient

log = logging.getLogger("clusterrep.node")


class NodeLocking:
    """Mixed into `NodeAgent`; uses its client, name, operation ids and recording."""

    name: str
    client: CoordinatorClient
    my_locks: LockTable  # the file locks this node holds (a copy of the coordinator's)
    _lock_wake: threading.Condition  # notified when the coordinator says "unlocked"
    _unlocks_seen: int
    _joined: bool
    _epoch: int | None
    _op_id: Callable[[], str]
    _learn_reply: Callable[[dict[str, Any]], None]

    def file_lock(self, req: dict[str, Any], *, interrupted: Callable[[], bool]) -> Any:
        """Test, take or release a file lock through the coordinator, so every host sees it.

        ``req``: ino, path, kind (``posix``/``flock``), owner, type, start, end, test, wait (as
        `coordinator.service.LockRequest`). Returns the conflict ([type, start, end] or None)
        for a test, else None once the lock is held or released. Raises OSError EAGAIN if
        refused without ``wait``, EINTR if ``interrupted()`` (the program got a signal).
        A granted lock that changed hands between nodes comes with a `Lock` mark, recorded
        like any metadata copy, so what this node does under it is applied after what the last
        holder did under its own.
        """
        while True:
            with self._lock_wake:
                seen = self._unlocks_seen
            reply = self.client.call("lock", op_id=self._op_id(), **req)
            self._learn_reply(reply)
            if req.get("test"):
                return reply.get("conflict")
            if reply.get("granted"):
                self._mirror(req)
                return None
            if req["kind"] == "flock" and not reply.get("grace"):
                with self._lock_wake:  # a refused conversion lost the old lock, as on Linux
                    self.my_locks.release_flock(req["ino"], (self.name, req["owner"]))
            if not req.get("wait") and not reply.get("grace"):
                raise OSError(errno.EAGAIN, "the lock is held through another mount or process")
            with self._lock_wake:  # until an "unlocked" push; now and then in case it was lost
                if self._unlocks_seen == seen:
                    self._lock_wake.wait(0.1 if reply.get("grace") else 0.5)
            if interrupted():
                raise OSError(errno.EINTR, "interrupted while waiting for a lock")

    def _mirror(self, req: dict[str, Any]) -> None:
        """Keep our own copy of what we hold, to reclaim it after a coordinator restart. The
        coordinator's grant is the truth: whatever the copy still shows in conflict with it is
        a release whose answer has not been mirrored yet (it may overtake the grant), dropped."""
        ino, owner = req["ino"], (self.name, req["owner"])
        with self._lock_wake:
            if req["kind"] == "posix":
                while not self.my_locks.set(ino, owner, req["type"], req["start"], req["end"]):
                    stale = self.my_locks.test(ino, owner, req["type"], req["start"], req["end"])
                    if stale is None:
                        break
                    self.my_locks.set(ino, stale.owner, LockType.UNLOCK, req["start"], req["end"])
            else:
                while not self.my_locks.set_flock(ino, owner, req["type"]):
                    stale = self.my_locks.test_flock(ino, owner, req["type"])
                    if stale is None:
                        break
                    self.my_locks.release_flock(ino, stale[1])

    def drop_posix_locks(self, ino: int, owner: int, path: str) -> None:
        """A descriptor of ``ino`` was closed by lock owner ``owner``: its POSIX locks on the
        file go (POSIX close semantics). Asks the coordinator only if it holds any."""
        key = (self.name, owner)
        with self._lock_wake:
            held = any(lk.owner == key for lk in self.my_locks.locks(ino))
        if held:
            self._unlock({"ino": ino, "path": path or ".", "kind": "posix", "owner": owner,
                          "type": int(LockType.UNLOCK), "start": 0, "end": MAX})

    def drop_flock(self, ino: int, owner: int, path: str) -> None:
        """The last descriptor of an open file was closed: its flock lock goes."""
        with self._lock_wake:
            held = (self.name, owner) in self.my_locks.flocks(ino)
        if held:
            self._unlock({"ino": ino, "path": path or ".", "kind": "flock", "owner": owner,
                          "type": int(FlockType.UNLOCK)})

    def _unlock(self, req: dict[str, Any]) -> None:
        try:
            self.file_lock(req, interrupted=lambda: False)
        except OSError as exc:
            log.warning("could not release a lock on %s: %s (the coordinator drops it when this "
                        "node leaves or its link breaks)", req["path"], exc)
            owner = (self.name, req["owner"])
            with self._lock_wake:
                if req["kind"] == "posix":
                    self.my_locks.release_posix(req["ino"], owner)
                else:
                    self.my_locks.release_flock(req["ino"], owner)

    def lock_released(self, ino: int) -> None:
        """The coordinator says a lock on ``ino`` was released: waiters try again."""
        with self._lock_wake:
            self._unlocks_seen += 1
            self._lock_wake.notify_all()

    def _reclaim(self) -> None:
        """The control link is (back) up: tell the coordinator which locks we hold (after its
        restart it knows none; after a broken link it dropped them)."""
        with self._lock_wake:
            records = self.my_locks.held_by(self.name)
        if not records and not self._joined:
            return  # starting: nothing held, and the coordinator does not know us yet
        try:
            self.client.call("reclaim", op_id=self._op_id(), locks=records, epoch=self._epoch)
        except OSError as exc:
            log.error("could not reclaim %d file lock(s) after the link to the coordinator came "
                      "back: %s; programs holding them may now conflict with other hosts",
                      len(records), exc)
            self.my_locks = LockTable()
