"""The coordinator: the metadata owner of the volume.

It executes every metadata operation of every node in one serial order, numbers them (`gseq`,
the index of the event in the coordinator's journal, so never reused across restarts), and
records its copy of each in that journal, which a `Shipper` streams to the replica.

It also owns the **write tokens**. A node must hold a file's token to write it. Before an
operation that changes a file's content or name (truncate, unlink, rename, and handing the token
to another writer), the coordinator recalls the token from whoever holds it (the requesting node
included) and waits until the holder has stopped writing and recorded its writes. So the old
writer's writes carry ``after < gseq`` of the operation and every later write needs a new
`Acquire`, numbered after it: the change of writer is a mark. See docs/architecture.md.

Files are identified by inode number while open (``ino``): another node may rename a file a node
has open, and the coordinator tells the writer the current path when it acquires the token.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..confined import Target
from ..durable import atomic_write
from ..errors import ApplyError, ClusterrepError, InvalidEvent, InvalidLock
from ..events import (
    EVENT_TYPES,
    Acquire,
    Close,
    Create,
    Join,
    Leave,
    Lock,
    MetaEvent,
    Mkdir,
    Open,
    Rename,
    Rmdir,
    SetAttr,
    Symlink,
    Truncate,
    Unlink,
    decode,
    encode,
)
from ..journal import Journal
from ..locks import MAX, FlockType, LockTable, LockType
from ..replica.merger import COORDINATOR

log = logging.getLogger("clusterrep.coordinator")

KINDS: dict[str, type[MetaEvent]] = {
    "create": Create, "open": Open, "close": Close, "mkdir": Mkdir, "rmdir": Rmdir,
    "unlink": Unlink, "rename": Rename, "truncate": Truncate, "setattr": SetAttr,
    "symlink": Symlink,
}


class OpFailed(ClusterrepError):
    """A node's request failed; ``errno`` goes back to the node (and to the application)."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class VolumeNotEmpty(ClusterrepError):
    """The volume holds files but the replica was never synchronised with it."""

    exit_code = 2


@dataclass(frozen=True)
class Options:
    """What a request says beyond the event's fields (see `CoordinatorService.execute`)."""

    ino: Any = None
    noreplace: bool = False
    dir_ino: Any = None
    dst_dir_ino: Any = None


Handler = Callable[[str, str, dict[str, Any], Options], dict[str, Any]]


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
        if not 0 <= req.start <= req.end <= MAX:
            raise InvalidLock(f"lock range [{req.start}, {req.end}] is not within [0, {MAX}]")
        return req
MAX_ORPHANS = 65536

# recall(node, ino) blocks until ``node`` has released the token of ``ino`` (or is gone)
Recaller = Callable[[str, int], None]


