"""Recording the history while the applier applies the merged order.

The applier (`clusterrep.replica.applier.Applier`) calls, for every event it applies:

* data events (``Write``, ``Fallocate``, ``Stamp``, ``Tick``) are *staged*: `Recorder.stage`
  reads the bytes the event will overwrite, from the target as it is before any staged event is
  applied, and returns False when the event depends on one staged before it (an overlapping
  range of the same file): the applier then applies the staged group first.
  `Recorder.commit_staged` writes the group's undo bytes, ``fdatasync``s them, commits their
  rows, and only then does the applier write the group to the target (write-ahead: whatever a
  crash or power loss leaves of the target, the old bytes of every change in it are on disk);
* metadata events go one at a time: `Recorder.before_meta` keeps the bytes a ``Truncate`` or a
  synchronisation's blocks will replace, and the inode of a file losing its last name
  (``objects/<fid>``, a hard link: no copy), and commits; after the event, `Recorder.after_meta`
  versions the names and attributes it changed and records the mark.

Replay after a crash: names and attributes are committed together with the position they
reach, so an event the database already holds is not recorded twice; undo rows name their
event, so an event re-applied after a crash keeps the rows captured the first time (the bytes
before it), whatever the target holds now.

A history starts (``base``) at a mark: the target's structure is walked and recorded right
after a metadata event was applied (nothing after that mark is in the target yet). It restarts
after a synchronisation this replica needed (its earlier state is not trusted) and after a fault
of its own (an error, a full disk that pruning cannot relieve): the live target is never held
back by the history; the gap is logged, kept in ``gaps`` and shown in the status.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from ..blocks import BLOCK_SIZE
from ..confined import Target
from ..errors import ApplyError, HistoryError
from ..events import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Create,
    DataEvent,
    Event,
    Exchange,
    Fallocate,
    Link,
    MetaEvent,
    Mkdir,
    Mknod,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Stamp,
    Symlink,
    SyncBlocks,
    SyncEnd,
    SyncStart,
    Truncate,
    Unlink,
    Write,
)
from ..replica.position import Position
from ..snapshot import Kind
from ..syncwire import decode_blocks
from .ranges import MAX_ROW, Ranges, Touched, capture, copy_sparse
from .store import ALIVE, Pruned, Store
from .versions import Versions

log = logging.getLogger("clusterrep.history")

GROUP_BYTES = 64 << 20  # undo bytes one staged group holds at most
GROUP_EVENTS = 8192
HISTORY_FAULTS = (OSError, sqlite3.Error, HistoryError, msgpack.PackException)
_CREATES = (Create, Mkdir, Symlink, Mknod)


def key_of(ev: Event) -> int:
    """The key of ``ev`` in the merged order: a metadata event's gseq; ``after + 1`` for a
    data event (it lies between mark ``after`` and the next one)."""
    if isinstance(ev, MetaEvent):
        return ev.gseq
    assert isinstance(ev, DataEvent)
    return ev.after + 1


def mark_kind(ev: MetaEvent) -> str:
    """``SyncStart`` -> ``sync_start``: how `clusterrep marks` names an event's kind."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(ev).__name__).lower()


