"""A persistent cache of files' block manifests, so that the replica does not rehash its target.

An entry is keyed by ``(st_dev, st_ino)`` and valid for one version of the file: its
``(st_size, st_mtime_ns, st_ctime_ns)`` and the wall-clock time ``hashed_at_ns`` read before the
``stat`` that produced the key. Git's racy-clean rule: an entry is trusted only if the file's
ctime was at least ``RACY_NS`` (2 s) older than ``hashed_at_ns``; otherwise a write in the same
timestamp tick as the hashing could leave size and times unchanged while the content changed
(ctime has jiffy granularity on Linux). Such entries are not stored, and ``lookup`` refuses them
anyway, as it refuses an entry hashed "after" ``now_ns`` (the clock went back since). ``verify``
must not use the cache at all.

Storage: one SQLite database (standard library), a row per file and a row per window of
``WINDOW_BLOCKS`` blocks (one bit per hole, 32 bytes per data block), so nothing is loaded whole:
memory is SQLite's page cache (~2 MiB) plus the window being read. Chosen over an append-only
file because entries are replaced in place (a file hashed again), looked up at random by inode
and pruned, which an append-only file would need compaction and an index for. Crash safety:
every ``store`` is one transaction (WAL; ``synchronous=NORMAL`` may lose the last entries on a
power cut, never tear one), and each window row carries a 16-byte BLAKE3 check over the file's
key and the window, verified when read, so a damaged page never yields a wrong digest: a row that
fails is reported as ``CacheCorrupt`` and its entry dropped; a database SQLite cannot open is
replaced by an empty one (a cache is only a cache).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
from collections.abc import Iterable, Iterator

import blake3

from clusterrep.blocks import BlockError, InvalidManifest, Manifest, block_count

RACY_NS = 2_000_000_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, hashed_at_ns INTEGER NOT NULL,
    UNIQUE (dev, ino));
CREATE TABLE IF NOT EXISTS windows (
    file_id INTEGER NOT NULL, first INTEGER NOT NULL, count INTEGER NOT NULL,
    holes BLOB NOT NULL, digests BLOB NOT NULL, check_ BLOB NOT NULL,
    PRIMARY KEY (file_id, first)) WITHOUT ROWID;
"""


class CacheCorrupt(BlockError):
    """A cached window failed its check or the windows do not cover the file; the entry was dropped."""

    hint = "the hash cache was damaged (a crash or a disk error); the file is hashed again"


def _signed(value: int) -> int:
    """``st_dev``/``st_ino`` are unsigned 64-bit; SQLite integers are signed."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return _signed(st.st_dev), _signed(st.st_ino), st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _check(key: tuple[int, ...], hashed_at_ns: int, m: Manifest) -> bytes:
    head = struct.pack("<5qqqq", *key, hashed_at_ns, m.first, m.count)
    return blake3.blake3(head + m.holes + m.digests).digest(16)


class CachedFile:
    """A trusted entry: ``windows()`` yields its manifests from block 0, each verified on reading."""

    def __init__(self, cache: HashCache, file_id: int, key: tuple[int, ...], hashed_at_ns: int) -> None:
        self._cache, self._id, self._key, self._hashed_at = cache, file_id, key, hashed_at_ns

    def windows(self) -> Iterator[Manifest]:
        size, at, total = self._key[2], 0, block_count(self._key[2])
        if total == 0:
            yield Manifest(size, 0, 0, b"", b"")
            return
        while True:
            try:
                row = self._cache._db.execute(
                    "SELECT first, count, holes, digests, check_ FROM windows"
                    " WHERE file_id = ? AND first >= ? ORDER BY first LIMIT 1", (self._id, at)).fetchone()
            except sqlite3.DatabaseError:
                raise CacheCorrupt(f"the cache database is damaged (inode {self._key[1]})") from None
            if row is None or row[0] != at:
                break
            try:
                manifest = Manifest(size, row[0], row[1], row[2], row[3])
            except InvalidManifest:
                break
            if _check(self._key, self._hashed_at, manifest) != row[4]:
                break
            yield manifest
            at = manifest.end
            if at >= total:
                return
        with contextlib.suppress(sqlite3.DatabaseError):
            self._cache._drop(self._id)
        raise CacheCorrupt(f"cached windows of inode {self._key[1]} are damaged from block {at}")


class HashCache:
    """The cache at ``path`` (created if missing). Not thread-safe: one user thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError:
            self._remove_files()
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM files").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, st: os.stat_result, now_ns: int) -> CachedFile | None:
        """The entry for ``st``'s file if its key matches and it is not racy as of ``now_ns``."""
        key = _key(st)
        try:
            row = self._db.execute(
                "SELECT id, size, mtime_ns, ctime_ns, hashed_at_ns FROM files WHERE dev = ? AND ino = ?",
                key[:2]).fetchone()
        except sqlite3.DatabaseError:
            return None
        if row is None or tuple(row[1:4]) != key[2:]:
            return None
        hashed_at = row[4]
        if hashed_at - st.st_ctime_ns < RACY_NS or hashed_at > now_ns:
            return None
        return CachedFile(self, row[0], key, hashed_at)

    def store(self, st: os.stat_result, hashed_at_ns: int, windows: Iterable[Manifest]) -> bool:
        """Record ``windows`` (a whole file, from block 0, in order) for ``st``'s file version.

        ``st`` is the ``stat`` taken before reading and ``hashed_at_ns`` the wall clock read before
        it. Returns False, storing nothing, if the entry would be racy. ``InvalidManifest`` (and
        nothing stored) if the windows do not cover exactly ``st.st_size`` bytes.
        """
        if hashed_at_ns - st.st_ctime_ns < RACY_NS:
            return False
        key = _key(st)
        with self._transaction():
            self._db.execute("DELETE FROM windows WHERE file_id IN "
                             "(SELECT id FROM files WHERE dev = ? AND ino = ?)", key[:2])
            self._db.execute("DELETE FROM files WHERE dev = ? AND ino = ?", key[:2])
            file_id = self._db.execute(
                "INSERT INTO files (dev, ino, size, mtime_ns, ctime_ns, hashed_at_ns)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (*key, hashed_at_ns)).lastrowid
            self._insert_windows(file_id, key, hashed_at_ns, windows)
        return True

    def _insert_windows(self, file_id: int | None, key: tuple[int, ...], hashed_at_ns: int,
                        windows: Iterable[Manifest]) -> None:
        at, size = 0, key[2]
        for m in windows:
            if m.size != size or m.first != at:
                raise InvalidManifest(f"a window at block {m.first} of {m.size} bytes;"
                                      f" expected block {at} of {size} bytes")
            self._db.execute("INSERT INTO windows VALUES (?, ?, ?, ?, ?, ?)",
                             (file_id, m.first, m.count, m.holes, m.digests, _check(key, hashed_at_ns, m)))
            at = m.end
        if at != block_count(size):
            raise InvalidManifest(f"windows cover {at} blocks of {block_count(size)}")

    def discard(self, st: os.stat_result) -> None:
        """Forget ``st``'s inode (removed or known to be changed)."""
        row = self._db.execute("SELECT id FROM files WHERE dev = ? AND ino = ?", _key(st)[:2]).fetchone()
        if row is not None:
            self._drop(row[0])

    def _drop(self, file_id: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM windows WHERE file_id = ?", (file_id,))
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM files").fetchone()[0]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
