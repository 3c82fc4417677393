"""The volume as it was at a mark: restore points, their entries and their bytes.

`MarkView(recorder, gseq)` answers for one restore point ``M`` of the window:

* `MarkView.entries` -- every entry at ``M`` (or the subtrees of some paths and the directories
  above them) as `clusterrep.snapshot.Entry` in walk order, ``inode`` being ``(0, fid)`` so that
  hard links share one, ``size`` the file's size at ``M``;
* `MarkView.blocks` -- a regular file's data at ``M`` as ``(index, bytes)`` of its 64 KiB blocks
  that are not all zeros.

How a file's bytes at ``M`` are found (`clusterrep.history.store` has the rule): the file's
current bytes are read (from the target, or from the history's kept copy once it lost its last
name) and every byte some change after ``M`` touched is replaced by what the first such change's
undo row kept. The current bytes are read *before* the undo rows are looked up, so a change the
applier makes meanwhile is either already in what was read and has its row, or not yet made:
either way the result is the state at ``M``, while the replica keeps applying.

Errors: `clusterrep.errors.MarkNotRestorable` (a mark outside the window, an unknown pin or path),
`clusterrep.errors.HistoryError` (no history, or it is damaged).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from ..blockread import data_extents
from ..blocks import BLOCK_SIZE
from ..errors import HistoryError, MarkNotRestorable
from ..snapshot import Entry, Kind, order_key
from .ranges import MAX_ROW, Ranges
from .recorder import Recorder
from .store import ALIVE
from .versions import unpack_xattrs

WINDOW = 64 * BLOCK_SIZE  # bytes composed at a time
_ZEROS = bytes(64)


def iso(t: float) -> str:
    """``t`` (seconds since the epoch) as ISO 8601 in UTC with microseconds."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """An ISO 8601 time (``Z`` or an offset; a time without one is taken as UTC)."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise MarkNotRestorable(f"{text!r} is not an ISO 8601 time",
                                hint="write it like 2026-11-30T14:05:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


