"""The history store: one directory holding what rebuilds the volume at any mark in the window.

Layout (``<state>/history/``)::

    history.db        SQLite (WAL): versioned names and attributes, undo rows, marks, pins
    undo/NNNNNNNN.undo append-only segments of overwritten bytes (an undo row points into one)
    objects/<fid>     files whose last name was removed, kept by a hard link (no copy)

Tables (``k`` is a *key* in the merged order: a metadata event's key is its ``gseq``; a data
event's key is ``after + 1``, since it lies between mark ``after`` and the next; the state at
mark ``M`` holds exactly the changes with key <= M):

* ``files(fid, ino, kind, rdev, symlink, dead, object)``: one row per inode the history knows;
  ``dead`` is the key at which its last name went (NULL while it has one in the target),
  ``object`` 1 when ``objects/<fid>`` keeps its content.
* ``names(parent, name, fid, born, died)``: directory entry ``name`` (raw bytes) of directory
  ``parent`` led to ``fid`` for keys in ``[born, died)``; ``died`` is `ALIVE` for a current name.
* ``attrs(fid, born, died, mode, uid, gid, mtime_ns, xattrs)``: versions of an inode's
  attributes, the same way (``xattrs`` a msgpack map of name to value).
* ``undo(id, fid, k, src, seq, off, len, size_before, seg, pos)``: before the change with key
  ``k`` (event ``src``/``seq``) the bytes ``[off, off+len)`` of ``fid`` were those at ``pos`` in
  segment ``seg`` (``pos`` -1: zeros) and the file was ``size_before`` bytes long. The value of a
  byte at mark M is that of the first row (by ``id``) with ``k > M`` covering it, else the
  file's current byte; its size is the first such row's ``size_before``, else its current size.
* ``segments(seg, bytes, max_k)``, ``marks(gseq, kind, paths, origin, received_at)``,
  ``pins(name, gseq)``, ``meta(key, value)`` (JSON values: ``base``, ``root``, ``position``,
  ``durable``, ``gaps``).

Durability: undo bytes are written and ``fdatasync``ed, then their rows committed
(``synchronous=FULL``), before the change they undo is made to the target (see
`clusterrep.history.recorder`). At start, a segment longer than its committed size is cut back
(bytes of a group whose commit never happened) and files no row names are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..durable import fsync_dir
from ..errors import HistoryError

log = logging.getLogger("clusterrep.history")

ALIVE = 1 << 62
SEGMENT_BYTES = 64 << 20
RESERVE = 1 << 20  # bytes kept free for the commit of a prune on a full disk
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(fid INTEGER PRIMARY KEY, ino INTEGER NOT NULL, kind TEXT NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0, symlink BLOB, dead INTEGER, object INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS files_dead ON files(dead);
CREATE TABLE IF NOT EXISTS names(parent INTEGER NOT NULL, name BLOB NOT NULL, fid INTEGER NOT NULL,
    born INTEGER NOT NULL, died INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS names_at ON names(parent, name, died);
CREATE INDEX IF NOT EXISTS names_fid ON names(fid, died);
CREATE INDEX IF NOT EXISTS names_died ON names(died);
CREATE TABLE IF NOT EXISTS attrs(fid INTEGER NOT NULL, born INTEGER NOT NULL, died INTEGER NOT NULL,
    mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    xattrs BLOB);
CREATE INDEX IF NOT EXISTS attrs_fid ON attrs(fid, died);
CREATE INDEX IF NOT EXISTS attrs_died ON attrs(died);
CREATE TABLE IF NOT EXISTS undo(id INTEGER PRIMARY KEY, fid INTEGER NOT NULL, k INTEGER NOT NULL,
    src TEXT NOT NULL, seq INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
    size_before INTEGER NOT NULL, seg INTEGER NOT NULL, pos INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS undo_at ON undo(fid, off);
CREATE INDEX IF NOT EXISTS undo_first ON undo(fid, k);
CREATE INDEX IF NOT EXISTS undo_event ON undo(src, seq);
CREATE INDEX IF NOT EXISTS undo_k ON undo(k);
CREATE TABLE IF NOT EXISTS segments(seg INTEGER PRIMARY KEY, bytes INTEGER NOT NULL,
    max_k INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS marks(gseq INTEGER PRIMARY KEY, kind TEXT NOT NULL, paths TEXT NOT NULL,
    origin TEXT NOT NULL, received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pins(name TEXT PRIMARY KEY, gseq INTEGER NOT NULL);
"""


