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

import contextlib
import errno
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..confined import Target
from ..durable import atomic_write, generation_of, load_json_map
from ..errors import ApplyError, ClusterrepError, InvalidEvent, OpFailed
from ..events import (
    EVENT_TYPES,
    Acquire,
    Create,
    Evict,
    Exchange,
    Join,
    Leave,
    Link,
    Lock,
    MetaEvent,
    Mkdir,
    Mknod,
    Open,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    decode,
    encode,
)
from ..journal import Journal
from ..locks import LockTable
from ..replica.merger import COORDINATOR
from ..timing import pause
from .locking import FileLocking
from .namespace import UNKNOWN, Namespace
from .syncmarks import SyncMarks
from .volumestate import SYNC_HOLDER

log = logging.getLogger("clusterrep.coordinator")



MAX_ORPHANS = 65536
_RESTORE = "restore it from a copy of the coordinator's state directory"


def _load_epochs(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise ClusterrepError(f"{path} is damaged", hint="restore it or remove it (every node's "
                              "epoch starts again: nodes then drop their tokens and locks)") from None
    return {str(k): int(v) for k, v in raw.items()}

# recall(node, ino) blocks until ``node`` has released the token of ``ino`` (or is gone)
Recaller = Callable[[str, int], None]


class CoordinatorService(SyncMarks, FileLocking, Namespace):
    def __init__(self, volume: str | Path, state: str | Path, *, lock_grace: float = 15.0,
                 lease: float = 10.0) -> None:
        self.volume_path = Path(volume)
        if not self.volume_path.is_dir():
            raise ClusterrepError(f"volume {volume} is not a directory",
                                  hint="pass the directory all hosts share with --volume")
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state / "stream")
        # a volume that already holds files when this coordinator first starts on it: the
        # replica is brought to it by a synchronisation recorded before any operation
        held_data = self.journal.next_index == 1 and any(self.volume_path.iterdir())
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
        self._barrier = False  # a sync's mark is being recorded: no write token is granted
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
        # after a restart: no token or lock changes hands until every member has reclaimed (it
        # has then heard that this is a new coordinator and dropped its tokens) or until no
        # node can still trust what the coordinator before us gave it (a whole lease)
        restarted = self.journal.next_index > 1
        grace = max(lock_grace, lease)
        self.grace_until = time.monotonic() + grace if restarted and self.members else 0.0
        # this process (a node that sees it change drops its tokens and reclaims its locks) and
        # each node's epoch: how often its lease ran out here (kept on disk; a node that sees
        # its epoch change knows its tokens and locks were taken)
        self.incarnation = secrets.token_hex(8)
        # this cluster's incarnation: made at the first start on this state; a volume restored
        # and started with a new coordinator state is a new generation (failover), and members
        # of another one are refused (by this coordinator and by the replica)
        self.generation = generation_of(self.state / "generation", create=True)
        self.epochs: dict[str, int] = _load_epochs(self.state / "epochs.json")
        # nodes removed for good (node -> gseq of its Evict), and per node the files whose write
        # tokens were taken from it when its lease ran out ([ino, path]): what it wrote there
        # and never shipped is compared with the volume if it is evicted
        self.evicted: dict[str, int] = load_json_map(self.state / "evicted.json", hint=_RESTORE)
        self.lost_tokens: dict[str, list[list[Any]]] = load_json_map(self.state / "lost-tokens.json",
                                                                     hint=_RESTORE)
        self.reclaimed: set[str] = set()
        self.expired = 0  # files whose token was taken from a node that went silent
        self.on_record: Callable[[], None] | None = None  # wakes the shipper
        self.ops = 0
        self._handlers = self._handler_table()
        self._remember_journal()
        self._recover_intent()
        root = self._attr("", xattrs=True)
        if self.gseq == 0 and root is not None:  # first start: the replica's root takes the
            # volume root's mode, owner, time and attributes before any operation
            self._record(SetAttr, COORDINATOR, f"coordinator-root-{self.incarnation}", path="",
                         attrs=(root,))
            self.journal.sync()
        if held_data:
            # the volume held files: a synchronisation is recorded before any operation. It is
            # noted in sync.json first, so that a crash while its structure is recorded leaves
            # a sync that `SyncRunner` records again (the journal is no longer empty then)
            reason = "the volume held files when the coordinator first started on it"
            note = {"sync_id": secrets.token_hex(8), "gseq": 0, "reason": reason, "mode": "sync"}
            atomic_write(self.state / "sync.json", json.dumps(note).encode())
            with self.lock:
                note["gseq"] = self._record_start(note["sync_id"], reason)
            self.journal.sync()
            atomic_write(self.state / "sync.json", json.dumps(note).encode())

    # -- intent: an operation between its volume change and its journal record ---------------

    def _intent(self, cls: type[MetaEvent], node: str, op_id: str, f: dict[str, Any],
                extra: dict[str, Any] | None = None) -> None:
        """Durably note the operation about to change the volume (lock held), so that a crash
        between the change and the journal record is completed on restart, not lost. ``extra``:
        what completing it needs beyond the event (a new inode's owner; an exchange's source
        inode, which tells whether it ran)."""
        fields = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in f.items()}
        data = json.dumps({"kind": cls.KIND, "node": node, "op_id": op_id, "fields": fields,
                           "extra": extra or {}})
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
            extra = intent.get("extra") or {}
            if "value" in f:
                f["value"] = bytes.fromhex(f["value"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable intent record (torn while being written)")
            os.truncate(path, 0)
            return
        if f"{node}/{op_id}" not in self.done and self._took_effect(cls, f, extra):
            try:
                self._complete(cls, f, extra)
            except (OSError, ApplyError) as exc:  # it cannot have run: the node's retry runs it
                log.warning("dropping the intent of %s by %s: %s", cls.__name__, node, exc)
                os.truncate(path, 0)
                return
            reply = self._done(cls, node, op_id, f)  # type: ignore[arg-type]
            self.journal.sync()
            self._remember(f"{node}/{op_id}", reply)
            log.warning("completed %s by %s, which ran on the volume just before a crash",
                        cls.__name__, node)
        os.truncate(path, 0)

    def _complete(self, cls: type[MetaEvent], f: dict[str, Any], extra: dict[str, Any]) -> None:
        """Finish an operation a crash interrupted: what may not have run yet runs (again)."""
        if cls in (Create, Mkdir, Mknod, Symlink):  # the crash may have come before its owner
            default = {Create: 0o644, Mkdir: 0o755}.get(cls)
            self._settle(f["path"], None if cls is Symlink else f.get("mode", default),
                         list(extra.get("creds") or []), directory=cls is Mkdir)
        elif cls is SetAttr:  # found by a test: recorded, but never run on the volume
            self.vol.setattr(f["path"], f.get("mode"), f.get("atime_ns"), f.get("mtime_ns"),
                             f.get("uid"), f.get("gid"))
        elif cls is Truncate:  # (no token is out for the file: it was recalled first)
            self.vol.truncate(f["path"], f["size"])

    def _took_effect(self, cls: type[MetaEvent], f: dict[str, Any], extra: dict[str, Any]) -> bool:
        def exists(p: str) -> bool:
            try:
                self.vol.lstat(p)
                return True
            except (OSError, ApplyError):
                return False

        if cls in (Create, Mkdir, Symlink, Mknod):  # made by it, not there before
            return exists(f["path"]) and not extra.get("existed", False)
        if cls is Link:
            return exists(f["dst"]) and exists(f["path"]) and \
                self.vol.lstat(f["dst"]).st_ino == self.vol.lstat(f["path"]).st_ino
        if cls in (Unlink, Rmdir):
            return not exists(f["path"])
        if cls is Rename:
            return not exists(f["path"]) and exists(f["dst"])
        if cls is Exchange:
            return exists(f["path"]) and self.vol.lstat(f["path"]).st_ino != extra.get("ino")
        if cls is SetXattr:  # the value is there (as asked: its flags are no longer checked)
            return self._xattr(f["path"], f["name"]) == f["value"]
        if cls is RemoveXattr:  # it was there, and is gone
            return bool(extra.get("had")) and self._xattr(f["path"], f["name"]) is None
        return cls in (Truncate, SetAttr)  # idempotent: `_complete` runs them (again)

    def _xattr(self, path: str, name: str) -> bytes | None:
        try:
            fd = self.vol.inode(path)
        except (OSError, ApplyError):
            return None
        try:
            return os.getxattr(f"/proc/self/fd/{fd}", name)
        except OSError:
            return None
        finally:
            os.close(fd)

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
        """Take every token and lock from ``node`` (its lease ended, or it restarted), and
        start its next epoch: its next answer tells it so."""
        with self.lock:
            tokens = [i for i, h in self.holders.items() if h == node]
            for ino in tokens:
                del self.holders[ino]
            held = self.locks.held_by(node)
            self.epochs[node] = self.epochs.get(node, 0) + 1
            atomic_write(self.state / "epochs.json", json.dumps(self.epochs).encode())
            if tokens:
                lost = self.lost_tokens.setdefault(node, [])
                lost += [[ino, self.paths.get(ino, "")] for ino in tokens]
                del lost[:-100_000]
                atomic_write(self.state / "lost-tokens.json",
                             json.dumps(self.lost_tokens).encode("utf-8", "surrogateescape"))
            stamped = [self._stamp(ino) for ino in tokens]
        if any(stamped):
            self._durable()
        self.release_locks(node)
        if tokens or held:
            log.warning("node %s %s: its %d write token(s) and %d lock(s) are free for others",
                        node, why, len(tokens), len(held))

    def _stamp(self, ino: int) -> bool:
        """Record the state of file ``ino`` (lock held; nobody holds its token now): its last
        writer may have died before recording the time its writes left (`events.Stamp`)."""
        path = self.paths.get(ino)
        st = self._stat(path) if path else None
        if path is None or st is None or st.st_ino != ino:
            return False
        self.expired += 1
        self._record(SetAttr, COORDINATOR, f"coordinator-expired-{self.incarnation}-{self.expired}",
                     path=path, attrs=self._attrs_for(SetAttr, {"path": path}))
        return True

    # -- membership --------------------------------------------------------------------------

    def evict(self, node: str) -> tuple[int, list[list[Any]]]:
        """Remove ``node`` for good (it never comes back): once its lease has run out, take its
        tokens and locks and record `Evict`. Returns the mark and the files whose write tokens
        it held (``[ino, path]``), whose content the caller has compared with the volume."""
        if node in self.evicted:
            raise ClusterrepError(f"node {node} was evicted already (at gseq {self.evicted[node]})")
        if node not in self.members:
            raise ClusterrepError(f"node {node} is not a member of this cluster",
                                  hint=f"members: {', '.join(sorted(self.members)) or 'none'}")
        left = self.lease_left(node)
        if left > 0:
            log.warning("evicting node %s: waiting %.1f s for its lease to run out (until then it "
                        "may still be writing)", node, left)
            deadline = time.monotonic() + left + 1.0
            while self.lease_left(node) > 0:
                if time.monotonic() > deadline:  # it renewed its lease: it is alive
                    ago = time.monotonic() - self.seen.get(node, self.started)
                    raise ClusterrepError(
                        f"node {node} is alive (heard from {ago:.1f} s ago): not evicted",
                        hint="stop it first; a node is evicted once its lease "
                             f"({self.lease:g} s) has run out without a word from it")
                pause(0.1)
        self.expire(node, "was evicted")
        with self.lock:
            ev = self._record(Evict, node, f"evict-{self.incarnation}-{node}")
            self.members.discard(node)
            atomic_write(self.state / "members.json", json.dumps(sorted(self.members)).encode())
            self.evicted[node] = ev.gseq
            atomic_write(self.state / "evicted.json", json.dumps(self.evicted).encode())
            files = self.lost_tokens.pop(node, [])
            atomic_write(self.state / "lost-tokens.json",
                         json.dumps(self.lost_tokens).encode("utf-8", "surrogateescape"))
        self._durable()
        log.warning("node %s evicted at gseq %d; %d file(s) it was writing are compared with the "
                    "volume", node, ev.gseq, len(files))
        return ev.gseq, files

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

    def epoch(self, node: str) -> int:
        return self.epochs.get(node, 0)

    def wait_for_grace(self) -> None:
        """After a restart, wait until no node can still be writing under a token that the
        coordinator before us gave it (lock NOT held)."""
        while True:
            with self.lock:
                if not self.in_grace():
                    return
            pause(0.05)

    def _free(self, inos: Callable[[], list[int]], action: Callable[[], Any]) -> Any:
        """Run ``action`` under the lock once no node holds a token of ``inos()``."""
        self.wait_for_grace()
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
        if holder == SYNC_HOLDER:
            self.wait_released(ino)
            return
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
        """The current path of file ``ino`` as far as is known cheaply (lock held): from the
        map of open files or the caller's hint; None if it has no name, `UNKNOWN` if neither
        says (then `locate`, without the lock)."""
        path = self.paths.get(ino)
        if path is not None:
            return path
        if ino in self.orphans:
            return None
        try:
            st = self.vol.lstat(hint)
        except (OSError, ApplyError):
            st = None
        if st is not None and st.st_ino == ino and not stat.S_ISDIR(st.st_mode):
            # (a regular file, or a hard-linked FIFO, socket, device or symlink)
            self.paths[ino] = hint
            return hint
        return UNKNOWN

    def locate(self, ino: int, hint: str) -> str | None:
        """The current path of inode ``ino`` (not a directory) or None once it has no name
        (lock NOT held: when nothing cheaper knows, this searches the volume, which must not
        stop other work). A name found while others rename it is looked for again, at most
        three times; then the last name found is the answer (the caller's operation checks it
        in the same step as it acts, and asks again if it moved)."""
        with self.lock:
            path = self._resolve(ino, hint)
        if path is not UNKNOWN:
            return path
        found: str | None = None
        for _ in range(3):
            found = self._search(ino)
            if found is None:
                return None
            with self.lock:
                path = self._resolve(ino, found)
            if path is not UNKNOWN:
                return path
        return found

    def _search(self, ino: int) -> str | None:
        """Walk the volume for a name of ``ino`` (rare: a restart lost the map, or the name a
        node knew went while another is left)."""
        for dirpath, _dirs, files in os.walk(self.volume_path):
            for name in files:
                full = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    if os.lstat(full).st_ino == ino:
                        return os.path.relpath(full, self.volume_path)
        return None

    def acquire(self, node: str, op_id: str, ino: int, hint: str) -> dict[str, Any]:
        """Make ``node`` the writer of ``ino``. Returns gseq, the current path, and the event."""
        self.wait_for_grace()
        while True:
            where = self.locate(ino, hint)
            if where is None:
                return {"gone": True, "gseq": self.gseq}
            with self.lock:
                path = self._resolve(ino, where)
                if path is UNKNOWN:
                    continue  # moved since we looked: look again
                if path is None:
                    return {"gone": True, "gseq": self.gseq}
                holder = self.holders.get(ino)
                if holder == node and ino not in self.recalling:
                    return {"gseq": self.gseq, "path": path, "event": None}
                if self._barrier:
                    holder = None
                elif holder is None:
                    self._validate(Acquire, node, op_id, {"path": path})
                    ev = self._record(Acquire, node, op_id, path=path)
                    self.holders[ino] = node
                    break
            if holder is None:  # a sync's mark is being recorded: ask again after it
                pause(0.01)
                continue
            self._recall(holder, ino)
        self._durable()
        return {"gseq": ev.gseq, "path": path, "event": encode(ev)}