class Marks:
    """The restore points of ``recorder``'s window: listing, choosing, pinning."""

    def __init__(self, recorder: Recorder) -> None:
        self.rec = recorder

    def window(self) -> dict[str, Any]:
        st = self.rec.status()
        return {"oldest": st["oldest"], "newest": st["newest"],
                "oldest_at": None if st["oldest_at"] is None else iso(st["oldest_at"]),
                "newest_at": None if st["newest_at"] is None else iso(st["newest_at"])}

    def describe_window(self) -> str:
        w = self.window()
        if w["oldest"] is None:
            return "the replica has no restore points yet"
        return (f"the window holds g{w['oldest']} ({w['oldest_at']}) to g{w['newest']} "
                f"({w['newest_at']})")

    def _bounds(self) -> tuple[int, int]:
        rec = self.rec
        if not rec.active:
            why = (f"the history is {rec.off} (see the replica's log)" if rec.off else
                   "a synchronisation this replica needed is running; restore points start when it "
                   "ends" if rec.syncing else "the replica keeps no history (start it with --retain)"
                   if rec.retain is None and rec.retain_size is None else
                   "the history starts at the next mark")
            raise MarkNotRestorable(f"no restore points: {why}")
        return max(rec.window, rec.base or 0), rec.durable

    def list(self, *, path: str | None = None, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Restore points oldest first (``gseq > after``), at most ``limit``."""
        out: list[dict[str, Any]] = []
        while len(out) < limit:
            with self.rec.lock:
                low, high = self._bounds()
                rows = self.rec.db.execute(
                    "SELECT gseq, kind, paths, origin, received_at FROM marks WHERE gseq >= ? AND "
                    "gseq <= ? AND gseq > ? ORDER BY gseq LIMIT ?", (low, high, after, 10000)).fetchall()
                pins = dict(self.rec.db.execute("SELECT gseq, name FROM pins"))
            if not rows:
                return out
            after = rows[-1][0]
            for gseq, kind, paths, origin, received_at in rows:
                names = json.loads(paths)
                if path is not None and path != "" and not any(
                        p == path or p.startswith(path + "/") for p in names):
                    continue
                item = {"gseq": gseq, "kind": kind, "paths": names, "origin": origin,
                        "received_at": iso(received_at)}
                if gseq in pins:
                    item["pin"] = pins[gseq]
                out.append(item)
                if len(out) >= limit:
                    break
        return out

    def check(self, gseq: int) -> int:
        """``gseq`` if it is a restore point of the window, else `MarkNotRestorable`."""
        with self.rec.lock:
            low, high = self._bounds()
            listed = self.rec.db.execute("SELECT 1 FROM marks WHERE gseq=?", (gseq,)).fetchone()
        if not low <= gseq <= high or listed is None:
            where = "after" if gseq > high else "before" if gseq < low else "inside a synchronisation of"
            raise MarkNotRestorable(f"mark g{gseq} is not a restore point: it lies {where} the "
                                    f"window; {self.describe_window()}")
        return gseq

    def latest(self) -> int:
        with self.rec.lock:
            low, high = self._bounds()
            row = self.rec.db.execute("SELECT max(gseq) FROM marks WHERE gseq >= ? AND gseq <= ?",
                                      (low, high)).fetchone()
        if row[0] is None:
            raise MarkNotRestorable(f"no restore points yet: {self.describe_window()}")
        return int(row[0])

    def at_time(self, when: float) -> int:
        """The newest restore point the replica received at or before ``when``."""
        with self.rec.lock:
            low, high = self._bounds()
            row = self.rec.db.execute(
                "SELECT max(gseq) FROM marks WHERE gseq >= ? AND gseq <= ? AND received_at <= ?",
                (low, high, when + 5e-7)).fetchone()  # (times are shown to the microsecond)
        if row[0] is None:
            raise MarkNotRestorable(f"no restore point was received at or before {iso(when)}: "
                                    f"{self.describe_window()}")
        return int(row[0])

    def pinned(self, name: str) -> int:
        row = self.rec.db.execute("SELECT gseq FROM pins WHERE name=?", (name,)).fetchone()
        if row is None:
            raise MarkNotRestorable(f"no restore point is pinned as {name!r}",
                                    hint="`clusterrep marks` shows the pins ([pinned: NAME])")
        return self.check(int(row[0]))

    def pin(self, gseq: int, name: str) -> None:
        """Keep restore point ``gseq`` past the retention window, as ``name``."""
        if not name or len(name) > 200 or not name.isprintable():
            raise MarkNotRestorable(f"pin name {name!r} must be 1..200 printable characters",
                                    hint="name it like before-upgrade-2026-11-30")
        with self.rec.lock:
            self.check(gseq)
            taken = self.rec.db.execute("SELECT gseq FROM pins WHERE name=?", (name,)).fetchone()
            if taken is not None and taken[0] != gseq:
                raise MarkNotRestorable(f"pin {name!r} already keeps g{taken[0]}",
                                        hint="unpin it first, or choose another name")
            self.rec.db.execute("INSERT OR REPLACE INTO pins(name, gseq) VALUES(?, ?)", (name, gseq))
            self.rec.commit()

    def unpin(self, name: str) -> int:
        with self.rec.lock:
            gseq = self.rec.db.execute("SELECT gseq FROM pins WHERE name=?", (name,)).fetchone()
            if gseq is None:
                raise MarkNotRestorable(f"no restore point is pinned as {name!r}",
                                        hint="`clusterrep marks` shows the pins ([pinned: NAME])")
            self.rec.db.execute("DELETE FROM pins WHERE name=?", (name,))
            self.rec.commit()
        return int(gseq[0])


class MarkView:
    """The volume at restore point ``gseq`` (see the module docstring)."""

    def __init__(self, recorder: Recorder, gseq: int) -> None:
        if not recorder.ready:
            raise HistoryError("the replica is still re-applying what it journaled before its "
                               "restart", hint="try again in a moment")
        self.rec = recorder
        self.db = recorder.db
        self.mark = Marks(recorder).check(gseq)
        self._sizes: dict[int, int] = {}

    # -- entries -----------------------------------------------------------------------------

    def entries(self, paths: list[str] | None = None) -> list[Entry]:
        """The entries at the mark: all, or the subtrees of ``paths`` with the directories above
        them (`MarkNotRestorable` for a path that did not exist then)."""
        m = self.mark
        with self.rec.lock:
            children: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
            for parent, name, fid in self.db.execute(
                    "SELECT parent, name, fid FROM names WHERE born <= ? AND died > ?", (m, m)):
                children[parent].append((bytes(name), fid))
            root = self.rec.root
            if root is None:
                raise HistoryError("the history has no root directory")
            chosen = self._choose(children, root, paths)
            fids = {fid for _, fid in chosen}
            attrs = {row[0]: row[1:] for row in self.db.execute(
                "SELECT fid, mode, uid, gid, mtime_ns, xattrs FROM attrs WHERE born <= ? AND died > ?",
                (m, m)) if row[0] in fids}
            files = {row[0]: row[1:] for row in self.db.execute(
                "SELECT fid, kind, rdev, symlink FROM files") if row[0] in fids}
            self._sizes_at([fid for fid, (kind, _, _) in files.items() if kind == Kind.FILE.value])
        nlink: dict[int, int] = defaultdict(int)
        for _, fid in chosen:
            nlink[fid] += 1
        out = []
        for path, fid in chosen:
            kind, rdev, symlink = files[fid]
            mode, uid, gid, mtime_ns, xattrs = attrs[fid]
            out.append(Entry(path=path, kind=Kind(kind), size=self._sizes.get(fid, 0), mode=mode,
                             uid=uid, gid=gid, mtime_ns=mtime_ns, rdev=rdev,
                             target=None if symlink is None else os.fsdecode(bytes(symlink)),
                             xattrs=unpack_xattrs(xattrs), inode=(0, fid),
                             nlink=1 if kind == Kind.DIR.value else nlink[fid]))
        out.sort(key=lambda e: order_key(e.path))
        return out

    def _choose(self, children: dict[int, list[tuple[bytes, int]]], root: int,
                paths: list[str] | None) -> list[tuple[str, int]]:
        chosen: dict[str, int] = {"": root}

        def subtree(path: str, fid: int) -> None:
            stack = [(path, fid)]
            while stack:
                p, f = stack.pop()
                chosen[p] = f
                for name, child in children.get(f, ()):
                    stack.append((f"{p}/{os.fsdecode(name)}" if p else os.fsdecode(name), child))

        if paths is None:
            subtree("", root)
            return list(chosen.items())
        for path in paths:
            fid, at = root, ""
            for part in [p for p in path.split("/") if p]:
                found = [c for n, c in children.get(fid, ()) if n == os.fsencode(part)]
                if not found:
                    raise MarkNotRestorable(f"{path!r} did not exist at mark g{self.mark}",
                                            hint="`clusterrep marks --path` lists the marks that "
                                                 "touched it")
                fid = found[0]
                at = f"{at}/{part}" if at else part
                chosen[at] = fid
            subtree(at, fid)
        return list(chosen.items())

    def _sizes_at(self, fids: list[int]) -> None:
        """The sizes at the mark of regular files ``fids`` (lock held): the first undo row after
        the mark says it; a file no change touched since has it now (one query, one lstat each)."""
        wanted = set(fids)
        for fid, size, _ in self.db.execute(
                "SELECT fid, size_before, min(id) FROM undo WHERE k > ? GROUP BY fid", (self.mark,)):
            if fid in wanted:
                self._sizes[fid] = int(size)
        rest = [fid for fid in fids if fid not in self._sizes]
        if not rest:
            return
        up = {fid: (parent, bytes(name)) for parent, name, fid in self.db.execute(
            "SELECT parent, name, fid FROM names WHERE died=?", (ALIVE,))}
        info = {fid: (ino, dead) for fid, ino, dead in self.db.execute("SELECT fid, ino, dead FROM files")}
        paths: dict[int, str] = {self.rec.root: self.rec.target.root} if self.rec.root else {}

        def path_of(fid: int) -> str:
            chain = []
            while fid not in paths:
                if fid not in up:
                    raise HistoryError(f"file #{fid} has no current name in the history")
                chain.append(fid)
                fid = up[fid][0]
            for f in reversed(chain):
                paths[f] = os.path.join(paths[up[f][0]], os.fsdecode(up[f][1]))
            return paths[chain[0]] if chain else paths[fid]

        for fid in rest:
            ino, dead = info[fid]
            if dead is not None:
                st = os.stat(self.rec.store.object_path(fid), follow_symlinks=False)
            else:
                st = os.stat(path_of(fid), follow_symlinks=False)
                if st.st_ino != ino:
                    raise HistoryError(f"{path_of(fid)} is not the file the history knows there")
            self._sizes[fid] = st.st_size

    def _size_at(self, fid: int) -> int:
        row = self.db.execute("SELECT size_before FROM undo WHERE fid=? AND k > ? ORDER BY id LIMIT 1",
                              (fid, self.mark)).fetchone()
        if row is not None:
            return int(row[0])
        fd = self._open_now(fid)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    # -- content -----------------------------------------------------------------------------

    def _open_now(self, fid: int) -> int:
        """A read descriptor of file ``fid`` as it is now (target or kept copy); lock held."""
        row = self.db.execute("SELECT ino, dead, object FROM files WHERE fid=?", (fid,)).fetchone()
        if row is None:
            raise HistoryError(f"the history lost file #{fid}")
        ino, dead, kept = row
        if dead is not None:
            if not kept:
                raise HistoryError(f"the history did not keep the content of file #{fid}")
            return self.rec.store.open_object(fid)
        parts: list[str] = []
        at = fid
        while at != self.rec.root:
            up = self.db.execute("SELECT parent, name FROM names WHERE fid=? AND died=? LIMIT 1",
                                 (at, ALIVE)).fetchone()
            if up is None:
                raise HistoryError(f"file #{fid} has no current name in the history")
            parts.append(os.fsdecode(bytes(up[1])))
            at = up[0]
        path = os.path.join(self.rec.target.root, *reversed(parts))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if os.fstat(fd).st_ino != ino:
            os.close(fd)
            raise HistoryError(f"{path} is not the file the history knows there (out of step)")
        return fd

    def size(self, fid: int) -> int:
        if fid not in self._sizes:
            with self.rec.lock:
                self._sizes[fid] = self._size_at(fid)
        return self._sizes[fid]

    def extents(self, fid: int) -> list[tuple[int, int]]:
        """``(start, end)`` byte ranges of file ``fid`` that may hold data at the mark, in order;
        everything outside them was zeros (a hole) at the mark. A superset: a range may hold
        zeros (as a file system's SEEK_DATA may say)."""
        size = self.size(fid)
        with self.rec.lock:
            fd = self._open_now(fid)
        try:
            return self._spans(fid, fd, size)
        finally:
            os.close(fd)

    def _spans(self, fid: int, fd: int, size: int) -> list[tuple[int, int]]:
        """The file's data now, and every range an undo row after the mark holds, merged."""
        found = Ranges()
        for a, b in data_extents(fd, min(os.fstat(fd).st_size, size)):
            found.add(a, b)
        with self.rec.lock:
            for off, n in self.db.execute(
                    "SELECT off, len FROM undo WHERE fid=? AND k > ? AND pos >= 0 AND off < ?",
                    (fid, self.mark, size)):
                found.add(off, min(off + n, size))
        return list(zip(found.starts, found.ends, strict=True))

    def blocks(self, fid: int) -> Iterator[tuple[int, bytes]]:
        """``(index, data)`` of each block of file ``fid`` at the mark that is not all zeros."""
        size = self.size(fid)
        with self.rec.lock:
            fd = self._open_now(fid)
        try:
            now = os.fstat(fd).st_size
            spans = self._spans(fid, fd, size)
            windows = sorted({w for a, b in spans for w in range(a - a % WINDOW, min(b, size), WINDOW)})
            for w in windows:  # (elsewhere the file was a hole at the mark: see the module doc)
                n = min(WINDOW, size - w)
                buf = bytearray(n)
                for a, b in data_extents(fd, min(now, w + n), w):
                    data = os.pread(fd, b - a, a)
                    buf[a - w:a - w + len(data)] = data
                self._overlay(fid, w, buf)
                view = memoryview(buf)
                for i in range(0, n, BLOCK_SIZE):
                    chunk = bytes(view[i:i + BLOCK_SIZE])
                    # (most blocks of an image start with something other than zeros)
                    if chunk[:64] != _ZEROS or chunk.count(0) != len(chunk):
                        yield (w + i) // BLOCK_SIZE, chunk
        finally:
            os.close(fd)

    def read(self, fid: int, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of file ``fid`` at the mark (shorter at its end)."""
        size = self.size(fid)
        n = max(0, min(length, size - offset))
        if n == 0:
            return b""
        with self.rec.lock:
            fd = self._open_now(fid)
        try:
            buf = bytearray(n)
            data = os.pread(fd, n, offset)
            buf[:len(data)] = data
        finally:
            os.close(fd)
        self._overlay(fid, offset, buf)
        return bytes(buf)

    def _overlay(self, fid: int, w: int, buf: bytearray) -> None:
        """Put back into ``buf`` (bytes ``[w, w+len)`` read now) what changes after the mark
        replaced: the first change's undo row wins for each byte."""
        end = w + len(buf)
        m = self.mark
        with self.rec.lock:
            rows = self.db.execute(
                "SELECT id, off, len, seg, pos FROM undo WHERE fid=? AND off >= ? AND off < ? AND k > ? "
                "AND pos >= 0", (fid, w - MAX_ROW, end, m)).fetchall()
            rows += self.db.execute(
                "SELECT id, off, len, seg, pos FROM undo WHERE fid=? AND pos < 0 AND len > 0 AND k > ? "
                "AND off < ? AND off + len > ?", (fid, m, end, w)).fetchall()
            rows.sort()
            covered = Ranges()
            for _, off, length, seg, pos in rows:
                for x, y in covered.missing(max(off, w), min(off + length, end)):
                    if pos < 0:
                        buf[x - w:y - w] = bytes(y - x)
                    else:
                        buf[x - w:y - w] = self.rec.store.read(seg, pos + x - off, y - x)
                    covered.add(x, y)
