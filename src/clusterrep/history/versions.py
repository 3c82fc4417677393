"""Versions of the volume's names and attributes, kept in the history database.

`Versions` maintains the ``files``, ``names`` and ``attrs`` tables of `clusterrep.history.store`
from the events the applier applies (a name or an attribute is a row valid for keys ``[born,
died)``; the current ones have ``died`` = `ALIVE`) and resolves a current path to its file id
(``fid``). `Versions.reconcile` makes the current rows those of a walk of the target, recording
each difference at one key: the whole tree when a history starts, what a synchronisation
changed at its end. The caller (`clusterrep.history.recorder.Recorder`) holds the lock and
commits.

Errors: `clusterrep.errors.HistoryError` when the tables and the target disagree (a path the
history does not know); `OSError` and `sqlite3.Error` pass through.
"""

from __future__ import annotations

import os

import msgpack

from ..confined import Target
from ..errors import HistoryError
from ..events import Attr, MetaEvent, SetXattr
from ..snapshot import Entry, Kind, read_entry, walk
from .store import ALIVE, Store


def pack_xattrs(xattrs: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]] | None) -> bytes:
    items = sorted((os.fsencode(n), v) for n, v in (xattrs or ()))
    return msgpack.packb(items, use_bin_type=True)


def unpack_xattrs(blob: bytes | None) -> tuple[tuple[str, bytes], ...]:
    if not blob:
        return ()
    return tuple((os.fsdecode(n), bytes(v)) for n, v in msgpack.unpackb(blob, raw=True))


