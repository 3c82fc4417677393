"""The replica's side of a synchronisation (docs/architecture.md, "Synchronisation").

A sync runs *in the merged order*, as the coordinator's events `SyncStart` (mark S),
`SyncEntries` (the volume's structure at S), `SyncBlocks` (one file's differing blocks, read
under its write token) and `SyncEnd` (mark E). This module applies them:

* at S: forget any earlier sync, start spooling the structure (`state/sync-entries`);
* at the last `SyncEntries`: compare the spooled structure with a walk of the target
  (`clusterrep.treediff.compare`), apply every removal, creation, hard link and attribute
  (`SyncApplier`), and for each regular file whose content may differ record it as *pending*
  in `state/sync.db` with the manifest of the target's file as it is at that point (hashed
  here, in the apply thread, so no event changes it meanwhile; `clusterrep.hashcache` spares
  the reading of files hashed before);
* each `SyncBlocks`: set the file's size, write or punch the listed blocks, set its attributes;
  the last chunk of a file marks it done;
* at E: the sync is over; its summary stays for `status`.

Between those points the coordinator asks, over its ``sync`` connection, for the pending files
(`plan`) and for the target's manifest of a range of one file (`manifest`): it compares them
with the volume's blocks under the file's write token and records the `SyncBlocks` that make
them equal. Why that is exact while writers keep writing: docs/architecture.md.

Whether this replica needs a sync at all (its state was lost, its target replaced, a stream it
follows has a gap) is `awaiting`: kept in `state/sync.json` until the sync it asked for starts.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..blockread import Hasher
from ..blocks import BLOCK_SIZE, HOLE, WINDOW_BLOCKS, Manifest, block_count, block_length, hash_block
from ..confined import Target
from ..durable import atomic_write, load_json_map
from ..errors import ApplyError
from ..events import Attr, MetaEvent, SyncBlocks, SyncEnd, SyncEntries, SyncStart
from ..hashcache import HashCache
from ..snapshot import Entry, Kind, walk
from ..syncwire import decode_blocks, decode_entries
from ..treediff import Content, Create, Link, Remove, SetAttr, compare
from ..verify import read_xattrs
from .syncapply import Block, Hole, SyncApplier

log = logging.getLogger("clusterrep.replica.sync")
_REC = struct.Struct("<QI")  # spool record: gseq, length
_REMOVE_IT = "remove it: the replica then synchronises again"
MAX_REPORTED = 1000  # differences a verify or repair lists (all are counted)


class ReplicaSync:
    """State and steps of this replica's synchronisation; see the module docstring."""

    def __init__(self, state: Path, target: Target) -> None:
        self.state = state
        self.target = target
        self.before_removal: Callable[[str], None] | None = None  # (the history's hook)
        self._file = state / "sync.json"
        self._spool = state / "sync-entries"
        self._lock = threading.Lock()
        saved = load_json_map(self._file, hint=_REMOVE_IT)
        self.awaiting: str | None = saved.get("awaiting")
        self.request: str | None = saved.get("request")
        self.current: dict[str, Any] | None = saved.get("current")
        self.last: dict[str, Any] | None = saved.get("last")
        self.stream: str | None = load_json_map(state / "stream.json", hint=_REMOVE_IT).get("stream")
        self._db = sqlite3.connect(state / "sync.db", check_same_thread=False, isolation_level=None)
        # no fsync per update: the progress noted here may be lost in a power cut (then chunks
        # are sent again), and may be ahead of the target's data (then the journal, which keeps
        # every event after the applier's checkpoint, applies them again after the restart)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        if columns and "rino" not in columns:  # (an older layout: what it holds is transient)
            self._db.execute("DROP TABLE files")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS files (ino INTEGER PRIMARY KEY, path BLOB, size INTEGER,"
            " fresh INTEGER, done INTEGER DEFAULT 0, upto INTEGER DEFAULT 0, rdev INTEGER,"
            " rino INTEGER);"
            # target inodes whose content may be wrong (a sync that did not finish them, or
            # blocks compared with another copy): the next sync compares their content whatever
            # their size and time say
            "CREATE TABLE IF NOT EXISTS unfinished (rdev INTEGER, rino INTEGER, mismatch INTEGER,"
            " PRIMARY KEY (rdev, rino));"
            "CREATE TABLE IF NOT EXISTS windows (ino INTEGER, first INTEGER, count INTEGER,"
            " holes BLOB, digests BLOB, PRIMARY KEY (ino, first));"
            "CREATE TABLE IF NOT EXISTS diffs (n INTEGER PRIMARY KEY, path BLOB, what TEXT, detail TEXT);")
        self._spooled = 0  # gseq of the last SyncEntries spooled
        self._volume_bytes = 0  # size on the volume of the files whose content is compared
        self.moved_bytes = 0
        self.moved_blocks = 0
        self.started = time.monotonic()
        self.applied_gseq: Callable[[], int] = lambda: 0  # the replica's position (set by its service)

    # -- whether a sync is needed ------------------------------------------------------------

    def need(self, reason: str) -> None:
        """This replica does not hold the volume (``reason`` says why): ask for a sync."""
        with self._lock:
            if self.awaiting is not None:
                return
            self.awaiting, self.request = reason, secrets.token_hex(8)
            self._save()
        log.warning("this replica needs a synchronisation: %s", reason)

    def answers(self, ev: SyncStart) -> bool:
        """Is ``ev`` the sync this replica asked for (or any, if it asked for none)?"""
        return self.awaiting is None or ev.sync_id == self.request

    def started_at(self, ev: SyncStart) -> None:
        """The merged order was re-started at the mark of the sync this replica asked for."""
        with self._lock:
            if self.request is not None and ev.sync_id == self.request:
                self.awaiting = self.request = None
                self._save()

    # -- applying (the apply thread) ---------------------------------------------------------

    def apply(self, ev: MetaEvent, replaying: bool) -> None:
        """Apply one sync event in the merged order (every step is replay-safe: ``replaying``
        changes nothing here)."""
        if isinstance(ev, SyncStart):
            self._start(ev)
        elif isinstance(ev, SyncEntries):
            self._entries(ev)
        elif isinstance(ev, SyncBlocks):
            self._blocks(ev)
        elif isinstance(ev, SyncEnd):
            self._end(ev)

    def _start(self, ev: SyncStart) -> None:
        with self._lock:
            if self.request is not None and ev.sync_id == self.request:
                self.awaiting = self.request = None
            self._carry_over()
            self.current = {"sync_id": ev.sync_id, "gseq": ev.gseq, "reason": ev.reason,
                            "mode": ev.mode, "phase": "structure", "wall": ev.wall, "files": 0,
                            "bytes": 0, "differences": 0, "not_compared": 0}
            self._db.execute("DELETE FROM files")
            self._db.execute("DELETE FROM windows")
            self._db.execute("DELETE FROM diffs")
            self._save()
        atomic_write(self.state / "stream.json", json.dumps({"stream": ev.stream}).encode())
        self.stream = ev.stream
        with open(self._spool, "wb"):
            pass
        self._spooled = ev.gseq
        self.started = time.monotonic()
        self.moved_bytes = self.moved_blocks = 0
        log.info("synchronisation %s starts at mark g%d (%s)", ev.sync_id, ev.gseq, ev.reason)

    def _carry_over(self) -> None:
        """(lock held) Files a sync left unfinished stay to be compared by the next one: their
        time may already say they are equal (a writer's stamp) while their content is not."""
        if self.current is not None and self.current.get("mode") != "verify":
            self._db.execute("INSERT OR IGNORE INTO unfinished SELECT rdev, rino, 0 FROM files"
                             " WHERE done = 0 AND rino IS NOT NULL")

    def _unfinished(self, ino: int, *, mismatch: bool) -> None:
        """(lock held) Pending file ``ino``'s content may be wrong: compare it next time."""
        self._db.execute("INSERT OR REPLACE INTO unfinished SELECT rdev, rino, ? FROM files"
                         " WHERE ino = ? AND rino IS NOT NULL", (int(mismatch), ino))

    def _forced(self, entries: Iterator[Entry]) -> Iterator[Entry]:
        """The target's walk, with the time of each unfinished file changed by 1 ns, so that the
        comparison takes its content for different."""
        todo = {(d, i) for d, i in self._db.execute("SELECT rdev, rino FROM unfinished")}
        for e in entries:
            yield replace(e, mtime_ns=e.mtime_ns ^ 1) if todo and e.inode in todo else e

    def _entries(self, ev: SyncEntries) -> None:
        if self.current is None or self.current["phase"] != "structure":
            raise ApplyError(f"structure entries at g{ev.gseq} without a synchronisation started")
        if ev.gseq > self._spooled:
            decode_entries(ev.entries)  # checked before it is kept
            with open(self._spool, "ab") as f:
                f.write(_REC.pack(ev.gseq, len(ev.entries)) + ev.entries)
            self._spooled = ev.gseq
        if ev.final:
            if self.mode == "files":
                self._plan_files()
            else:
                self._plan()

    def _spooled_entries(self) -> Iterator[Entry]:
        with open(self._spool, "rb") as f:
            while head := f.read(_REC.size):
                _, length = _REC.unpack(head)
                yield from decode_entries(f.read(length))

    @property
    def mode(self) -> str:
        return self.current.get("mode", "sync") if self.current is not None else "sync"

    def _plan(self) -> None:
        """Make the target's structure the volume's at S (mode verify: report what differs,
        change nothing); note the files whose content is to be compared."""
        assert self.current is not None
        mode = self.mode
        applier = SyncApplier(self.target, logger=log, before_removal=self.before_removal)
        self._db.execute("DELETE FROM files")
        self._db.execute("DELETE FROM windows")
        plan_path = self.state / "sync-plan"
        count = 0
        with open(plan_path, "wb") as out:  # the whole plan first: the target is not changed
            for action in compare(self._spooled_entries(), self._forced(walk(self.target.root)),
                                  content=mode != "sync"):  # (while walked)
                pickle.dump(action, out, protocol=pickle.HIGHEST_PROTOCOL)
                count += 1
        pending: list[tuple[Entry, bool]] = []
        content_of = None
        self._volume_bytes = 0
        with open(plan_path, "rb") as f:
            for _ in range(count):
                action = pickle.load(f)
                if isinstance(action, Content):
                    if mode == "verify" and action.fresh:
                        continue  # missing in the target: reported as such
                    pending.append((action.entry, action.fresh))
                    self._volume_bytes += action.entry.size
                    content_of = action.entry.path
                    if len(pending) >= 256:
                        self._note(pending)
                        pending = []
                    continue
                if isinstance(action, SetAttr) and action.attr.path == content_of:
                    # its time is set with its content: until then the old one shows that the
                    # content is still to come (to a plan made again after a crash)
                    action = SetAttr(replace(action.attr, mtime_ns=None), action.kind)
                content_of = None
                if mode != "sync":
                    self._report_action(action)
                if mode != "verify":
                    applier.apply(action)
        self._note(pending)
        plan_path.unlink()
        self.target.forget()
        applier.checkpoint()
        total = self._db.execute("SELECT count(*) FROM files").fetchone()[0]
        with self._lock:
            self.current.update(phase="content", files=total, applied=applier.stats.as_dict(),
                                volume_bytes=self._volume_bytes)
            self._save()
        log.info("synchronisation %s (%s): structure %s (%s); %d file(s) to compare",
                 self.current["sync_id"], mode, "compared" if mode == "verify" else "applied",
                 applier.stats.summary(), total)

    def _plan_files(self) -> None:
        """Mode "files": the entries are regular files whose content is to be compared (and put
        right); the target's names are exact here (this is the merged order), so each is where
        the volume has it."""
        assert self.current is not None
        self._db.execute("DELETE FROM files")
        self._db.execute("DELETE FROM windows")
        self._volume_bytes = 0
        pending: list[tuple[Entry, bool]] = []
        for entry in self._spooled_entries():
            try:
                st = self.target.lstat(entry.path)
            except (OSError, ApplyError):
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                self._differ(entry.path, "missing", "not a regular file in the replica")
                continue
            pending.append((entry, False))
            self._volume_bytes += entry.size
        self._note(pending)
        total = self._db.execute("SELECT count(*) FROM files").fetchone()[0]
        with self._lock:
            self.current.update(phase="content", files=total, volume_bytes=self._volume_bytes)
            self._save()
        log.info("synchronisation %s: %d file(s) to compare with the volume (%s)",
                 self.current["sync_id"], total, self.current["reason"])

    def _report_action(self, action: Any) -> None:
        """A structure difference found by a verify or repair."""
        if isinstance(action, Remove):
            self._differ(action.path, "extra", f"{action.kind} only in the replica")
        elif isinstance(action, Create):
            self._differ(action.entry.path, "missing", f"{action.entry.kind} missing in the replica")
        elif isinstance(action, Link):
            self._differ(action.path, "link", f"not a hard link of {action.to!r} in the replica")
        elif isinstance(action, SetAttr):
            what = self._attr_difference(action.attr)
            if what == "modification time" and action.kind is Kind.DIR and self.mode == "repair":
                return  # (the repair's own removals and creations in it changed it)
            if what:
                self._differ(action.attr.path or ".", "attributes", what)

    def _attr_difference(self, attr: Attr) -> str:
        """How the target's ``attr.path`` differs from ``attr`` ("" if it does not)."""
        try:
            st = self.target.lstat(attr.path) if attr.path else os.fstat(self.target.root_fd)
        except (OSError, ApplyError):
            return ""
        out = []
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != attr.mode:
            out.append(f"mode {attr.mode:o} on the volume, {stat.S_IMODE(st.st_mode):o} in the replica")
        if (st.st_uid, st.st_gid) != (attr.uid, attr.gid):
            out.append(f"owner {attr.uid}:{attr.gid} on the volume, {st.st_uid}:{st.st_gid} in the replica")
        if attr.mtime_ns is not None and st.st_mtime_ns != attr.mtime_ns:
            out.append("modification time")
        if attr.xattrs is not None:
            fd = self.target.inode(attr.path)
            try:
                if tuple(sorted(read_xattrs(fd).items())) != tuple(sorted(attr.xattrs)):
                    out.append("extended attributes")
            finally:
                os.close(fd)
        return "; ".join(out)

    def _differ(self, path: str, what: str, detail: str) -> None:
        with self._lock:
            if self.current is None:
                return
            self.current["differences"] = self.current.get("differences", 0) + 1
            if self.current["differences"] <= MAX_REPORTED:
                self._db.execute("INSERT INTO diffs (path, what, detail) VALUES (?, ?, ?)",
                                 (os.fsencode(path), what, detail))
        log.warning("%s: %s %s: %s", "repaired" if self.mode == "repair" else "differs", what,
                    path, detail)

    def _note(self, pending: list[tuple[Entry, bool]]) -> None:
        """Record pending files with the target's manifest of each (none for a fresh one)."""
        if not pending:
            return
        rows, windows = [], []
        opened: dict[int, int] = {}  # ino -> read descriptor of a file to hash
        cache = HashCache(self.state / "hashes.db")
        try:
            for entry, fresh in pending:
                ino, size = entry.inode[1], entry.size
                there = self.target.lstat(entry.path)  # (a fresh one was just created)
                if not fresh:
                    fd = self.target.inode(entry.path)
                    try:
                        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
                    finally:
                        os.close(fd)
                    st = os.fstat(rfd)
                    size = st.st_size
                    # (a verify or repair reads everything: it must not trust the cache)
                    cached = cache.lookup(st, time.time_ns()) if self.mode == "sync" else None
                    if cached is None:
                        opened[ino] = rfd
                    else:
                        os.close(rfd)
                        windows += [(ino, m.first, m.count, m.holes, m.digests) for m in cached.windows()]
                rows.append((ino, os.fsencode(entry.path), size, int(fresh), there.st_dev, there.st_ino))
            if opened:
                # each window goes to the database as it comes (memory: a window, whatever the
                # file's size), and a whole file's windows to the cache from there
                hashed_at = time.time_ns()
                with Hasher() as hasher:
                    for result in hasher.manifests((ino, fd, os.fstat(fd).st_size)
                                                   for ino, fd in opened.items()):
                        if result.error is not None:
                            raise ApplyError(f"cannot read the target's file (inode {result.key}) to"
                                             f" compare it: {result.error}")
                        m = result.manifest
                        assert m is not None
                        self._db.execute("INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?)",
                                         (result.key, m.first, m.count, m.holes, m.digests))
                        if result.last:
                            cache.store(os.fstat(opened[result.key]), hashed_at,
                                        self._windows_of(result.key, m.size))
        finally:
            cache.close()
            for fd in opened.values():
                os.close(fd)
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO files (ino, path, size, fresh, rdev, rino)"
                             " VALUES (?, ?, ?, ?, ?, ?)", rows)
        self._db.executemany("INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?)", windows)
        self._db.execute("COMMIT")

    def _windows_of(self, ino: int, size: int) -> Iterator[Manifest]:
        for row in self._db.execute("SELECT first, count, holes, digests FROM windows WHERE ino = ?"
                                    " ORDER BY first", (ino,)):  # (one window at a time)
            yield Manifest(size, *row)

    def _blocks(self, ev: SyncBlocks) -> None:
        blocks = decode_blocks(ev.blocks)
        mode = self.mode
        if mode != "sync":
            self._report_blocks(ev, blocks)
        if mode == "verify":
            with self._lock:
                self._db.execute("UPDATE files SET upto = max(upto, ?), done = done OR ? WHERE ino = ?",
                                 (ev.first + ev.count, ev.final, ev.ino))
            return
        with self._lock:
            row = self._db.execute("SELECT upto FROM files WHERE ino = ?", (ev.ino,)).fetchone()
            again = row is not None and row[0] >= ev.first + ev.count  # (a replay after a crash)
            noted = self._their_manifest(ev.ino, ev.first, ev.count) if ev.base and not again else None
        trusted = noted is None or noted.fingerprint() == ev.base
        applier = SyncApplier(self.target, logger=log, before_removal=self.before_removal)
        applier.apply_blocks(ev.path, ev.size, blocks)
        for attr in ev.attrs:
            self.target.apply_attr(attr)
        self.moved_bytes += applier.stats.wire_bytes
        self.moved_blocks += applier.stats.blocks
        with self._lock:
            if trusted:
                self._note_written(ev, blocks)
            else:  # the blocks listed are right; those not listed were compared with another copy
                self._unfinished(ev.ino, mismatch=True)
        if not trusted:
            self.need(f"{ev.path!r}: the synchronisation's blocks were compared with another copy of "
                      "the target than this one (a replay onto a new target?)")

    def _report_blocks(self, ev: SyncBlocks, blocks: list[Block | Hole]) -> None:
        """Report how the target's file differs from the volume's at this chunk's mark (a verify
        or repair; before a repair writes). The blocks listed are those whose digest differs
        from the manifest noted at R; writes since R reached both sides, so each is read again
        here, at the exact point of the order, and counted only if it still differs: a block
        written since is never reported (no phantom differences)."""
        try:
            fd = self.target.inode(ev.path)
        except (OSError, ApplyError):
            return  # reported missing already
        try:
            rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # not a regular file: reported as another kind already
        finally:
            os.close(fd)
        try:
            size = os.fstat(rfd).st_size
            differing = []
            for b in blocks:
                length = block_length(ev.size, b.index)
                data = os.pread(rfd, length, b.index * BLOCK_SIZE).ljust(length, b"\0")
                same = not any(data) if isinstance(b, Hole) else hash_block(data) == b.digest
                if not same:
                    differing.append(b.index)
        finally:
            os.close(rfd)
        if size != ev.size:
            self._differ(ev.path, "size", f"{ev.size} bytes on the volume, {size} in the replica")
        if differing:
            self._differ(ev.path, "content", f"{len(differing)} block(s) of 64 KiB differ, the first "
                         f"at offset {differing[0] * BLOCK_SIZE}")
        for attr in ev.attrs:
            what = self._attr_difference(attr)
            if what:
                self._differ(attr.path, "attributes", what)

    def _note_written(self, ev: SyncBlocks, blocks: list[Block | Hole]) -> None:
        """What a chunk made of the target's file (lock held): its noted manifest takes the
        blocks written, and the file's progress moves past the chunk, so a sync resumed after
        a restart neither compares with what was there before nor sends the chunk again (the
        chunk stays equal to the volume: every later write is applied to both)."""
        row = self._db.execute("SELECT size, fresh, upto FROM files WHERE ino = ?", (ev.ino,)).fetchone()
        if row is None:
            return
        self._db.execute("BEGIN")  # (the manifest and the progress change together)
        try:
            self._note_chunk(ev, blocks, row)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _note_chunk(self, ev: SyncBlocks, blocks: list[Block | Hole], row: tuple[int, int, int]) -> None:
        size, fresh, _upto = row
        if blocks and not fresh:
            changed = {b.index: (HOLE if isinstance(b, Hole) else b.digest or HOLE) for b in blocks}
            start = ev.first - ev.first % WINDOW_BLOCKS
            for w in self._db.execute("SELECT first, count, holes, digests FROM windows WHERE ino = ?"
                                      " AND first >= ? AND first < ? ORDER BY first",
                                      (ev.ino, start, ev.first + ev.count)).fetchall():
                m = Manifest(size, *w)
                if not any(m.first <= i < m.end for i in changed):
                    continue
                new = Manifest.build(size, [changed.get(i, b) for i, b in m.items()], m.first)
                self._db.execute("UPDATE windows SET holes = ?, digests = ? WHERE ino = ? AND first = ?",
                                 (new.holes, new.digests, ev.ino, m.first))
        self._db.execute("UPDATE files SET upto = max(upto, ?), done = done OR ? WHERE ino = ?",
                         (ev.first + ev.count, ev.final, ev.ino))
        if ev.final:
            self._db.execute("DELETE FROM unfinished WHERE (rdev, rino) IN"
                             " (SELECT rdev, rino FROM files WHERE ino = ?)", (ev.ino,))

    def _end(self, ev: SyncEnd) -> None:
        with self._lock:
            if self.current is None or self.current["sync_id"] != ev.sync_id:
                return
            done = self._db.execute("SELECT count(*) FROM files WHERE done = 1").fetchone()[0]
            listed = [{"path": os.fsdecode(p), "what": w, "detail": d} for p, w, d in self._db.execute(
                "SELECT path, what, detail FROM diffs ORDER BY n LIMIT ?", (MAX_REPORTED,))]
            self.last = {**self.current, "phase": ev.outcome, "end_gseq": ev.gseq, "listed": listed,
                         "bytes": self.moved_bytes, "blocks": self.moved_blocks,
                         "files_done": done, "seconds": round(time.monotonic() - self.started, 3)}
            if ev.outcome == "done":
                self._db.execute("DELETE FROM unfinished WHERE mismatch = 0")  # (inodes gone)
            else:
                self._carry_over()
            self.current = None
            self._db.execute("DELETE FROM files")
            self._db.execute("DELETE FROM windows")
            self._db.execute("DELETE FROM diffs")
            self._save()
        self._spool.unlink(missing_ok=True)
        log.info("synchronisation %s %s at mark g%d", ev.sync_id, ev.outcome, ev.gseq)

    def recover(self, gseq: int) -> None:
        """After a restart from a checkpoint at ``gseq``: keep only the structure spooled by
        events up to it (those after it are applied again)."""
        if self.current is None or self.current["phase"] != "structure" or not self._spool.exists():
            return
        keep, last = 0, self.current["gseq"]
        with open(self._spool, "rb") as f:
            while len(head := f.read(_REC.size)) == _REC.size:
                g, length = _REC.unpack(head)
                if g > gseq or len(f.read(length)) != length:
                    break
                keep, last = f.tell(), g
        os.truncate(self._spool, keep)
        self._spooled = last

    def flush(self) -> None:
        """Make the spooled structure durable (before the applier's checkpoint)."""
        if self.current is not None and self.current["phase"] == "structure" and self._spool.exists():
            fd = os.open(self._spool, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- the coordinator's questions (server threads) ----------------------------------------

    def plan(self, sync_id: str, after: int, limit: int = 512) -> dict[str, Any]:
        with self._lock:
            cur = self.current
            if cur is None or cur["sync_id"] != sync_id:
                return {"t": "plan", "state": "unknown", "applied": self.applied_gseq(),
                        "awaiting": self.request if self.awaiting is not None else None}
            if cur["phase"] != "content":
                return {"t": "plan", "state": "wait"}
            rows = self._db.execute("SELECT ino, path, upto, fresh, size FROM files WHERE done = 0"
                                    " AND ino > ? ORDER BY ino LIMIT ?", (after, limit)).fetchall()
        return {"t": "plan", "state": "files", "applied": self.applied_gseq(),
                "files": [list(row) for row in rows]}

    def manifest(self, sync_id: str, ino: int, first: int, count: int) -> dict[str, Any]:
        """The target's blocks ``first .. first + count - 1`` of pending file ``ino``, as noted."""
        with self._lock:
            cur = self.current
            if cur is None or cur["sync_id"] != sync_id:
                return {"t": "manifest", "state": "unknown"}
            m = self._their_manifest(ino, first, count)
        if m is None:
            return {"t": "manifest", "state": "unknown"}
        return {"t": "manifest", "state": "ok", "m": [m.size, m.first, m.count, m.holes, m.digests]}

    def _their_manifest(self, ino: int, first: int, count: int) -> Manifest | None:
        """(lock held) What this replica noted of its copy of pending file ``ino``: blocks
        ``first .. first + count - 1`` that its file has; None if the file is not pending."""
        row = self._db.execute("SELECT size, fresh FROM files WHERE ino = ?", (ino,)).fetchone()
        if row is None:
            return None
        size, fresh = row
        first = min(first, block_count(size))
        end = min(first + count, block_count(size))
        if fresh:
            return Manifest.holes_only(size, first, end - first)
        start = first - first % WINDOW_BLOCKS
        parts = [Manifest(size, *w).slice(first, end) for w in self._db.execute(
            "SELECT first, count, holes, digests FROM windows WHERE ino = ? AND first >= ?"
            " AND first < ? ORDER BY first", (ino, start, end))]
        parts = [p for p in parts if p.count]
        return Manifest.concat(parts) if parts else Manifest(size, first, 0, b"", b"")

    def skip(self, sync_id: str, ino: int, why: str | None = None) -> None:
        """Nothing of pending file ``ino``'s content is to come: it has no name on the volume any
        more (its removal is in the stream), or ``why`` it could not be read there."""
        with self._lock:
            if self.current is None or self.current["sync_id"] != sync_id:
                return
            self._db.execute("UPDATE files SET done = 1 WHERE ino = ?", (ino,))
            row = self._db.execute("SELECT path FROM files WHERE ino = ?", (ino,)).fetchone()
            if why is not None:
                self.current["not_compared"] = self.current.get("not_compared", 0) + 1
                if self.current["not_compared"] <= MAX_REPORTED:
                    self._db.execute("INSERT INTO diffs (path, what, detail) VALUES (?, ?, ?)",
                                     (row[0] if row else b"?", "not compared", why))

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        with self._lock:
            if self.awaiting is not None:
                return {"state": "awaiting", "reason": self.awaiting}
            if self.current is None:
                return None
            cur = dict(self.current)
            if cur["phase"] == "content":
                cur["files_done"] = self._db.execute(
                    "SELECT count(*) FROM files WHERE done = 1").fetchone()[0]
        cur["state"] = "running"
        cur["bytes"] = self.moved_bytes
        cur["seconds"] = round(time.monotonic() - self.started, 3)
        return cur

    def _save(self) -> None:
        atomic_write(self._file, json.dumps({"awaiting": self.awaiting, "request": self.request,
                                             "current": self.current, "last": self.last}).encode())

    def close(self) -> None:
        self._db.close()