@dataclass
class Pruned:
    """What a prune let go: kept files (fids) and undo segments to remove once committed."""

    objects: list[int]
    segments: list[int]
    bytes: int


class Store:
    """The history directory (see the module docstring). Not thread-safe: the owner (a
    `clusterrep.history.recorder.Recorder`) serialises access with its lock."""

    def __init__(self, root: str | os.PathLike[str], *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = Path(root)
        self.segment_bytes = segment_bytes  # a segment is pruned whole: small bounds want small ones
        self.undo_dir = self.root / "undo"
        self.objects_dir = self.root / "objects"
        for d in (self.root, self.undo_dir, self.objects_dir):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.root / "history.db", check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA journal_size_limit=4194304")  # (the WAL shrinks back)
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open the history database in {self.root}: {exc}",
                               hint="move the damaged history directory aside; the replica starts "
                                    "a new history (restore points before it are lost)") from None
        version = self.get("schema")
        if version is None:
            self.put("schema", SCHEMA_VERSION)
            self.db.commit()
        elif version != SCHEMA_VERSION:
            raise HistoryError(f"history in {self.root} has schema {version}, this version reads "
                               f"{SCHEMA_VERSION}")
        self.objects_fd = os.open(self.objects_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._seg_fd: int | None = None
        self._seg = 0
        self._seg_bytes = 0
        self._read_fds: dict[int, int] = {}
        self._recover()
        self.make_reserve()

    # -- meta --------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, json.dumps(value)))

    def commit(self) -> None:
        self.db.commit()

    # -- segments ----------------------------------------------------------------------------

    def _recover(self) -> None:
        """Cut segments back to their committed size; remove files no row names."""
        known = dict(self.db.execute("SELECT seg, bytes FROM segments"))
        for p in self.undo_dir.iterdir():
            seg = _seg_number(p.name)
            if seg is None or seg not in known:
                p.unlink()
                continue
            if p.stat().st_size > known[seg]:
                os.truncate(p, known[seg])
        if known:
            self._seg = max(known)
            self._seg_bytes = known[self._seg]
        objects = {str(fid) for (fid,) in self.db.execute("SELECT fid FROM files WHERE object=1")}
        for name in os.listdir(self.objects_fd):
            if name not in objects:
                os.unlink(name, dir_fd=self.objects_fd)

    def append(self, data: bytes | bytearray, max_k: int) -> tuple[int, int]:
        """Write ``data`` to the current segment and make it durable; ``(seg, pos)`` of its first
        byte. The segment's committed size moves only with the caller's next commit."""
        if self._seg_fd is not None and self._seg_bytes and self._seg_bytes + len(data) > self.segment_bytes:
            os.close(self._seg_fd)
            self._seg_fd = None
            self._seg += 1
            self._seg_bytes = 0
        if self._seg_fd is None:
            self._open_segment()
        assert self._seg_fd is not None
        pos = self._seg_bytes
        view = memoryview(data)
        while view:
            n = os.pwrite(self._seg_fd, view, self._seg_bytes)
            view = view[n:]
            self._seg_bytes += n
        os.fdatasync(self._seg_fd)
        self.db.execute("INSERT INTO segments(seg, bytes, max_k) VALUES(?, ?, ?) ON CONFLICT(seg) DO "
                        "UPDATE SET bytes=excluded.bytes, max_k=max(max_k, excluded.max_k)",
                        (self._seg, self._seg_bytes, max_k))
        return self._seg, pos

    def _open_segment(self) -> None:
        path = self.undo_dir / f"{self._seg:08d}.undo"
        self._seg_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fsync_dir(self.undo_dir)

    def read(self, seg: int, pos: int, length: int) -> bytes:
        """``length`` undo bytes at ``pos`` of segment ``seg``."""
        fd = self._read_fds.get(seg)
        if fd is None:
            try:
                fd = os.open(self.undo_dir / f"{seg:08d}.undo", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise HistoryError(f"undo segment {seg} is missing from {self.undo_dir}") from None
            self._read_fds[seg] = fd
        data = os.pread(fd, length, pos)
        if len(data) != length:
            raise HistoryError(f"undo segment {seg} is shorter than its rows say ({pos}+{length})")
        return data

    # -- room for the commit that frees room --------------------------------------------------

    def make_reserve(self) -> None:
        """Keep ``RESERVE`` bytes of the disk in a file, so that on a full disk the commit of a
        prune (which needs room in the database's log before it frees any) can still be made."""
        path = self.root / "reserve"
        if path.exists():
            return
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, bytes(RESERVE), 0)
            finally:
                os.close(fd)

    def release_reserve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / "reserve").unlink()

    # -- objects -----------------------------------------------------------------------------

    def object_path(self, fid: int) -> Path:
        return self.objects_dir / str(fid)

    def open_object(self, fid: int) -> int:
        try:
            return os.open(str(fid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.objects_fd)
        except FileNotFoundError:
            raise HistoryError(f"the kept copy of file #{fid} is missing from {self.objects_dir}"
                               ) from None

    # -- size and pruning --------------------------------------------------------------------

    def usage(self) -> int:
        """Bytes the history takes on disk: segments, kept files (allocated), the database."""
        total = sum(b for (b,) in self.db.execute("SELECT bytes FROM segments"))
        for name in os.listdir(self.objects_fd):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(name, dir_fd=self.objects_fd).st_blocks * 512
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(self.root / f"history.db{suffix}").st_size
        return total

    def prune(self, window: int) -> Pruned:
        """Forget what only restores marks before ``window`` (not committed: the caller commits,
        then `drop`s the files the returned `Pruned` names)."""
        db = self.db
        db.execute("DELETE FROM undo WHERE k <= ?", (window,))
        db.execute("DELETE FROM names WHERE died <= ?", (window,))
        db.execute("DELETE FROM attrs WHERE died <= ?", (window,))
        db.execute("DELETE FROM marks WHERE gseq < ?", (window,))
        gone = [fid for (fid,) in db.execute(
            "SELECT fid FROM files WHERE dead IS NOT NULL AND dead <= ?", (window,))]
        kept = [fid for fid in gone if db.execute(
            "SELECT object FROM files WHERE fid=?", (fid,)).fetchone()[0]]
        db.executemany("DELETE FROM files WHERE fid=?", ((fid,) for fid in gone))
        db.executemany("DELETE FROM attrs WHERE fid=?", ((fid,) for fid in gone))
        segs = [(s, b) for s, b in db.execute(
            "SELECT seg, bytes FROM segments WHERE max_k <= ? AND seg < ?", (window, self._seg))]
        db.executemany("DELETE FROM segments WHERE seg=?", ((s,) for s, _ in segs))
        self.put("window", window)
        return Pruned(kept, [s for s, _ in segs], sum(b for _, b in segs))

    def drop(self, pruned: Pruned) -> None:
        """Remove the files of a committed prune (a crash before leaves them to `_recover`)."""
        for fid in pruned.objects:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(fid), dir_fd=self.objects_fd)
        for seg in pruned.segments:
            fd = self._read_fds.pop(seg, None)
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                (self.undo_dir / f"{seg:08d}.undo").unlink()

    def clear(self) -> None:
        """Forget the whole history (tables, segments, kept files)."""
        db = self.db
        for table in ("files", "names", "attrs", "undo", "segments", "marks"):
            db.execute(f"DELETE FROM {table}")
        for key in ("base", "root", "window"):
            db.execute("DELETE FROM meta WHERE key=?", (key,))
        db.commit()
        if self._seg_fd is not None:
            os.close(self._seg_fd)
            self._seg_fd = None
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        shutil.rmtree(self.undo_dir)
        self.undo_dir.mkdir()
        for name in os.listdir(self.objects_fd):
            os.unlink(name, dir_fd=self.objects_fd)
        self._seg += 1
        self._seg_bytes = 0

    def close(self) -> None:
        for fd in [*self._read_fds.values(), *([self._seg_fd] if self._seg_fd is not None else [])]:
            os.close(fd)
        self._read_fds.clear()
        self._seg_fd = None
        os.close(self.objects_fd)
        self.db.close()


def _seg_number(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    return int(stem) if dot and ext == "undo" and stem.isdigit() else None