class Versions:
    """The names and attributes of ``store`` kept in step with ``target`` (module docstring)."""

    def __init__(self, store: Store, target: Target) -> None:
        self.store = store
        self.db = store.db
        self.target = target
        self.root: int | None = store.get("root")
        self._fids: dict[str, int] = {}  # current path -> fid (cleared when names move)

    def forget(self) -> None:
        """Drop what is cached (after the tables were cleared or rolled back)."""
        self._fids.clear()
        self.root = self.store.get("root")

    def fid_of(self, path: str) -> int:
        """The file the history knows at ``path`` now (HistoryError if none)."""
        fid = self.fid_or_none(path)
        if fid is None:
            raise HistoryError(f"the history does not know {path!r} (it went out of step with "
                               "the target)")
        return fid

    def fid_or_none(self, path: str) -> int | None:
        fid = self._fids.get(path)
        if fid is not None:
            return fid
        if path == "":
            return self.root
        head, _, name = path.rpartition("/")
        parent = self.fid_or_none(head)
        if parent is None:
            return None
        row = self.db.execute("SELECT fid FROM names WHERE parent=? AND name=? AND died=?",
                              (parent, os.fsencode(name), ALIVE)).fetchone()
        if row is None:
            return None
        if len(self._fids) > 65536:
            self._fids.clear()
        self._fids[path] = row[0]
        return row[0]

    def name(self, path: str, fid: int, k: int) -> None:
        head, _, name = path.rpartition("/")
        self.db.execute("INSERT INTO names(parent, name, fid, born, died) VALUES(?, ?, ?, ?, ?)",
                        (self.fid_of(head), os.fsencode(name), fid, k, ALIVE))
        self._fids[path] = fid

    def unname(self, path: str, k: int) -> int:
        """End name ``path`` at key ``k``; a file left without names dies there. Its fid."""
        fid = self.fid_of(path)
        head, _, name = path.rpartition("/")
        self.db.execute("UPDATE names SET died=? WHERE parent=? AND name=? AND died=?",
                        (k, self.fid_of(head), os.fsencode(name), ALIVE))
        self._fids.clear()
        if self.db.execute("SELECT 1 FROM names WHERE fid=? AND died=? LIMIT 1",
                           (fid, ALIVE)).fetchone() is None:
            self.db.execute("UPDATE files SET dead=? WHERE fid=?", (k, fid))
        return fid

    def created(self, path: str, k: int) -> None:
        fd = self.target.inode(path)
        try:
            entry = read_entry(path, fd)
        finally:
            os.close(fd)
        fid = self.new_file(entry, k)
        self.name(path, fid, k)

    def new_file(self, entry: Entry, k: int) -> int:
        cur = self.db.execute(
            "INSERT INTO files(ino, kind, rdev, symlink) VALUES(?, ?, ?, ?)",
            (entry.inode[1], entry.kind.value, entry.rdev,
             None if entry.target is None else os.fsencode(entry.target)))
        fid = cur.lastrowid
        assert fid is not None
        self.db.execute("INSERT INTO attrs(fid, born, died, mode, uid, gid, mtime_ns, xattrs) "
                        "VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                        (fid, k, ALIVE, entry.mode, entry.uid, entry.gid, entry.mtime_ns,
                         pack_xattrs(entry.xattrs)))
        return fid

    def renamed(self, src: str, dst: str, k: int) -> None:
        fid = self.fid_of(src)
        old = self.fid_or_none(dst)
        if old == fid:
            return  # two names of one inode: rename(2) does nothing
        if old is not None:
            self.unname(dst, k)
        self.name(dst, fid, k)  # (first: the file keeps a name throughout)
        self.unname(src, k)

    def exchanged(self, a: str, b: str, k: int) -> None:
        fa, fb = self.fid_of(a), self.fid_of(b)
        self.unname(a, k)
        self.unname(b, k)
        self.db.execute("UPDATE files SET dead=NULL WHERE fid IN (?, ?)", (fa, fb))
        self.name(a, fb, k)
        self.name(b, fa, k)

    def set_attrs(self, fid: int, k: int, *, mode: int | None = None, uid: int | None = None,
                   gid: int | None = None, mtime_ns: int | None = None,
                   xattrs: bytes | None = None) -> None:
        row = self.db.execute("SELECT rowid, born, mode, uid, gid, mtime_ns, xattrs FROM attrs "
                              "WHERE fid=? AND died=?", (fid, ALIVE)).fetchone()
        if row is None:
            raise HistoryError(f"the history has no attributes for file #{fid}")
        rowid, born, *cur = row
        new = [cur[0] if mode is None else mode, cur[1] if uid is None else uid,
               cur[2] if gid is None else gid, cur[3] if mtime_ns is None else mtime_ns,
               cur[4] if xattrs is None else xattrs]
        if new == cur:
            return
        if born == k:
            self.db.execute("UPDATE attrs SET mode=?, uid=?, gid=?, mtime_ns=?, xattrs=? WHERE rowid=?",
                            (*new, rowid))
            return
        self.db.execute("UPDATE attrs SET died=? WHERE rowid=?", (k, rowid))
        self.db.execute("INSERT INTO attrs(fid, born, died, mode, uid, gid, mtime_ns, xattrs) "
                        "VALUES(?, ?, ?, ?, ?, ?, ?, ?)", (fid, k, ALIVE, *new))

    def apply_attr(self, attr: Attr, k: int) -> None:
        fid = self.fid_or_none(attr.path)
        if fid is None:
            return  # (a name this event removed)
        self.set_attrs(fid, k, mode=attr.mode, uid=attr.uid, gid=attr.gid, mtime_ns=attr.mtime_ns,
                        xattrs=None if attr.xattrs is None else pack_xattrs(attr.xattrs))

    def xattr(self, ev: MetaEvent, k: int) -> None:
        fid = self.fid_of(ev.path)  # type: ignore[attr-defined]
        row = self.db.execute("SELECT xattrs FROM attrs WHERE fid=? AND died=?", (fid, ALIVE)).fetchone()
        xattrs = dict(unpack_xattrs(row[0] if row else None))
        if isinstance(ev, SetXattr):
            xattrs[ev.name] = ev.value
        else:
            xattrs.pop(ev.name, None)  # type: ignore[attr-defined]
        self.set_attrs(fid, k, xattrs=pack_xattrs(list(xattrs.items())))

    # -- starting, reconciling, restarting ---------------------------------------------------

    def reconcile(self, k: int) -> None:
        """Make the current names and attributes those of the target (walked), recording every
        difference at key ``k`` (a synchronisation's changes; all of it for a new history)."""
        db = self.db
        by_ino = {ino: fid for fid, ino in db.execute("SELECT fid, ino FROM files WHERE dead IS NULL")}
        names = {(parent, bytes(name)): fid for parent, name, fid in db.execute(
            "SELECT parent, name, fid FROM names WHERE died=?", (ALIVE,))}
        seen_names: set[tuple[int, bytes]] = set()
        seen: set[int] = set()
        dirs: dict[str, int] = {}
        for entry in walk(self.target.root):
            fid = by_ino.get(entry.inode[1])
            kind = db.execute("SELECT kind FROM files WHERE fid=?", (fid,)).fetchone() if fid else None
            if fid is None or kind is None or kind[0] != entry.kind.value:
                fid = self.new_file(entry, k)
                by_ino[entry.inode[1]] = fid
            elif fid not in seen:
                self.set_attrs(fid, k, mode=entry.mode, uid=entry.uid, gid=entry.gid,
                                mtime_ns=entry.mtime_ns, xattrs=pack_xattrs(entry.xattrs))
            seen.add(fid)
            if entry.kind is Kind.DIR:
                dirs[entry.path] = fid
            if entry.path == "":
                self.root = fid
                self.store.put("root", fid)
                continue
            head, _, name = entry.path.rpartition("/")
            key = (dirs[head], os.fsencode(name))
            seen_names.add(key)
            if names.get(key) != fid:
                if key in names:
                    db.execute("UPDATE names SET died=? WHERE parent=? AND name=? AND died=?",
                               (k, *key, ALIVE))
                db.execute("INSERT INTO names(parent, name, fid, born, died) VALUES(?, ?, ?, ?, ?)",
                           (*key, fid, k, ALIVE))
        for key in names.keys() - seen_names:
            db.execute("UPDATE names SET died=? WHERE parent=? AND name=? AND died=?", (k, *key, ALIVE))
        for fid in set(by_ino.values()) - seen:
            db.execute("UPDATE files SET dead=? WHERE fid=?", (k, fid))
        self._fids.clear()