class CoordinatorService:
    def __init__(self, volume: str | Path, state: str | Path, *, allow_existing: bool = False,
                 lock_grace: float = 15.0, lease: float = 10.0) -> None:
        self.volume_path = Path(volume)
        if not self.volume_path.is_dir():
            raise ClusterrepError(f"volume {volume} is not a directory",
                                  hint="pass the directory all hosts share with --volume")
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state / "stream")
        if self.journal.next_index == 1 and not allow_existing and any(self.volume_path.iterdir()):
            raise VolumeNotEmpty(
                f"volume {volume} is not empty and this coordinator has never run on it",
                hint="start from an empty volume (initial synchronisation of existing files is "
                     "not implemented yet), or pass --allow-existing if the replica already "
                     "holds an identical copy")
        self.vol = Target(self.volume_path)
        self.gseq = self.journal.next_index - 1
        self.members: set[str] = set()
        members_file = self.state / "members.json"
        if members_file.exists():
            self.members = set(json.loads(members_file.read_text()))
        self.paths: dict[int, str] = {}  # ino -> current path, for files opened for writing
        # inodes whose last name went while tracked: known to have no path (a node may still
        # hold them open), so asking for their path costs no search of the volume
        self.orphans: OrderedDict[int, None] = OrderedDict()
        self.holders: dict[int, str] = {}  # ino -> node holding the write token
        self.recalling: dict[int, threading.Event] = {}  # ino -> set when its recall is over
        self.lock = threading.RLock()
        # answers to operations already executed, by op_id: a node that retries an operation
        # after a lost reply or a coordinator restart gets the same answer, and it runs once
        self.done: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._inflight: dict[str, threading.Event] = {}
        self._intent_open = False
        self.recaller: Recaller | None = None
        # leases: a node's tokens and locks are its own while it renews them (any request
        # renews); only once a silent node's lease ran out may they go to another node
        self.lease = lease
        self.started = time.monotonic()
        self.seen: dict[str, float] = {}  # node -> monotonic time of its last request
        self.incarnations: dict[str, str] = {}  # node -> the process (op_id prefix) that joined
        # file locks of every host (not journaled: after a restart their holders reclaim them
        # within the grace period, during which no new lock is granted, as in NFSv4)
        self.locks = LockTable()
        self.lock_waiters: dict[int, set[str]] = {}  # ino -> nodes waiting for a lock on it
        self.last_locker: dict[int, str] = {}  # ino -> node granted the last lock on it
        self.on_unlock: Callable[[set[str], int], None] | None = None  # wakes waiting nodes
        restarted = self.journal.next_index > 1
        self.grace_until = time.monotonic() + lock_grace if restarted and self.members else 0.0
        self.reclaimed: set[str] = set()
        self.on_record: Callable[[], None] | None = None  # wakes the shipper
        self.ops = 0
        self._handlers = self._handler_table()
        self._remember_journal()
        self._recover_intent()

    # -- intent: an operation between its volume change and its journal record ---------------

    def _intent(self, cls: type[MetaEvent], node: str, op_id: str, f: dict[str, Any]) -> None:
        """Durably note the operation about to change the volume (lock held), so that a crash
        between the change and the journal record is completed on restart, not lost."""
        data = json.dumps({"kind": cls.KIND, "node": node, "op_id": op_id, "fields": f})
        fd = os.open(self.state / "intent.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, data.encode("utf-8", "surrogateescape"))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._intent_open = True

    def _intent_done(self) -> None:
        if self._intent_open:
            os.truncate(self.state / "intent.json", 0)
            self._intent_open = False

    def _recover_intent(self) -> None:
        """After a crash: an operation noted but not journaled is recorded if its effect is on
        the volume (it ran), and forgotten if not (it did not run; the node's retry runs it)."""
        path = self.state / "intent.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        if not raw:
            return
        try:
            intent = json.loads(raw.decode("utf-8", "surrogateescape"))
            cls = EVENT_TYPES[intent["kind"]]
            node, op_id, f = intent["node"], intent["op_id"], intent["fields"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable intent record (torn while being written)")
            os.truncate(path, 0)
            return
        if f"{node}/{op_id}" not in self.done and self._took_effect(cls, f):
            if cls in (Create, Mkdir):  # the crash may have come before the mode was set
                self.vol.setattr(f["path"], f.get("mode", 0o644 if cls is Create else 0o755),
                                 None, None)
            reply = self._done(cls, node, op_id, f)  # type: ignore[arg-type]
            self.journal.sync()
            self._remember(f"{node}/{op_id}", reply)
            log.warning("completed %s by %s, which ran on the volume just before a crash",
                        cls.__name__, node)
        os.truncate(path, 0)

    def _took_effect(self, cls: type[MetaEvent], f: dict[str, Any]) -> bool:
        def exists(p: str) -> bool:
            try:
                self.vol.lstat(p)
                return True
            except (OSError, ApplyError):
                return False

        if cls in (Create, Mkdir, Symlink):
            return exists(f["path"])
        if cls in (Unlink, Rmdir):
            return not exists(f["path"])
        if cls is Rename:
            return not exists(f["path"]) and exists(f["dst"])
        return cls in (Truncate, SetAttr)  # idempotent: recording them again is harmless

    def _remember_journal(self) -> None:
        """Rebuild ``done`` from the events still in the journal (after a restart)."""
        start = self.journal.first_index
        while start < self.journal.next_index:
            records = self.journal.read(start, max_bytes=16 << 20)
            for _, raw in records:
                ev = decode(raw)
                if isinstance(ev, MetaEvent) and not isinstance(ev, Lock):
                    # (a lock granted before a restart is not in the new lock table: a retry
                    # of its request must run again, not be told it was granted)
                    reply: dict[str, Any] = {"gseq": ev.gseq, "event": raw}
                    if isinstance(ev, Acquire):
                        reply["path"] = ev.path
                    self._remember(f"{ev.origin}/{ev.op_id}", reply)
            start = records[-1][0] + 1

    def _remember(self, op_id: str, reply: dict[str, Any]) -> None:
        self.done[op_id] = reply
        while len(self.done) > 200_000:
            self.done.popitem(last=False)

    def once(self, op_id: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a node's operation at most once per ``op_id`` ("node/op_id"); a retry gets the
        first answer."""
        while True:
            with self.lock:
                reply = self.done.get(op_id)
                if reply is not None:
                    return self._refresh(reply)
                running = self._inflight.get(op_id)
                if running is None:
                    self._inflight[op_id] = threading.Event()
                    break
            running.wait(60)  # the same operation is still running: take its answer
        try:
            reply = run()
            if reply.get("event") is not None:
                with self.lock:
                    self._remember(op_id, reply)
            return reply
        finally:
            with self.lock:
                self._inflight.pop(op_id).set()

    def _refresh(self, reply: dict[str, Any]) -> dict[str, Any]:
        """A remembered answer; after a restart, create/open answers lack the inode: look it up."""
        if "ino" not in reply and reply.get("event"):
            ev = decode(reply["event"])
            if isinstance(ev, (Create, Open)):
                ino = self._ino_of(ev.path)
                if ino is not None:
                    reply = {**reply, "ino": ino}
        return reply

    def close(self) -> None:
        self.vol.close()
        self.journal.close()

    # -- recording ---------------------------------------------------------------------------

    def _record(self, cls: type[MetaEvent], origin: str, op_id: str, **fields: Any) -> MetaEvent:
        """Number and journal an event (lock held). The caller syncs before replying."""
        g = self.gseq + 1
        ev = cls(source=COORDINATOR, seq=g, wall=time.time_ns(), gseq=g, op_id=op_id,
                 origin=origin, **fields)
        index = self.journal.append([encode(ev)])
        self._intent_done()
        if index != g:  # pragma: no cover - journal invariant
            raise ClusterrepError(f"coordinator journal index {index} != gseq {g}")
        self.gseq = g
        self.ops += 1
        return ev

    def _durable(self) -> None:
        self.journal.sync()
        if self.on_record is not None:
            self.on_record()

    def _validate(self, cls: type[MetaEvent], origin: str, op_id: str, fields: dict[str, Any]) -> None:
        try:
            cls(source=COORDINATOR, seq=1, gseq=1, op_id=op_id, origin=origin, **fields)
        except InvalidEvent as exc:
            raise OpFailed(str(exc), errno.EINVAL) from None  # nothing executed
        except TypeError as exc:
            raise OpFailed(f"bad fields for {cls.__name__}: {exc}", errno.EINVAL) from None

    # -- leases ------------------------------------------------------------------------------

    def renew(self, node: str) -> None:
        """``node`` sent a request: it is alive, its lease runs again from now."""
        self.seen[node] = time.monotonic()

    def lease_left(self, node: str) -> float:
        """Seconds until ``node``'s lease ends (<= 0: ended; its tokens and locks may go)."""
        return self.lease - (time.monotonic() - self.seen.get(node, self.started))

    def expire(self, node: str, why: str) -> None:
        """Take every token and lock from ``node`` (its lease ended, or it restarted)."""
        with self.lock:
            tokens = [i for i, h in self.holders.items() if h == node]
            for ino in tokens:
                del self.holders[ino]
            held = self.locks.held_by(node)
        self.release_locks(node)
        if tokens or held:
            log.warning("node %s %s: its %d write token(s) and %d lock(s) are free for others",
                        node, why, len(tokens), len(held))

    # -- membership --------------------------------------------------------------------------

    def join(self, node: str, op_id: str, incarnation: str | None = None) -> MetaEvent | None:
        """``node`` starts (``incarnation``: this process of it). A new process of a member
        inherits nothing: tokens and locks of the one before it are freed."""
        previous = self.incarnations.get(node)
        if incarnation is not None:
            self.incarnations[node] = incarnation
        if previous is not None and incarnation is not None and previous != incarnation:
            self.expire(node, "restarted")
        with self.lock:
            if node in self.members:
                return None
            self._validate(Join, node, op_id, {})
            ev = self._record(Join, node, op_id)
            self.members.add(node)
            atomic_write(self.state / "members.json", json.dumps(sorted(self.members)).encode())
        self._durable()
        log.info("node %s joined at gseq %d", node, ev.gseq)
        return ev

    def leave(self, node: str, op_id: str) -> MetaEvent | None:
        with self.lock:
            if node not in self.members:
                return None
            ev = self._record(Leave, node, op_id)
            self.members.discard(node)
            for ino in [i for i, h in self.holders.items() if h == node]:
                del self.holders[ino]
            for ino in self.locks.release_node(node):
                self._wake(ino)
            atomic_write(self.state / "members.json", json.dumps(sorted(self.members)).encode())
        self._durable()
        return ev

    def node_gone(self, node: str) -> None:
        """The node's control link broke. It may still be alive and writing (a link can break
        on one side only): its tokens and locks stay its own until its lease ends; a recall
        that finds no link waits for that."""
        log.info("node %s: control link gone; its tokens and locks stay until its lease ends "
                 "(%.1f s left)", node, max(0.0, self.lease_left(node)))

    # -- tokens ------------------------------------------------------------------------------

    def _free(self, inos: Callable[[], list[int]], action: Callable[[], Any]) -> Any:
        """Run ``action`` under the lock once no node holds a token of ``inos()``."""
        while True:
            with self.lock:
                busy = [(ino, self.holders[ino]) for ino in inos() if ino in self.holders]
                if not busy:
                    return action()
            for ino, holder in busy:
                self._recall(holder, ino)

    def _recall(self, holder: str, ino: int) -> None:
        """Take the token of ``ino`` back from ``holder`` (lock NOT held). If a recall of it is
        already under way, wait for that one instead. Until the holder answers, it still holds
        the token: nobody else gets it, and the holder cannot be told it still has it."""
        with self.lock:
            if self.holders.get(ino) != holder:
                return
            running = self.recalling.get(ino)
            if running is None:
                done = self.recalling[ino] = threading.Event()
        if running is not None:
            running.wait(60)
            return
        released = False
        try:
            if self.recaller is not None:
                self.recaller(holder, ino)
            released = True
        finally:
            with self.lock:
                if released and self.holders.get(ino) == holder:
                    del self.holders[ino]
                del self.recalling[ino]
            done.set()

    def _forget(self, ino: int) -> None:
        """File ``ino`` lost its name (unlinked, or replaced by a rename); lock held."""
        self.paths.pop(ino, None)
        self.orphans[ino] = None
        while len(self.orphans) > MAX_ORPHANS:
            self.orphans.popitem(last=False)

    def _resolve(self, ino: int, hint: str) -> str | None:
        """The current path of file ``ino`` (None if it no longer has one)."""
        path = self.paths.get(ino)
        if path is not None:
            return path
        if ino in self.orphans:
            return None
        try:
            st = self.vol.lstat(hint)
        except (OSError, ApplyError):
            st = None
        if st is not None and st.st_ino == ino and stat.S_ISREG(st.st_mode):
            self.paths[ino] = hint
            return hint
        for dirpath, _dirs, files in os.walk(self.volume_path):  # rare: a restart lost the map
            for name in files:
                full = os.path.join(dirpath, name)
                if os.lstat(full).st_ino == ino:
                    rel = os.path.relpath(full, self.volume_path)
                    self.paths[ino] = rel
                    return rel
        return None

    def acquire(self, node: str, op_id: str, ino: int, hint: str) -> dict[str, Any]:
        """Make ``node`` the writer of ``ino``. Returns gseq, the current path, and the event."""
        while True:
            with self.lock:
                path = self._resolve(ino, hint)
                if path is None:
                    return {"gone": True, "gseq": self.gseq}
                holder = self.holders.get(ino)
                if holder == node and ino not in self.recalling:
                    return {"gseq": self.gseq, "path": path, "event": None}
                if holder is None:
                    self._validate(Acquire, node, op_id, {"path": path})
                    ev = self._record(Acquire, node, op_id, path=path)
                    self.holders[ino] = node
                    break
            self._recall(holder, ino)
        self._durable()
        return {"gseq": ev.gseq, "path": path, "event": encode(ev)}

    # -- file locks --------------------------------------------------------------------------

    def in_grace(self) -> bool:
        """After a restart, until every member reclaimed its locks (or the grace period ended),
        no new lock is granted: one could take a lock another node still holds."""
        if not self.grace_until:
            return False
        if time.monotonic() >= self.grace_until or self.members <= self.reclaimed:
            self.grace_until = 0.0
            log.info("lock grace period over")
            return False
        return True

    def reclaim(self, node: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        """``node`` (re)connected and says which locks it holds; keep them. Raises
        `ReclaimConflict` (nothing installed) if they clash with locks held by others."""
        with self.lock:
            owned = [{**r, "owner": [node, *list(r.get("owner", []))[1:]]} for r in records]
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
        if previous is None or previous == node:
            return None
        path = self._resolve(req.ino, req.path)
        if path is None:
            return None  # no name: nothing on the replica to order
        return self._record(Lock, node, op_id, path=path)

    def release_locks(self, node: str, inos: list[int] | None = None) -> None:
        """Drop every lock ``node`` holds (it left, or its link and lease are gone)."""
        with self.lock:
            for ino in self.locks.release_node(node):
                self._wake(ino)
            self.reclaimed.discard(node)

    def _wake(self, ino: int) -> None:
        waiters = self.lock_waiters.pop(ino, None)
        if waiters and self.on_unlock is not None:
            self.on_unlock(waiters, ino)

    # -- metadata operations -----------------------------------------------------------------

    def execute(self, node: str, kind: str, op_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Execute one metadata operation for ``node``; raise `OpFailed` with an errno.

        ``fields`` are the event's fields plus options that are not part of the event:
        ``ino`` (the inode the caller means: it must still be the one at ``path``),
        ``dir_ino``/``dst_dir_ino`` (the directory the caller means: it must still be the one
        that holds ``path``/``dst``) and ``noreplace`` (rename: fail with EEXIST if ``dst``
        exists, atomically). Those checks are made in the same locked step as the operation;
        a failed one answers ESTALE (the caller looks again and retries) and changes nothing.
        """
        cls = KINDS.get(kind)
        if cls is None:
            raise OpFailed(f"unknown operation {kind!r}", errno.EINVAL)
        opts = Options(ino=fields.pop("ino", None), noreplace=bool(fields.pop("noreplace", False)),
                       dir_ino=fields.pop("dir_ino", None), dst_dir_ino=fields.pop("dst_dir_ino", None))
        for name in ("atime_ns", "mtime_ns"):
            if fields.get(name) == "now":  # the coordinator's clock, not a node's skewed one
                fields[name] = time.time_ns()
        self._validate(cls, node, op_id, fields)
        try:
            result = self._handlers[cls](node, op_id, fields, opts)
        except ApplyError as exc:
            self._intent_done()  # it failed: nothing happened on the volume
            raise OpFailed(str(exc), exc.errno) from None
        except OSError as exc:
            self._intent_done()
            raise OpFailed(f"{kind} failed: {exc}", exc.errno or errno.EIO) from None
        self._durable()
        return result

    def where(self, ino: int, hint: str) -> str | None:
        """The current path of file ``ino`` (None once it has no name)."""
        with self.lock:
            return self._resolve(ino, hint)

    def _ino_of(self, path: str) -> int | None:
        try:
            st = self.vol.lstat(path)
        except (OSError, ApplyError):
            return None
        return st.st_ino if stat.S_ISREG(st.st_mode) else None

    def _under(self, path: str) -> list[int]:
        return [ino for ino, p in self.paths.items() if p == path or p.startswith(path + "/")]

    def _verify(self, f: dict[str, Any], opts: Options) -> None:
        """The paths the caller computed still lead to what it meant (lock held); ESTALE if not."""
        checks = [(f["path"], opts.ino)]
        checks += [(f[key].rpartition("/")[0], ino)
                   for key, ino in (("path", opts.dir_ino), ("dst", opts.dst_dir_ino))
                   if isinstance(ino, int)]
        for path, ino in checks:
            if not isinstance(ino, int):
                continue
            try:
                found = self.vol.lstat(path).st_ino if path else os.fstat(self.vol.root_fd).st_ino
            except (OSError, ApplyError):
                found = None
            if found != ino:
                raise OpFailed(f"{path or 'the volume root'!r} is no longer inode {ino}: it was "
                               "renamed or removed meanwhile", errno.ESTALE)

    def _truncate(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        path = f["path"]

        def truncate() -> dict[str, Any]:
            self._verify(f, opts)
            self._intent(Truncate, node, op_id, f)
            self.vol.truncate(path, f["size"])
            return self._done(Truncate, node, op_id, f)
        return self._free(lambda: [i for i in [self._ino_of(path)] if i is not None], truncate)

    def _unlink(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        path = f["path"]

        def unlink() -> dict[str, Any]:
            self._verify(f, opts)
            ino = self._ino_of(path)
            self._intent(Unlink, node, op_id, f)
            self.vol.unlink(path, missing_ok=False)
            if ino is not None:
                self._forget(ino)
            return self._done(Unlink, node, op_id, f)
        return self._free(lambda: [i for i in [self._ino_of(path)] if i is not None], unlink)

    def _rename_op(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        return self._free(lambda: self._rename_inos(f["path"], f["dst"]),
                          lambda: self._rename(node, op_id, f, opts))

    def _create(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        with self.lock:
            self._verify(f, opts)
            self._intent(Create, node, op_id, f)
            self.vol.create(f["path"], f.get("mode", 0o644), exist_ok=False)
            ino = self.vol.lstat(f["path"]).st_ino
            self.paths[ino] = f["path"]
            self.orphans.pop(ino, None)
            result = self._done(Create, node, op_id, f)
            self.holders[ino] = node  # the creator holds the token
            result["ino"] = ino
            return result

    def _open(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        with self.lock:
            st = self.vol.lstat(f["path"])
            if not stat.S_ISREG(st.st_mode):
                raise OpFailed(f"{f['path']!r} is not a regular file", errno.EISDIR)
            if isinstance(opts.ino, int) and st.st_ino != opts.ino:
                # the node opened another file under this name than the one there now: its open
                # raced a rename or unlink; it opens again (the order is the coordinator's)
                raise OpFailed(f"{f['path']!r} changed while being opened", errno.ESTALE)
            self.paths[st.st_ino] = f["path"]
            self.orphans.pop(st.st_ino, None)
            result = self._done(Open, node, op_id, f)
            result["ino"] = st.st_ino
            return result

    def _close(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        with self.lock:
            if isinstance(opts.ino, int):
                path = self._resolve(opts.ino, f["path"])
                if path is None:
                    return {"gseq": self.gseq, "event": None}  # unlinked meanwhile
                f = {**f, "path": path}
            return self._done(Close, node, op_id, f)

    def _simple(self, cls: type[MetaEvent], run: Callable[[dict[str, Any]], None]) -> Handler:
        """A handler for an operation that needs no token: note the intent, run, record."""

        def handler(node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
            with self.lock:
                self._verify(f, opts)
                self._intent(cls, node, op_id, f)
                run(f)
                return self._done(cls, node, op_id, f)
        return handler

    def _handler_table(self) -> dict[type[MetaEvent], Handler]:
        vol = self.vol
        return {
            Create: self._create, Open: self._open, Close: self._close,
            Truncate: self._truncate, Unlink: self._unlink, Rename: self._rename_op,
            Mkdir: self._simple(Mkdir, lambda f: vol.mkdir(f["path"], f.get("mode", 0o755),
                                                           exist_ok=False)),
            Rmdir: self._simple(Rmdir, lambda f: vol.rmdir(f["path"], missing_ok=False)),
            Symlink: self._simple(Symlink, lambda f: vol.symlink(f["path"], f["target"],
                                                                 replace=False)),
            SetAttr: self._simple(SetAttr, lambda f: vol.setattr(
                f["path"], f.get("mode"), f.get("atime_ns"), f.get("mtime_ns"))),
        }

    def _done(self, cls: type[MetaEvent], node: str, op_id: str, f: dict[str, Any]) -> dict[str, Any]:
        ev = self._record(cls, node, op_id, **f)
        return {"gseq": ev.gseq, "event": encode(ev)}

    def _rename_inos(self, src: str, dst: str) -> list[int]:
        inos = self._under(src)
        for p in (src, dst):
            ino = self._ino_of(p)
            if ino is not None:
                inos.append(ino)
        return inos

    def _rename(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        self._verify(f, opts)
        noreplace = opts.noreplace
        src, dst = f["path"], f["dst"]
        replaced = self._ino_of(dst)
        if replaced is not None and replaced == self._ino_of(src):
            replaced = None  # a rename onto the same file (itself, or a hard link) does nothing
        self._intent(Rename, node, op_id, f)
        self.vol.rename(src, dst, noreplace=noreplace)
        if replaced is not None:
            self._forget(replaced)
        for ino, p in list(self.paths.items()):
            if p == src:
                self.paths[ino] = dst
            elif p.startswith(src + "/"):
                self.paths[ino] = dst + p[len(src):]
        return self._done(Rename, node, op_id, f)