class Recorder:
    """Keeps ``store`` (the history) in step with ``target`` as events are applied.

    ``lock`` is held while a group or a metadata event is captured and applied, so a reader
    (`clusterrep.history.view.MarkView`) holding it sees the database and the target agree.
    ``retain`` (seconds) and ``retain_size`` (bytes) bound the window (None: unbounded).
    """

    def __init__(self, store: Store, target: Target, *, retain: float | None = None,
                 retain_size: int | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.db = store.db
        self.target = target
        self.retain = retain
        self.retain_size = retain_size
        self.clock = clock
        self.lock = threading.RLock()
        self.base: int | None = store.get("base")
        self.v = Versions(store, target)  # names and attributes
        pos = store.get("position")
        self.db_position = Position.from_json(pos) if pos else Position()
        self.syncing = bool(store.get("syncing", False))  # inside a sync this replica needed
        self.off: str | None = None  # why recording stopped for this process's life
        self.in_sync: int | None = store.get("in_sync")  # gseq of an open sync the history spans
        self.sync_mode: str | None = store.get("sync_mode")  # its mode (sync, verify, repair, files)
        self._current = 0  # key of the metadata event being applied
        self.gaps: list[dict[str, Any]] = store.get("gaps", [])
        self.alarm: str | None = store.get("alarm")
        self.durable = int(store.get("durable", 0))
        self.window = int(store.get("window", 0))
        self.last_received = float(store.get("last_received", 0.0))
        self._received: dict[int, float] = {}
        self._received_lock = threading.Lock()
        self._rows: list[list[Any]] = []
        self._blob = bytearray()
        self._touched: dict[str, Touched] = {}
        self._staged_max_k = 0
        # what was captured since the last mark, per file: a later change of those bytes before
        # the next mark needs no undo (the first change's row holds the value at the mark)
        self._era = 0
        self._era_ranges: dict[int, Ranges] = {}
        self._usage_at = 0.0
        self._maintained = 0.0
        self._live: Position | None = None  # the applier's position (between events, under lock)
        self._to_drop: list[Pruned] = []  # prunes whose files go once committed
        # per event source, the highest seq an undo row names (a crash may have left rows of
        # events the applier re-applies: only those can have rows already)
        self._captured_upto: dict[str, int] = dict(
            self.db.execute("SELECT src, max(seq) FROM undo GROUP BY src"))
        self.usage = 0
        self.ready = False  # reads are refused until the applier has replayed what it had

    @property
    def root(self) -> int | None:
        """The fid of the volume's root directory."""
        return self.v.root

    @property
    def active(self) -> bool:
        return self.base is not None

    # -- inputs from the service -------------------------------------------------------------

    def note_received(self, gseqs: list[int], when: float) -> None:
        """The coordinator's marks ``gseqs`` arrived at wall time ``when`` (the replica's clock)."""
        with self._received_lock:
            for g in gseqs:
                self._received.setdefault(g, when)

    def _received_at(self, gseq: int) -> float:
        with self._received_lock:
            t = self._received.pop(gseq, None)
        t = round(self.clock() if t is None else t, 6)
        self.last_received = max(self.last_received, t)
        return self.last_received

    # -- data events: staged groups ----------------------------------------------------------

    def stage(self, ev: DataEvent, replaying: bool) -> bool:
        """Capture what ``ev`` will overwrite; False if it depends on an event staged before it
        (apply the staged group first, then stage it again)."""
        cls = type(ev)
        if not self.active or (cls is not Write and cls is not Fallocate):
            return True
        if cls is Write:
            start, end = ev.offset, ev.offset + len(ev.data)  # type: ignore[attr-defined]
            grows, keeps = True, True
        else:
            mode = ev.mode  # type: ignore[attr-defined]
            start, end = ev.offset, ev.offset + ev.length  # type: ignore[attr-defined]
            grows = not mode & FALLOC_FL_KEEP_SIZE
            keeps = bool(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
            if not grows and not keeps:
                return True  # allocation only: content and size stay
        if len(self._rows) >= GROUP_EVENTS or len(self._blob) >= GROUP_BYTES:
            return False
        path = ev.path  # type: ignore[attr-defined]
        touched = self._touched.get(path)
        if touched is not None and touched.overlaps(start, end):
            return False
        try:
            fd = self.target.file_fd(path)
        except ApplyError as exc:
            raise HistoryError(f"cannot read {path!r} before {cls.__name__}: {exc}") from None
        if touched is None:
            touched = self._touched[path] = Touched(os.fstat(fd).st_size)
        before = touched.size
        fid = self.v.fid_or_none(path)
        if fid is None and self.in_sync is None:
            raise HistoryError(f"the history does not know {path!r} (it went out of step with the target)")
        k = ev.after + 1
        if k != self._era:
            self._era, self._era_ranges = k, {}
        captured = self._era_ranges.get(fid) if fid is not None else None
        if fid is not None and not (captured is not None and captured.covers(start, end)) \
                and not (replaying and self._captured(ev.source, ev.seq)):
            self._staged_max_k = max(self._staged_max_k, k)
            stop = min(end, before)
            if captured is None:
                captured = self._era_ranges[fid] = Ranges()
            if keeps and start < stop:
                self._stage_bytes(fid, k, ev.source, ev.seq, fd, start, stop, before)
                captured.add(start, max(end, stop))
            else:
                self._rows.append([fid, k, ev.source, ev.seq, start, 0, before, -1])
            if end > before:
                captured.add(before, end)  # (beyond the size at the mark: never read at it)
        if end > start:
            touched.add(start, end)
        if grows:
            touched.size = max(before, end)
        return True

    def _stage_bytes(self, fid: int, k: int, src: str, seq: int, fd: int, start: int, stop: int,
                     before: int) -> None:
        while start < stop:
            n = min(stop - start, MAX_ROW)
            data = os.pread(fd, n, start)
            if len(data) < n:  # past the end on disk: zeros up to the size staged before
                data += bytes(n - len(data))
            if data.count(0) == n:
                self._rows.append([fid, k, src, seq, start, n, before, -1])
            else:
                self._rows.append([fid, k, src, seq, start, n, before, len(self._blob)])
                self._blob += data
            start += n

    def commit_staged(self, position: Position) -> None:
        """Make the staged group's undo durable (before the caller applies the group)."""
        self._live = position
        self._touched.clear()
        if not self._rows:
            return
        rows, blob, max_k = self._rows, self._blob, self._staged_max_k
        self._rows, self._blob, self._staged_max_k = [], bytearray(), 0
        self._write_rows(rows, blob, max_k, position)

    def discard_staged(self) -> None:
        self._touched.clear()
        self._rows, self._blob, self._staged_max_k = [], bytearray(), 0

    def _write_rows(self, rows: list[list[Any]], blob: bytearray, max_k: int, position: Position) -> None:
        seg = 0
        if blob:
            seg, base = self._append(blob, max_k)
            for r in rows:
                if r[7] >= 0:
                    r[7] += base
        self.db.executemany(
            "INSERT INTO undo(fid, k, src, seq, off, len, size_before, pos, seg) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)", ([*r, seg] for r in rows))
        self._commit(position)

    def _append(self, blob: bytearray, max_k: int) -> tuple[int, int]:
        """Append undo bytes, first pruning the oldest history as far as ``retain_size`` needs;
        on a full disk, prune the oldest and try again."""
        self._bound(len(blob))
        self.usage += len(blob)
        while True:
            try:
                return self.store.append(blob, max_k)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if not self._prune_oldest():
                    raise
                self.store.release_reserve()  # (room for the commit that frees the room)
                self.commit()  # (the pruned files go now: their space is what this needs)
                self.store.make_reserve()
                self._raise_alarm(f"history disk full: the oldest restore points were pruned early "
                                  f"({exc.strerror}); restore points from g{self.window} on remain")

    def _bound(self, more: int) -> None:
        """Keep the history within ``retain_size`` with ``more`` bytes to come: prune the
        oldest restore points (never past the newest durable one) while it would not fit."""
        if self.retain_size is None or self.usage + more <= self.retain_size:
            return
        self.usage = self.store.usage()  # (the running estimate drifts: measure before pruning)
        while self.usage + more > self.retain_size and self._prune_oldest(limit=self.durable):
            self.usage = self.store.usage()

    def after_data(self, ev: DataEvent, position: Position) -> None:
        """Record what an applied data event changed in the attributes (a ``Stamp``'s time)."""
        self._live = position
        if type(ev) is not Stamp or not self.active:
            return
        if self._in_db(ev, position):
            return
        self.v.set_attrs(self.v.fid_of(ev.path), ev.after + 1, mtime_ns=ev.mtime_ns)

    def _in_db(self, ev: Event, position: Position) -> bool:
        """Did the database record ``ev`` before a crash (so re-applying it records nothing)?
        ``position`` is the applier's, past ``ev``."""
        db = self.db_position
        return position.applied <= db.applied and db.already_applied(ev)

    def _captured(self, src: str, seq: int) -> bool:
        if seq > self._captured_upto.get(src, 0):
            return False
        return self.db.execute("SELECT 1 FROM undo WHERE src=? AND seq=? LIMIT 1",
                               (src, seq)).fetchone() is not None

    # -- metadata events ---------------------------------------------------------------------

    def before_meta(self, ev: MetaEvent, position: Position, replaying: bool) -> None:
        """Keep what ``ev`` is about to destroy (bytes cut, files losing their last name)."""
        self._live = position
        self._current = ev.gseq
        if ev.gseq <= self.db_position.gseq and self.active:
            return  # recorded before a crash (its effect and what it destroyed are kept)
        if isinstance(ev, SyncStart) and ev.gseq == position.floor:
            self._restart_for_sync(ev)
            return
        if not self.active:
            return
        cls = type(ev)
        k, src = ev.gseq, ""
        self._current = k
        if cls is SyncStart:
            self.in_sync, self.sync_mode = k, ev.mode  # type: ignore[attr-defined]
            self.store.put("in_sync", k)
            self.store.put("sync_mode", self.sync_mode)
        if replaying and self._captured(src, k):
            return
        rows: list[list[Any]] = []
        blob = bytearray()
        if cls is Truncate or cls is SyncBlocks:
            path = ev.path  # type: ignore[attr-defined]
            fid = self.v.fid_or_none(path) if cls is SyncBlocks else self.v.fid_of(path)
            if fid is None or (cls is SyncBlocks and self.sync_mode in ("verify", "repair")):
                # a file this synchronisation made (no restore point before it has it); a
                # verify changes nothing; what a repair replaces was damage, never the volume's
                self._commit(position)
                return
            fd = self.target.file_fd(path)
            before = os.fstat(fd).st_size
            new = ev.size  # type: ignore[attr-defined]
            if cls is SyncBlocks:  # (the blocks it lists: the others of its range stay)
                for block in decode_blocks(ev.blocks):  # type: ignore[attr-defined]
                    start = block.index * BLOCK_SIZE
                    capture(rows, blob, fid, k, fd, start, min(before, start + BLOCK_SIZE), before)
            capture(rows, blob, fid, k, fd, new, before, before)
            if not rows:
                rows.append([fid, k, src, k, 0, 0, before, -1])
        elif cls is Unlink:
            self._keep_if_last(ev.path)  # type: ignore[attr-defined]
        elif cls is Rename:
            dst = ev.dst  # type: ignore[attr-defined]
            if self.v.fid_or_none(dst) not in (None, self.v.fid_of(ev.path)):  # type: ignore[attr-defined]
                self._keep_if_last(dst)
        for r in rows:
            r[2], r[3] = src, k
        if rows:
            self._write_rows(rows, blob, k, position)
        else:
            self._commit(position)

    def after_meta(self, ev: MetaEvent, position: Position, replaying: bool) -> None:
        """Version the names and attributes ``ev`` changed; record its mark."""
        self._live = position
        if not self.active:
            if self.off is None and ((isinstance(ev, SyncEnd) and self.syncing) or not self.syncing):
                self._start(ev, position, "synchronisation ended" if self.syncing else "start")
            return
        if self._in_db(ev, position):
            return
        k = ev.gseq
        cls = type(ev)
        if cls in _CREATES:
            self.v.created(ev.path, k)  # type: ignore[attr-defined]
        elif cls is Unlink or cls is Rmdir:
            self.v.unname(ev.path, k)  # type: ignore[attr-defined]
        elif cls is Rename:
            self.v.renamed(ev.path, ev.dst, k)  # type: ignore[attr-defined]
        elif cls is Exchange:
            self.v.exchanged(ev.path, ev.dst, k)  # type: ignore[attr-defined]
        elif cls is Link:
            self.v.name(ev.dst, self.v.fid_of(ev.path), k)  # type: ignore[attr-defined]
        elif cls is SetAttr:
            self.v.set_attrs(self.v.fid_of(ev.path), k, mode=ev.mode, uid=ev.uid,  # type: ignore[attr-defined]
                            gid=ev.gid, mtime_ns=ev.mtime_ns)  # type: ignore[attr-defined]
        elif cls is SetXattr or cls is RemoveXattr:
            self.v.xattr(ev, k)
        elif cls is SyncEnd:
            self.v.reconcile(k)
            self.in_sync = None
            self.store.put("in_sync", None)
        for attr in getattr(ev, "attrs", ()):
            self.v.apply_attr(attr, k)
        if self.in_sync is None or cls is SyncStart:
            self._mark(ev)  # (inside a synchronisation the target is at no mark of the volume)

    def _mark(self, ev: MetaEvent) -> None:
        self.db.execute("INSERT OR REPLACE INTO marks(gseq, kind, paths, origin, received_at) "
                        "VALUES(?, ?, ?, ?, ?)", (ev.gseq, mark_kind(ev), _paths_json(list(ev.paths())),
                                                  ev.origin, self._received_at(ev.gseq)))

    def _keep_if_last(self, path: str) -> None:
        """``path`` is about to lose a name: keep its inode if that is its last name."""
        fid = self.v.fid_of(path)
        kind, kept = self.db.execute("SELECT kind, object FROM files WHERE fid=?", (fid,)).fetchone()
        if kind != Kind.FILE.value or kept:
            return
        names = self.db.execute("SELECT count(*) FROM names WHERE fid=? AND died=?",
                                (fid, ALIVE)).fetchone()[0]
        if names > 1:
            return
        self._keep(path, fid)

    def _keep(self, path: str, fid: int) -> None:
        try:
            self.target.link_out(path, self.store.objects_fd, str(fid))
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            copy_sparse(self.target.file_fd(path), self.store.objects_fd, str(fid))
        self.db.execute("UPDATE files SET object=1 WHERE fid=?", (fid,))
        with contextlib.suppress(OSError):
            self.usage += os.stat(str(fid), dir_fd=self.store.objects_fd).st_blocks * 512
        self._bound(0)

    def before_removal(self, path: str) -> None:
        """A synchronisation is about to remove name ``path`` from the target (the
        `clusterrep.replica.syncapply.SyncApplier` hook): keep its inode if it is the last name,
        and end the name (the rest of what the synchronisation changed is recorded at its end)."""
        if not self.active:
            return
        with self.lock:
            try:
                fid = self.v.fid_or_none(path)
                if fid is None:
                    return
                st = self.target.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    self._keep_if_last(path)
                self.v.unname(path, self._current)
                self.commit()
            except HISTORY_FAULTS as exc:
                self.broken(exc)

    def _start(self, ev: MetaEvent, position: Position, why: str) -> None:
        """Begin a history at mark ``ev`` (just applied: the target holds the state at it)."""
        k = ev.gseq
        self.store.clear()
        self.v.forget()
        self._era, self._era_ranges = 0, {}
        self.base, self.window = k, k
        self.v.reconcile(k)
        self.syncing = False
        self.in_sync = None
        self.store.put("base", k)
        self.store.put("syncing", False)
        self.store.put("in_sync", None)
        self.store.put("window", k)
        self._mark(ev)
        self._commit(position)
        log.info("history starts at mark g%d (%s)", k, why)

    def _restart_for_sync(self, ev: SyncStart) -> None:
        if self.active:
            self.gap(f"synchronisation {ev.sync_id} re-started this replica at mark g{ev.gseq}: "
                     "its earlier state is not trusted, the history restarts when it ends",
                     ev.gseq, alarm=False)
        self.syncing = True
        self.store.put("syncing", True)
        self.commit()

    def gap(self, why: str, at: int, *, alarm: bool = True) -> None:
        """Drop the whole history (restore points before ``at`` are gone) and say so."""
        log.error("history: %s", why) if alarm else log.warning("history: %s", why)
        self.gaps = [*self.gaps[-9:], {"at": at, "why": why, "when": self.clock()}]
        self.store.clear()
        self.base = None
        self.v.forget()
        self._era, self._era_ranges = 0, {}
        self.discard_staged()
        self.store.put("gaps", self.gaps)
        if alarm:
            self._raise_alarm(why)
        self.commit()
        self.store.make_reserve()

    def broken(self, exc: BaseException) -> None:
        """A fault of the history's own: drop it (the target goes on), start again later."""
        at = self.db_position.gseq
        try:
            self.db.rollback()
            self.store.release_reserve()  # (dropping the history needs a little room: a full disk)
            self.gap(f"recording failed ({exc}); restore points before this were dropped and a new "
                     "history starts at the next mark", at)
        except HISTORY_FAULTS as again:
            log.critical("history: cannot even drop the history after a fault (%s); it stays "
                         "off until the replica restarts: %s", exc, again)
            self.base = None
            self.off = f"off after a fault it could not recover from: {again}"

    def _raise_alarm(self, why: str) -> None:
        self.alarm = why
        self.store.put("alarm", why)

    # -- commits, checkpoints, retention -----------------------------------------------------

    def commit(self) -> None:
        """Commit now (a pin, a prune, a sync's removal), with the position the database holds:
        the applier's, between two events (the caller holds `lock`)."""
        self._commit(self._live if self._live is not None else self.db_position)

    def _commit(self, position: Position) -> None:
        """The one way the database is committed: always with the position its rows reach."""
        self._live = position
        if position.applied < self.db_position.applied:
            position = self.db_position  # (a replay's checkpoint: the database is further on)
        self.store.put("position", position.to_json())
        self.store.put("last_received", self.last_received)
        self.store.commit()
        self.db_position = position.copy()
        for pruned in self._to_drop:
            self.store.drop(pruned)
        self._to_drop.clear()

    def checkpoint(self, position: Position) -> None:
        """The target is durable at ``position``: its marks may be listed; prune what the
        retention lets go."""
        self.durable = position.gseq
        self.store.put("durable", self.durable)
        self._commit(position)
        if self.active:
            self._retain()

    def maintain(self) -> None:
        """Apply the retention now (the apply thread calls it when idle, at most every 5 s)."""
        now = time.monotonic()
        if now - self._maintained < 5.0:
            return
        self._maintained = now
        with self.lock:
            try:
                if self.active:
                    self._retain()
            except HISTORY_FAULTS as exc:
                self.broken(exc)

    def _retain(self) -> None:
        db = self.db
        newest = db.execute("SELECT max(gseq) FROM marks WHERE gseq <= ?", (self.durable,)).fetchone()[0]
        if newest is None:
            return
        window = self.window
        if self.retain is not None:
            cutoff = self.clock() - self.retain
            first = db.execute("SELECT min(gseq) FROM marks WHERE received_at >= ? AND gseq >= ?",
                               (cutoff, window)).fetchone()[0]
            window = max(window, min(newest, first if first is not None else newest))
            pinned = db.execute("SELECT min(gseq) FROM pins").fetchone()[0]
            if pinned is not None:
                window = max(self.window, min(window, pinned))
        if window > self.window:
            self._prune(window)
        if self.retain_size is not None:
            now = time.monotonic()
            if now - self._usage_at > 5.0 or self.usage > self.retain_size:
                self.usage = self.store.usage()
                self._usage_at = now
            while self.usage > self.retain_size and self._prune_oldest(limit=newest):
                self.usage = self.store.usage()

    def _prune(self, window: int) -> None:
        """Move the window to ``window``; committed with the next commit, files removed then."""
        pruned = self.store.prune(window)
        dropped = self.db.execute("DELETE FROM pins WHERE gseq < ?", (window,)).rowcount
        if dropped:
            self._raise_alarm(f"{dropped} pinned restore point(s) before g{window} were pruned to "
                              "keep the history within --retain-size")
        self._to_drop.append(pruned)
        self.window = window
        self.usage -= pruned.bytes
        log.info("history: restore points before g%d pruned (%d undo bytes freed)", window, pruned.bytes)

    def _prune_oldest(self, limit: int | None = None) -> bool:
        """Move the window past the oldest undo segment or kept file; False if nothing is left."""
        row = self.db.execute(
            "SELECT min(k) FROM (SELECT min(max_k) AS k FROM segments WHERE max_k > ? UNION ALL "
            "SELECT min(dead) FROM files WHERE dead > ? AND object=1)", (self.window, self.window)
        ).fetchone()
        nxt = row[0] if row else None
        if nxt is None or (limit is not None and nxt > limit):
            return False
        self._prune(nxt)
        return True

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.lock:
            first = last = first_at = last_at = None
            count = 0
            if self.active:
                row = self.db.execute("SELECT min(gseq), max(gseq), count(*) FROM marks WHERE gseq >= ? "
                                      "AND gseq <= ?", (self.window, self.durable)).fetchone()
                first, last, count = row
            if first is not None:
                at = "SELECT received_at FROM marks WHERE gseq=?"
                first_at = self.db.execute(at, (first,)).fetchone()[0]
                last_at = self.db.execute(at, (last,)).fetchone()[0]
            return {"recording": self.active, "base": self.base, "oldest": first, "newest": last,
                    "oldest_at": first_at, "newest_at": last_at, "restore_points": count,
                    "retain_s": self.retain, "retain_size": self.retain_size, "bytes": self.usage,
                    "alarm": self.alarm, "gaps": self.gaps, "syncing": self.syncing,
                    "durable": self.durable, "window": self.window}

def _paths_json(paths: list[str]) -> str:
    import json
    return json.dumps([os.fsencode(p).decode("utf-8", "backslashreplace") for p in paths])
