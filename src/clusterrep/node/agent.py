"""The node agent's core, independent of FUSE: recording, stamping, tokens, metadata calls.

Rules it keeps (docs/architecture.md, "Rules the nodes and the coordinator follow"):

* every event goes to the spool with the next ``seq``; data events carry ``after`` = the highest
  gseq this node knows, and that value is raised *before* anything else is recorded once a reply
  or push tells us a higher one;
* a data write happens under the file's lock, together with its record, and only while the node
  holds the file's write token; a recall takes the same lock, so once the node answers "released"
  every write it made to that file is recorded;
* a metadata operation's own copy is recorded when the coordinator's reply arrives (possibly
  after other threads' events: the merger does not mind);
* the modification time a node's writes leave on a file is recorded (a `Stamp`) while the node
  still holds the file's token and lock: once its writes went quiet (`QUIET` seconds), when the
  last handle that wrote is closed, and before the token goes back to the coordinator. So the
  next writer's writes, and their stamp, come after it on the replica.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import wire
from ..confined import fallocate
from ..durable import generation_of, record_generation
from ..errors import ClusterrepError
from ..events import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Event,
    Fallocate,
    MetaEvent,
    Stamp,
    Tick,
    decode,
    encode,
    encode_write,
    repath,
)
from ..journal import Journal
from ..locks import LockTable
from ..shipper import Shipper
from ..timing import pause
from .activity import EXTENT, ActivityLog
from .client import ControlLink, CoordinatorClient
from .locking import NodeLocking

log = logging.getLogger("clusterrep.node")

# When an application's write returns (compare DRBD's protocols A, B, C):
#   async      the event is in the spool (page cache); the activity log repairs after a crash
#   local      the event is fsync'd in the node's spool
#   received   the replica has the event in memory
#   replicated the replica has fsync'd the event: losing the node loses nothing
ACK_LEVELS = ("async", "local", "received", "replicated")
LEASE_MARGIN = 0.75  # a node trusts its lease for this part of it (see NodeAgent.lease_valid)
QUIET = 0.5  # seconds without a write after which a file's modification time is recorded


def _write_unrecorded(fd: int, data: bytes, offset: int, append: bool) -> int:
    """A write to a file without a name on the volume: nothing can show it, nothing records it."""
    return os.pwrite(fd, data, os.fstat(fd).st_size if append else offset)


@dataclass(frozen=True)
class NodeOptions:
    """How a node agent behaves; built and checked by the CLI (`clusterrep node`).

    ``ack``: when an application's write returns (`ACK_LEVELS`); ``ack_timeout`` (s): how long
    ``received``/``replicated`` wait for the replica before falling back to local fsync;
    ``spool_limit`` (bytes) and ``on_spool_full`` (``block``/``fail``): back-pressure;
    ``coordinator_timeout`` (s): how long an operation waits for an unreachable coordinator
    before it fails with EIO; ``volume``: the volume directory (needed to repair after a crash).
    Raises ValueError for a value out of range.
    """

    volume: str | Path | None = None
    ack: str = "async"
    ack_timeout: float = 30.0
    spool_limit: int = 8 << 30
    on_spool_full: str = "block"
    coordinator_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.ack not in ACK_LEVELS:
            raise ValueError(f"unknown acknowledgement level {self.ack!r}; one of "
                             f"{', '.join(ACK_LEVELS)}")
        if self.on_spool_full not in ("block", "fail"):
            raise ValueError(f"on_spool_full must be block or fail, not {self.on_spool_full!r}")
        if not 0 < self.coordinator_timeout <= 86400:
            raise ValueError(f"coordinator timeout must be 0 < seconds <= 86400, not "
                             f"{self.coordinator_timeout:g}")


class NodeAgent(NodeLocking):
    def __init__(self, name: str, coordinator: str, replica: str, state: str | Path,
                 auth: wire.Auth | bytes, options: NodeOptions | None = None) -> None:
        opts = options if options is not None else NodeOptions()
        self.name = name
        self.ack = opts.ack
        self.ack_timeout = opts.ack_timeout
        self.degraded = False  # an ack level could not be met in time (replica away)
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.volume = Path(opts.volume) if opts.volume is not None else None
        self.spool_limit = opts.spool_limit
        self.on_spool_full = opts.on_spool_full
        self.spool_full = False
        # the cluster generation this node's state belongs to (learnt at its first join)
        self.generation = generation_of(self.state / "generation", create=False)
        self.spool = Journal(self.state / "spool",
                             segment_bytes=max(64 << 10, min(64 << 20, self.spool_limit // 8)))
        self.activity = ActivityLog(self.state / "activity.log")
        self._retirer = threading.Thread(target=self._retire_loop, name="activity", daemon=True)
        self._renewer = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self.lease = 10.0  # seconds; the coordinator's, from the join reply
        self._lease_lost = False
        self._stopping = threading.Event()
        self.client = CoordinatorClient(coordinator, auth, name, wait_for=opts.coordinator_timeout)
        self.client.on_reply = self._check_reply
        self._coordinator_process: str | None = None  # the coordinator process we talk to
        self._epoch: int | None = None  # our epoch there (changes when our lease ran out)
        self.control = ControlLink(coordinator, auth, name, on_recall=self._recalled,
                                   on_gseq=self.learn, on_down=self._drop_tokens,
                                   on_unlocked=self.lock_released, on_up=self._reclaim)
        # a writer waiting for the replica's ack must not wait for a batch to fill
        linger = 0.0 if self.ack in ("received", "replicated") else 0.002
        self.shipper = Shipper(self.spool, replica, auth, name=name, role="node", linger=linger,
                               unsettled=self.unsettled, generation=lambda: self.generation)
        # files written since their time was last recorded: ino -> [a descriptor of the file
        # (to read its time when nothing else has it open), monotonic time of the last write]
        self._unstamped: dict[int, list[Any]] = {}
        self._stamper = threading.Thread(target=self._stamp_loop, name="stamp", daemon=True)
        self.known = 0
        self._ticked = 0
        self._joined = False  # no tick may precede our Join copy (the replica would refuse it)
        # recalls by file, so a grant whose reply arrives after a recall of it is not believed
        self._recall_seq = 0
        self._recalled_at: dict[int, int] = {}
        self._rec = threading.Lock()
        self._tokens: set[int] = set()
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.my_locks = LockTable()  # the file locks this node holds (a copy of the coordinator's)
        self._lock_wake = threading.Condition()  # notified when the coordinator says "unlocked"
        self._unlocks_seen = 0
        self.paths: dict[int, str] = {}  # ino -> current volume path, as the coordinator says
        self.orphans: set[int] = set()  # open files without a name on the volume
        self._ops = itertools.count(1)
        self._op_prefix = f"{name}-{time.time_ns():x}"
        self.writes = 0
        self.bytes_written = 0

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Join the cluster (once per node lifetime) and start shipping and control."""
        self.shipper.start()
        self.control.start()
        deadline = time.monotonic() + timeout
        self.join_cluster(deadline)
        if not self.control.up.wait(max(0.0, deadline - time.monotonic())):
            raise OSError(errno.ETIMEDOUT, "control link to the coordinator did not come up")
        if self.activity.recovered:
            self._repair(self.activity.recovered)
        self._retirer.start()
        self._renewer.start()
        self._stamper.start()

    def join_cluster(self, deadline: float) -> None:
        """Ask the coordinator to let this process in (retrying until ``deadline``, monotonic);
        record the `Join` copy first, as a node's stream must begin."""
        while True:
            try:
                reply = self.client.call("join", op_id=self._op_id(), incarnation=self._op_prefix,
                                         generation=self.generation)
                break
            except OSError as exc:
                if exc.errno == errno.EPERM and ("evicted" in str(exc) or "generation" in str(exc)):
                    raise ClusterrepError(str(exc).removeprefix("[Errno 1] ")) from None
                if time.monotonic() > deadline:
                    raise
                log.info("waiting for the coordinator: %s", exc)
                pause(0.5)
        if self.generation is None and isinstance(reply.get("generation"), str):
            self.generation = reply["generation"]
            record_generation(self.state / "generation", self.generation)
        if reply.get("event"):
            self._record_copy(reply["event"])
        self.lease = float(reply.get("lease", self.lease))
        self._joined = True
        self.learn(int(reply["gseq"]))

    def stop(self, drain_timeout: float = 10.0, *, leave: bool = True) -> None:
        """Stop after the file system is unmounted.

        With ``leave`` the node leaves the cluster cleanly (its `Leave` copy is the last event of
        its stream), so the replica stops waiting for it; a node that crashed stays a member and
        the replica waits for what it may still have to ship. Then the shipper gets
        ``drain_timeout`` seconds to ship what is captured.
        """
        for ino in list(self._unstamped):
            self.settle(ino)  # (unmounted: nothing writes any more)
        self._stopping.set()
        self.control.stop()  # no more ticks or recalls from here on
        if leave:
            self.activity.close_clean()  # unmounted: no write is in flight
            try:
                reply = self.client.call("leave", op_id=self._op_id(), patience=max(drain_timeout, 1.0))
                with self._rec:
                    self.known = max(self.known, int(reply["gseq"]))
                if reply.get("event"):
                    self._record_copy(reply["event"])
            except OSError as exc:
                log.warning("could not leave the cluster cleanly (%s); the replica will wait for "
                            "this node until it runs again", exc)
        deadline = time.monotonic() + drain_timeout
        while self.shipper.backlog > 0 and self.shipper.connected and time.monotonic() < deadline:
            pause(0.05)
        if self.shipper.backlog > 0:
            log.warning("%d events not yet on the replica stay in the spool %s; they are shipped "
                        "when this node starts again", self.shipper.backlog, self.state / "spool")
        self.client.close()
        self.shipper.stop()
        self.spool.sync()
        self.spool.close()

    # -- recording ---------------------------------------------------------------------------

    def _op_id(self) -> str:
        return f"{self._op_prefix}-{next(self._ops)}"

    def _append(self, make: Any) -> Event:
        with self._rec:
            ev = make(self.spool.next_index)
            self.spool.append([encode(ev)])
        self.shipper.notify()
        return ev

    def _append_write(self, path: str, offset: int, data: bytes) -> int:
        """Record a write (the hot path: encoded directly, no event object); return its seq."""
        with self._rec:
            self._ticked = self.known  # this event shows what we know: no tick needed
            seq = self.spool.append([encode_write(self.name, self.spool.next_index, time.time_ns(),
                                                  self.known, path, offset, data)])
        self.shipper.notify()
        return seq

    def _acknowledge(self, seq: int) -> None:
        """Hold the application's write until the node's acknowledgement level is met."""
        if self.ack == "async":
            return
        if self.ack == "local":
            self.spool.sync()  # group commit: concurrent writers share one fsync
            return
        if self.degraded and not self.shipper.connected:
            self.spool.sync()  # still no replica: do not wait for it on every write
            return
        if self.shipper.wait_for(seq, durable=self.ack == "replicated", timeout=self.ack_timeout):
            if self.degraded:
                log.warning("the replica acknowledges again: back to --ack %s", self.ack)
                self.degraded = False
            return
        if not self.degraded:
            log.warning("the replica did not acknowledge within %g s: writes return once their "
                        "events are fsync'd locally until it is back (nothing is dropped)",
                        self.ack_timeout)
            self.degraded = True
        self.spool.sync()

    def learn(self, g: int) -> None:
        """The coordinator told us gseq ``g`` exists; stamp everything from now on with it."""
        tick = False
        with self._rec:
            if g > self.known:
                self.known = g
            if self._joined and self.known > self._ticked:
                self._ticked = self.known
                tick = True
        if tick:
            self._append(lambda seq: Tick(source=self.name, seq=seq, wall=time.time_ns(),
                                          after=self.known))

    def _record_copy(self, raw: bytes) -> MetaEvent:
        ev = decode(raw)
        assert isinstance(ev, MetaEvent)

        def copy(seq: int) -> MetaEvent:
            self._ticked = max(self._ticked, ev.gseq)  # the copy shows gseq: no tick needed
            return dataclasses.replace(ev, source=self.name, seq=seq, wall=time.time_ns())
        return self._append(copy)  # type: ignore[return-value]

    def _learn_reply(self, reply: dict[str, Any]) -> None:
        """Raise what we know to the reply's gseq (before anything else is recorded) and record
        the copy of its event, if any."""
        with self._rec:
            self.known = max(self.known, int(reply["gseq"]))
        if reply.get("event"):
            self._record_copy(reply["event"])
        self.learn(int(reply["gseq"]))

    # -- metadata ----------------------------------------------------------------------------

    def meta(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Run a metadata operation through the coordinator; record our copy. OSError on failure."""
        before = self._recall_mark()
        reply = self.client.call("meta", kind=kind, op_id=self._op_id(), fields=fields)
        with self._rec:  # raise known before this thread or any other records more
            self.known = max(self.known, int(reply["gseq"]))
        if reply.get("event"):
            self._record_copy(reply["event"])
        self.learn(int(reply["gseq"]))
        if kind == "create" and isinstance(reply.get("ino"), int):
            ino = reply["ino"]
            self.paths[ino] = fields["path"]
            self._granted(ino, before)  # the creator holds the token
        elif kind == "open" and isinstance(reply.get("ino"), int):
            self.paths[reply["ino"]] = fields["path"]  # the coordinator's word, as of now
        elif kind == "rename":
            repath(self.paths, fields["path"], fields["dst"])
        elif kind == "exchange":
            repath(self.paths, fields["path"], fields["dst"], exchange=True)
        return reply

    def where(self, ino: int, hint: str) -> str | None:
        """The current volume path of file ``ino``, or None once it has no name."""
        reply = self.client.call("where", ino=ino, path=hint, op_id=self._op_id())
        path = reply.get("path")
        return path if isinstance(path, str) else None

    def orphaned(self, ino: int) -> None:
        """File ``ino`` has no name on the volume: writes to it are not recorded (nothing on
        the volume can show them) and need no token. Until `released` for it."""
        self.orphans.add(ino)

    def released(self, ino: int) -> None:
        """This node no longer has ``ino`` open (its number may be reused for a new file)."""
        self.orphans.discard(ino)

    # -- tokens and writes -------------------------------------------------------------------

    def lock(self, ino: int) -> threading.Lock:
        lk = self._locks.get(ino)
        if lk is not None:
            return lk
        with self._locks_guard:
            return self._locks.setdefault(ino, threading.Lock())

    def _recall_mark(self) -> int:
        with self._locks_guard:
            return self._recall_seq

    def _recalled(self, ino: int) -> None:
        with self.lock(ino):
            self._stamp_locked(ino)  # the next writer's writes come after our time
            self._tokens.discard(ino)
            with self._locks_guard:
                self._recall_seq += 1
                self._recalled_at[ino] = self._recall_seq

    def _granted(self, ino: int, before: int) -> bool:
        """Take the token granted by a reply, unless a recall of it overtook the reply (the
        coordinator answers after its fsync, so a recall for the next writer can come first)."""
        with self.lock(ino):
            with self._locks_guard:
                overtaken = self._recalled_at.get(ino, 0) > before
            if not overtaken:
                self._tokens.add(ino)
            return not overtaken

    def _drop_tokens(self) -> None:
        for ino in list(self._tokens):
            with self.lock(ino):
                self._stamp_locked(ino)
                self._tokens.discard(ino)

    def _acquire(self, ino: int, hint: str) -> str | None:
        before = self._recall_mark()
        reply = self.client.call("acquire", ino=ino, path=hint, op_id=self._op_id())
        with self._rec:
            self.known = max(self.known, int(reply["gseq"]))
        if reply.get("gone"):
            return None
        if reply.get("event"):
            self._record_copy(reply["event"])
        self.paths[ino] = reply["path"]
        self._granted(ino, before)  # if overtaken, the writer simply asks again
        self.learn(int(reply["gseq"]))
        return str(reply["path"])

    def _room(self) -> None:
        """Back-pressure: with the spool at its limit, block (or fail with ENOSPC) until the
        replica has taken enough that the spool shrinks below it."""
        if self.spool.bytes_total < self.spool_limit:
            if self.spool_full:
                self.spool_full = False
                log.warning("spool below its limit again: writes proceed")
            return
        if not self.spool_full:
            self.spool_full = True
            log.warning("spool %s reached its limit of %d bytes (replica away or slow): writes %s",
                        self.state / "spool", self.spool_limit,
                        "fail with ENOSPC" if self.on_spool_full == "fail" else "wait")
        if self.on_spool_full == "fail":
            raise OSError(errno.ENOSPC, "clusterrep spool full: the replica has not taken what "
                                        "this node captured")
        while self.spool.bytes_total >= self.spool_limit and not self._stopping.is_set():
            self._stopping.wait(0.05)

    def write(self, ino: int, hint: str, fd: int, data: bytes, offset: int, *,
              append: bool = False) -> int:
        """Write to the backing file and record it, holding the token and the file's lock.

        With ``append`` the data goes to the end of the file as the volume has it (``offset``
        is ignored): the token makes appends of all hosts one serial order, so none overwrites
        another's.
        """
        self._room()
        fenced = False
        while True:
            if fenced:
                self._fence()  # (not under the file's lock: it takes every file's)
                fenced = False
            if ino in self.orphans:
                return _write_unrecorded(fd, data, offset, append)
            if ino not in self._tokens:
                path = self._acquire(ino, self.paths.get(ino, hint))
                if path is None:
                    # the file was deleted on the volume: write to the orphan, record nothing
                    self.orphaned(ino)
                    return _write_unrecorded(fd, data, offset, append)
            with self.lock(ino):
                if ino not in self._tokens:
                    continue  # recalled between acquire and lock: ask again
                if not self.lease_valid():
                    fenced = True  # the coordinator may give the file to another host now
                    self._tokens.discard(ino)
                    continue
                if append:
                    offset = os.fstat(fd).st_size
                self.activity.activate(ino, self.paths[ino], offset, len(data))
                n = os.pwrite(fd, data, offset)
                seq = 0
                if n:
                    seq = self._append_write(self.paths[ino], offset, data if n == len(data) else data[:n])
                    self.writes += 1
                    self.bytes_written += n
                    self._wrote(ino, fd)
            if seq:
                self._acknowledge(seq)  # outside the file's lock: a recall must not wait on it
            return n

    def fallocate(self, ino: int, hint: str, fd: int, mode: int, offset: int, length: int) -> None:
        """``fallocate`` on the backing file and record it, like `write` (token and lock held)."""
        self._room()
        while True:
            if ino in self.orphans:
                fallocate(fd, mode, offset, length)
                return
            if ino not in self._tokens:
                path = self._acquire(ino, self.paths.get(ino, hint))
                if path is None:
                    self.orphaned(ino)
                    continue
            with self.lock(ino):
                if ino not in self._tokens:
                    continue
                if not self.lease_valid():
                    self._tokens.discard(ino)
                    self._fence()
                    continue
                fallocate(fd, mode, offset, length)
                seq = self._append(lambda s, path=self.paths[ino]: Fallocate(
                    source=self.name, seq=s, wall=time.time_ns(), after=self.known, path=path,
                    offset=offset, length=length, mode=mode)).seq
                self._wrote(ino, fd)
            self._acknowledge(seq)
            return

    # -- modification times ------------------------------------------------------------------

    def unsettled(self) -> int:
        """Files written whose modification time is not recorded yet."""
        return len(self._unstamped)

    def _wrote(self, ino: int, fd: int) -> None:
        """A write to ``ino`` through ``fd`` was recorded (file lock held)."""
        entry = self._unstamped.get(ino)
        if entry is None:
            self._unstamped[ino] = [os.dup(fd), time.monotonic()]
        else:
            entry[1] = time.monotonic()

    def _stamp_locked(self, ino: int) -> None:
        """Record the time our writes left on ``ino`` (file lock held, token still ours)."""
        entry = self._unstamped.pop(ino, None)
        if entry is None:
            return
        try:
            mtime = os.fstat(entry[0]).st_mtime_ns
        finally:
            os.close(entry[0])
        path = self.paths.get(ino)
        if ino in self._tokens and path and ino not in self.orphans:
            self._append(lambda s: Stamp(source=self.name, seq=s, wall=time.time_ns(),
                                         after=self.known, path=path, mtime_ns=mtime))

    def settle(self, ino: int) -> None:
        """Record ``ino``'s modification time now (its last writing handle was closed)."""
        if ino in self._unstamped:
            with self.lock(ino):
                self._stamp_locked(ino)

    def _stamp_loop(self) -> None:
        while not self._stopping.wait(QUIET / 4):
            now = time.monotonic()
            for ino, entry in list(self._unstamped.items()):
                if now - entry[1] >= QUIET:
                    with self.lock(ino):
                        if ino in self._unstamped and now - self._unstamped[ino][1] >= QUIET:
                            self._stamp_locked(ino)

    # -- lease (fencing) ---------------------------------------------------------------------

    def lease_valid(self) -> bool:
        """Is our lease surely still running at the coordinator? It counts from when the newest
        answered request was *sent*, and we stop a quarter early: the coordinator counts from
        when it received it, so we have stopped writing before it gives our files away."""
        return time.monotonic() < self.client.alive_at + self.lease * LEASE_MARGIN

    def _check_reply(self, reply: dict[str, Any]) -> None:
        """Every answer names the coordinator process and our epoch. A new process knows none
        of our tokens: drop them, and make the control link connect to it (reclaiming our
        locks). A new epoch means our lease ran out there: our tokens and locks were taken."""
        coord, epoch = reply.get("coord"), reply.get("epoch")
        if isinstance(coord, str) and coord != self._coordinator_process:
            if self._coordinator_process is not None:
                log.warning("the coordinator restarted: write tokens dropped, file locks are "
                            "reclaimed")
                self._drop_tokens()
                self.control.reconnect()
            self._coordinator_process = coord
        if isinstance(epoch, int) and epoch != self._epoch:
            if self._epoch is not None:
                lost = self.my_locks.held_by(self.name)
                log.error("the coordinator took this node's write tokens and %d file lock(s) "
                          "when its lease ran out (it was silent too long); writes go on after "
                          "getting the tokens again, and programs that held those locks no "
                          "longer do", len(lost))
                self._drop_tokens()
                self.my_locks = LockTable()
            self._epoch = epoch

    def _fence(self) -> None:
        """Our lease may have run out: drop every token (writes wait for the coordinator to
        grant them again, then fail with EIO after --coordinator-timeout)."""
        if not self._lease_lost:
            self._lease_lost = True
            log.warning("lease with the coordinator expired (no answer for %.1f s): this node "
                        "stops writing until the coordinator answers again; its file locks may "
                        "be given to other hosts", time.monotonic() - self.client.alive_at)
        self._drop_tokens()

    def _renew_loop(self) -> None:
        """Keep the lease: renew whenever no other request was answered for a quarter of it."""
        while not self._stopping.wait(self.lease / 8):
            if time.monotonic() - self.client.alive_at < self.lease / 4:
                continue
            try:
                self.client.call("renew", patience=self.lease / 4)
            except OSError:
                self.client.drop_link()  # no answer: requests waiting on it go again elsewhere
                continue
            if self._lease_lost:
                self._lease_lost = False
                log.warning("lease with the coordinator renewed: writes go on")

    @staticmethod
    def now_ns() -> int:
        """This host's clock (only for files without a name: nothing replicates them)."""
        return time.time_ns()

    # -- activity log ------------------------------------------------------------------------

    def _retire_loop(self) -> None:
        while not self._stopping.wait(5.0):
            self.activity.retire(10.0, self.lock, self.spool.sync)

    def _repair(self, extents: list[tuple[int, str, int]]) -> None:
        """After an unclean stop: record what the volume holds in every extent that was being
        written, as ordinary writes under the file's token (so they are ordered like any other)."""
        if self.volume is None:
            raise RuntimeError("repair needs the volume directory")
        log.warning("%s did not stop cleanly: re-reading %d active extent(s) from the volume",
                    self.name, len(extents))
        for ino, hint, e in extents:
            while True:
                path = self._acquire(ino, self.paths.get(ino, hint)) if ino not in self._tokens \
                    else self.paths.get(ino, hint)
                if path is None:
                    break  # the file is gone: nothing to repair
                with self.lock(ino):
                    if ino not in self._tokens:
                        continue
                    try:
                        fd = os.open(self.volume / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    except FileNotFoundError:
                        break
                    try:
                        st = os.fstat(fd)
                        self._record_extent(fd, path, e * EXTENT, min((e + 1) * EXTENT, st.st_size))
                        # the time the lost writes left, not the replica's applying them again
                        self._append(lambda s, p=path, t=st.st_mtime_ns: Stamp(
                            source=self.name, seq=s, wall=time.time_ns(), after=self.known,
                            path=p, mtime_ns=t))
                    finally:
                        os.close(fd)
                break
        self.activity.repaired(extents)

    def _record_extent(self, fd: int, path: str, start: int, end: int) -> None:
        """Record what the volume holds in [start, end) of ``path``: its data as writes and its
        holes as punched holes, so a sparse image stays sparse on the replica (file lock and
        token held)."""
        pos = start
        while pos < end:
            try:
                data_at = min(os.lseek(fd, pos, os.SEEK_DATA), end)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data_at = end  # nothing but a hole from here to the end of the file
            if data_at > pos:
                self._append(lambda s, p=pos, n=data_at - pos: Fallocate(
                    source=self.name, seq=s, wall=time.time_ns(), after=self.known, path=path,
                    offset=p, length=n, mode=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
            if data_at >= end:
                return
            hole_at = min(os.lseek(fd, data_at, os.SEEK_HOLE), end)
            for off in range(data_at, hole_at, EXTENT):
                self._append_write(path, off, os.pread(fd, min(EXTENT, hole_at - off), off))
            pos = hole_at

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "known_gseq": self.known,
            "captured": self.spool.next_index - 1,
            "durable_on_replica": self.shipper.durable,
            "backlog_events": self.shipper.backlog,
            "connected": self.shipper.connected,
            "tokens": len(self._tokens),
            "ack": self.ack,
            "spool_full": self.spool_full,
            "degraded": self.degraded,
            "writes": self.writes,
            "bytes_written": self.bytes_written,
        }

