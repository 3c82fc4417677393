"""An append-only, checksummed, fsync'd log of byte records: a node's spool, the replica's journal.

Records are numbered from 1 without gaps; a node's spool uses the record index as its event
``seq``. Nothing that :meth:`Journal.sync` reported durable is lost, and damage is never skipped
silently: a torn tail (what a crash leaves after the last fsync) is cut with a warning, anything
else refuses to open.

On disk, a journal is a directory of *segment* files named by the index of their first record,
zero-padded to 20 digits (``00000000000000000001.seg``), so sorting names sorts indexes, a
``lock`` file, and ``journal.meta``, written once at creation (a journal that has it but no
segments lost them, and is refused rather than restarted at index 1). A segment is::

    segment header  16 bytes: magic b"CRJOURN1", first index (u64 LE)
    record          16-byte header + payload, repeated:
        length  u32 LE  payload bytes, at most 64 MiB
        crc     u32 LE  zlib.crc32 of (length u32 LE, index u64 LE, payload)
        index   u64 LE  the record's index
        payload

The index is stored and covered by the checksum so that a record in the wrong place (a renamed
or copied segment, stale bytes) fails verification, and so that after a damaged record the
records following it can be found quickly (by searching for their index) to tell a torn tail
from damage in the middle.

Rules that make recovery exact:

- Every segment except the last is complete and fsync'd: rolling to a new segment fsyncs the old
  one, creates the new one with its header, fsyncs it and the directory. So only the last segment
  can hold data written after the last fsync, and ``sync`` needs one fsync of one file.
- The last segment is never deleted, so its name (plus its records) tells the next index even
  after everything else was trimmed: indexes are never reused for durable records. (Records
  that were appended but not yet synced when the process or machine died may be lost, and their
  indexes are then given out again; ship or acknowledge only records below ``durable_index``.)
- Opening verifies every record. A bad record in the last segment that is followed by nothing
  valid is a torn tail: it and everything after it are cut (truncate + fsync) with a warning.
  A bad record followed by a valid one, damage in any other segment, or segments whose index
  ranges do not join up raise :class:`JournalCorrupt` naming the file and offset.
- A failed append (ENOSPC or any other OSError) is rolled back completely: the files are
  truncated back (and segments created by it removed) so the next append works once space is
  back; nothing is reported durable that is not. A failed fsync cannot be retried safely (the
  kernel may have dropped the dirty pages), so the journal refuses further use until reopened.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import struct
import threading
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .durable import atomic_write, fsync_dir
from .errors import (
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalLocked,
    JournalTrimmed,
    RecordTooLarge,
)

log = logging.getLogger("clusterrep.journal")

MAX_RECORD = 64 * 1024 * 1024
SEGMENT_MAGIC = b"CRJOURN1"
SEGMENT_HEADER = struct.Struct("<8sQ")  # magic, first index
RECORD_HEADER = struct.Struct("<IIQ")  # length, crc, index
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size
RECORD_HEADER_SIZE = RECORD_HEADER.size
LOCK_NAME = "lock"
META_NAME = "journal.meta"  # written once when the journal is created; its segments never all go
_META_TEXT = b'{"format": "clusterrep journal", "version": 1}\n'
SEGMENT_SUFFIX = ".seg"

_LEN_INDEX = struct.Struct("<IQ")
_INDEX = struct.Struct("<Q")
_NAME = re.compile(r"^(\d{20})\.seg$")
_STRIDE = 64  # the in-memory index keeps the offset of every 64th record of a segment
_READ_CHUNK = 1 << 20
_WRITE_CHUNK = 4 << 20  # appends write at most this much per pwritev
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024
_MAX_READERS = 16  # file descriptors kept open for reading old segments
_LOOKAHEAD = 64  # after a bad record, look for the next this many indexes further on


def record_crc(index: int, payload: bytes | memoryview) -> int:
    """The checksum of a record: CRC-32 of its length, its index and its payload."""
    return zlib.crc32(payload, zlib.crc32(_LEN_INDEX.pack(len(payload), index)))


def segment_name(first: int) -> str:
    return f"{first:020d}{SEGMENT_SUFFIX}"


# -- scanning (shared by open and inspect) ----------------------------------------------------------


@dataclass
class _Scan:
    """What verifying one segment found: its good records, and the first bad one if any."""

    count: int = 0  # good records
    end: int = SEGMENT_HEADER_SIZE  # offset just past the last good record
    marks: array[int] = field(default_factory=lambda: array("Q"))  # offset of every _STRIDE-th record
    bad: str | None = None  # why the bytes at ``end`` are not a valid record
    follower: int | None = None  # offset of a valid record found after the bad one


def _record_at(data: memoryview, off: int, index: int) -> tuple[int, str | None]:
    """(size, None) if a valid record numbered ``index`` starts at ``off``, else (0, reason)."""
    size = len(data)
    if off + RECORD_HEADER_SIZE > size:
        return 0, f"partial record header ({size - off} of {RECORD_HEADER_SIZE} bytes)"
    length, crc, stored = RECORD_HEADER.unpack_from(data, off)
    if length > MAX_RECORD:
        return 0, f"record length {length} exceeds the {MAX_RECORD}-byte limit"
    end = off + RECORD_HEADER_SIZE + length
    if end > size:
        return 0, f"partial payload ({size - off - RECORD_HEADER_SIZE} of {length} bytes)"
    if record_crc(stored, data[off + RECORD_HEADER_SIZE:end]) != crc:
        return 0, f"checksum mismatch in record {index}"
    if stored != index:
        return 0, f"record numbered {stored} where {index} was expected"
    return end - off, None


def _find_follower(raw: bytes, data: memoryview, bad: int, index: int) -> int | None:
    """Offset of a valid record numbered ``index+1 .. index+_LOOKAHEAD`` after offset ``bad``.

    Found by searching for the index bytes, so this costs a few memory scans, not a CRC per offset.
    """
    for follower in range(index + 1, index + 1 + _LOOKAHEAD):
        pattern = _INDEX.pack(follower)
        pos = raw.find(pattern, bad + 1)
        while pos != -1:
            off = pos - 8  # the index field sits 8 bytes into the header
            if off > bad and _record_at(data, off, follower)[1] is None:
                return off
            pos = raw.find(pattern, pos + 1)
    return None


def _scan_records(data: bytes, first: int) -> _Scan:
    """Verify the records of a segment (header already checked) from the start."""
    view = memoryview(data)
    scan = _Scan()
    off, index, size = SEGMENT_HEADER_SIZE, first, len(data)
    while off < size:
        length, reason = _record_at(view, off, index)
        if reason is not None:
            scan.bad = reason
            scan.follower = _find_follower(data, view, off, index)
            break
        if (index - first) % _STRIDE == 0:
            scan.marks.append(off)
        off += length
        index += 1
    scan.count, scan.end = index - first, off
    return scan


def _header_problem(data: bytes, first: int) -> str | None:
    if len(data) < SEGMENT_HEADER_SIZE:
        return f"partial segment header ({len(data)} of {SEGMENT_HEADER_SIZE} bytes)"
    magic, stored = SEGMENT_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        return f"not a journal segment (magic {magic!r}, expected {SEGMENT_MAGIC!r})"
    if stored != first:
        return f"segment header says first index {stored}, its name says {first}"
    return None


def _list_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segment files of ``directory`` by first index; a ``*.seg`` with a malformed name is damage."""
    found = []
    for entry in os.scandir(directory):
        if not entry.name.endswith(SEGMENT_SUFFIX):
            continue
        m = _NAME.match(entry.name)
        if m is None:
            raise JournalCorrupt(f"unexpected file {entry.path} in journal {directory}",
                                 hint=_corrupt_hint(directory))
        found.append((int(m.group(1)), Path(entry.path)))
    found.sort()
    return found


def _corrupt_hint(directory: Path) -> str:
    return f"the journal at {directory} is damaged before its tail; restore it or start a new state directory"


@dataclass
class _Verdict:
    """One segment's verification: its scan, and what to do about a problem."""

    scan: _Scan
    action: str | None = None  # None, "cut" (torn tail), "rewrite-header" (torn creation), "corrupt"
    offset: int = 0
    message: str = ""


def _verify_segment(path: Path, first: int, data: bytes, last: bool) -> _Verdict:
    problem = _header_problem(data, first)
    if problem is not None:
        if last and len(data) <= SEGMENT_HEADER_SIZE:
            # the segment was being created when the process stopped: nothing was in it yet
            return _Verdict(_Scan(), "rewrite-header", 0, problem)
        return _Verdict(_Scan(), "corrupt", 0, f"{path}, offset 0: {problem}")
    scan = _scan_records(data, first)
    if scan.bad is None:
        return _Verdict(scan)
    where = f"{path}, offset {scan.end} (record {first + scan.count})"
    if scan.follower is not None:
        return _Verdict(scan, "corrupt", scan.end,
                        f"{where}: {scan.bad}, but a valid record follows at offset {scan.follower}")
    if not last:
        return _Verdict(scan, "corrupt", scan.end, f"{where}: {scan.bad} in a segment that is not the last")
    return _Verdict(scan, "cut", scan.end, f"{where}: {scan.bad}")


# -- diagnostics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentInfo:
    path: Path
    first_index: int
    records: int
    bytes: int
    problem: str | None  # what opening would cut or refuse


@dataclass(frozen=True)
class JournalInfo:
    """What :meth:`Journal.inspect` found, without changing or locking anything."""

    directory: Path
    segments: tuple[SegmentInfo, ...]
    first_index: int
    next_index: int
    bytes_total: int
    problems: tuple[str, ...]  # torn tails opening would cut, damage opening would refuse
    corrupt: bool  # opening would raise JournalCorrupt


# -- the journal ----------------------------------------------------------------------------------


@dataclass
class _Segment:
    first: int
    path: Path
    fd: int | None  # open for the last segment always (read-write), for others while cached
    end: int = SEGMENT_HEADER_SIZE  # file size: offset where the next record goes
    count: int = 0
    marks: array[int] = field(default_factory=lambda: array("Q"))


class Journal:
    """An append-only log of byte records numbered from 1, in segment files in one directory.

    Thread-safe: ``append``, ``sync``, ``read`` and ``trim`` may be called from different
    threads. ``sync`` is a group commit: one fsync covers every record appended before it started,
    and a caller whose records are covered by an fsync already running waits for it instead of
    issuing another.
    """

    def __init__(self, directory: str | os.PathLike[str], *, segment_bytes: int = 64 * 1024 * 1024,
                 fsync: bool = True, tail_cache: int = 16 * 1024 * 1024) -> None:
        if segment_bytes < SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE:
            raise ValueError(f"segment_bytes {segment_bytes} is too small")
        self.directory = Path(directory)
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._cond = threading.Condition(threading.Lock())
        self._segments: list[_Segment] = []
        self._sealed_bytes = 0  # size of every segment but the last
        self._bytes_total = 0   # published by _publish()
        # the payloads of the newest records appended by this process, as appended: a reader
        # that keeps up (the shipper) gets them without a pread or a checksum pass
        self._tail_limit = tail_cache
        self._tail: list[bytes] = []
        self._tail_first = 1  # index of self._tail[0]
        self._tail_bytes = 0
        self._readers: OrderedDict[int, _Segment] = OrderedDict()  # old segments with an open fd
        self._first_index = self._next_index = self._durable_index = 1
        self._syncing = False
        self._failed: str | None = None
        self._closed = False
        self._lock_fd = self._acquire_lock()
        try:
            self._open_segments()
            self._tail_first = self._next_index
        except OSError as exc:
            self._release()
            raise JournalError(f"cannot open journal {self.directory}: {exc}") from exc
        except BaseException:
            self._release()
            raise

    # -- opening ------------------------------------------------------------------------------

    def _acquire_lock(self) -> int:
        """Exclusive flock on DIR/lock: a second opener, in any process, gets JournalLocked."""
        created = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if created and self._fsync:
                fsync_dir(self.directory.parent)
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise JournalError(f"cannot open journal {self.directory}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalLocked(
                    f"journal {self.directory} is already open (lock held by process {holder})") from exc
            raise JournalError(f"cannot lock journal {self.directory}: {exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open_segments(self) -> None:
        found = _list_segments(self.directory)
        meta = self.directory / META_NAME
        if not found:
            if meta.exists():  # never happens by itself: the last segment is never deleted
                raise JournalCorrupt(
                    f"journal {self.directory} has no segment files left, but it was used before "
                    f"({meta} exists): starting again at index 1 would reuse indexes",
                    hint=_corrupt_hint(self.directory))
            self._segments.append(self._create_segment(1))
            self._first_index = self._next_index = self._durable_index = 1
            atomic_write(meta, _META_TEXT)
            self._recount()
            return
        for k, (first, path) in enumerate(found):
            if self._segments:
                prev = self._segments[-1]
                if prev.first + prev.count != first:
                    raise JournalCorrupt(
                        f"journal {self.directory}: gap between segments, {prev.path} ends before "
                        f"record {prev.first + prev.count} but {path} starts at record {first}",
                        hint=_corrupt_hint(self.directory))
            last = k == len(found) - 1
            verdict = _verify_segment(path, first, path.read_bytes(), last)
            if verdict.action == "corrupt":
                raise JournalCorrupt(f"journal segment damaged: {verdict.message}",
                                     hint=_corrupt_hint(self.directory))
            segment = _Segment(first, path, None, verdict.scan.end, verdict.scan.count, verdict.scan.marks)
            if verdict.action == "cut":
                self._cut_tail(segment, verdict.message)
            elif verdict.action == "rewrite-header":
                self._rewrite_header(segment, verdict.message)
            self._segments.append(segment)
        current = self._segments[-1]
        current.fd = os.open(current.path, os.O_RDWR | os.O_CLOEXEC)
        if self._fsync:
            os.fsync(current.fd)  # what a crashed process left in the page cache is durable now
        self._first_index = self._segments[0].first
        self._next_index = self._durable_index = current.first + current.count
        if not meta.exists():
            atomic_write(meta, _META_TEXT)
        self._recount()

    def _recount(self) -> None:
        """Size of every segment but the last (kept, so `bytes_total` needs no lock or sum)."""
        self._sealed_bytes = sum(s.end for s in self._segments[:-1])
        self._publish()

    def _publish(self) -> None:
        """Make the size of the files readable without the lock: one attribute store, done after
        each change under the lock, so a reader never sees half of an update."""
        self._bytes_total = self._sealed_bytes + self._segments[-1].end

    def _cut_tail(self, segment: _Segment, why: str) -> None:
        size = segment.path.stat().st_size
        log.warning("journal %s: cutting torn tail of %s at offset %d, dropping %d bytes (%s)",
                    self.directory, segment.path, segment.end, size - segment.end, why)
        self._truncate_file(segment.path, segment.end)

    def _rewrite_header(self, segment: _Segment, why: str) -> None:
        log.warning("journal %s: rewriting the header of %s, which was being created (%s)",
                    self.directory, segment.path, why)
        self._truncate_file(segment.path, 0)
        fd = os.open(segment.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _pwrite_all(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, segment.first), 0)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _truncate_file(self, path: Path, size: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _create_segment(self, first: int) -> _Segment:
        """A new segment file holding only its header, durable (file and directory entry)."""
        path = self.directory / segment_name(first)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _pwrite_all(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, first), 0)
            if self._fsync:
                os.fsync(fd)
                fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            if self._fsync:  # best effort: a crash should not bring back a segment beyond the end
                with contextlib.suppress(OSError):
                    fsync_dir(self.directory)
            raise
        return _Segment(first, path, fd)

    # -- state ----------------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        """Index of the oldest record still present (== next_index when empty)."""
        return self._first_index

    @property
    def next_index(self) -> int:
        """Index the next appended record gets."""
        return self._next_index

    @property
    def durable_index(self) -> int:
        """Every record with an index below this is fsync'd (with fsync=False: was synced)."""
        return self._durable_index

    @property
    def bytes_total(self) -> int:
        """Size of all segment files, headers included."""
        # no lock: the FUSE write path asks on every write (back-pressure), and must not wait
        # behind a reader; the figure is the one published after the last change
        return self._bytes_total

    @property
    def segment_count(self) -> int:
        with self._cond:
            return len(self._segments)

    def _check_usable(self) -> None:
        if self._closed:
            raise JournalError(f"journal {self.directory} is closed",
                               hint="this is a bug in the caller: the journal was used after close()")
        if self._failed is not None:
            raise JournalError(f"journal {self.directory} stopped after an I/O error: {self._failed}",
                               hint="reopen the journal; it recovers exactly what is on disk")

    # -- append -------------------------------------------------------------------------------

    def append(self, records: Sequence[bytes]) -> int:
        """Append ``records`` (written, not yet fsync'd) and return the index of the first.

        All or nothing: if a write fails (JournalFull on ENOSPC/EDQUOT, JournalError otherwise),
        the files are cut back to where they were and no index is used up.
        """
        if len(records) == 1 and type(records[0]) is bytes:
            return self._append_one(records[0])
        return self._append_many([r if isinstance(r, bytes) else bytes(r) for r in records])

    def _append_many(self, payloads: list[bytes]) -> int:
        for k, p in enumerate(payloads):
            if len(p) > MAX_RECORD:
                raise RecordTooLarge(f"record {k} of the batch has {len(p)} bytes; the journal takes at most "
                                     f"{MAX_RECORD}; nothing of the batch was appended")
        with self._cond:
            self._check_usable()
            start = self._next_index
            if not payloads:
                return start
            current = self._segments[-1]
            snapshot = (len(self._segments), current.end, current.count, len(current.marks))
            try:
                rolled = self._write_records(payloads)
            except BaseException as exc:
                self._roll_back(snapshot, exc)
                raise
            if rolled and self._fsync:
                # rolling fsync'd every segment before the current one
                self._durable_index = max(self._durable_index, self._segments[-1].first)
            self._keep_tail(start, payloads)
            return start

    def _append_one(self, payload: bytes) -> int:
        """`append` of one record (the node's FUSE write path): the same file bytes, the same
        all-or-nothing rule, less than half the cost."""
        size = RECORD_HEADER_SIZE + len(payload)
        if len(payload) > MAX_RECORD:
            raise RecordTooLarge(f"record 0 of the batch has {len(payload)} bytes; the journal takes "
                                 f"at most {MAX_RECORD}; nothing of the batch was appended")
        with self._cond:
            self._check_usable()
            segment = self._segments[-1]
            pos = segment.end
            if pos > SEGMENT_HEADER_SIZE and pos + size > self._segment_bytes:
                pass  # it rolls: the general path
            else:
                index = self._next_index
                header = RECORD_HEADER.pack(len(payload), record_crc(index, payload), index)
                snapshot = (len(self._segments), pos, segment.count, len(segment.marks))
                try:
                    if os.pwritev(segment.fd, (header, payload), pos) != size:  # type: ignore[arg-type]
                        _pwritev_all(segment.fd, [header, payload], pos)  # type: ignore[arg-type]
                except BaseException as exc:
                    self._roll_back(snapshot, exc)
                    raise
                if (index - segment.first) % _STRIDE == 0:
                    segment.marks.append(pos)
                segment.end = pos + size
                self._publish()
                segment.count += 1
                self._next_index = index + 1
                self._keep_tail(index, [payload])
                return index
        return self._append_many([payload])

    def _keep_tail(self, start: int, payloads: list[bytes]) -> None:
        """Add the payloads just appended at ``start`` (the tail always ends at next_index: it
        starts there when the journal opens, and only successful appends extend both)."""
        if not self._tail_limit:
            return
        self._tail += payloads
        self._tail_bytes += sum(len(p) for p in payloads)
        if self._tail_bytes > self._tail_limit:
            # drop the oldest down to 3/4 of the limit (one slice, not one pop per record)
            drop, freed = 0, 0
            while self._tail_bytes - freed > self._tail_limit * 3 // 4 and drop < len(self._tail):
                freed += len(self._tail[drop])
                drop += 1
            del self._tail[:drop]
            self._tail_first += drop
            self._tail_bytes -= freed

    def _read_tail(self, start: int, max_records: int | None,
                   max_bytes: int | None) -> list[tuple[int, bytes]]:
        """Records from the tail cache (``start`` must be in it), within the read's budget."""
        out: list[tuple[int, bytes]] = []
        k = start - self._tail_first
        budget = max_bytes
        for payload in itertools.islice(self._tail, k, None if max_records is None else k + max_records):
            if budget is not None:
                if out and len(payload) > budget:
                    break
                budget -= len(payload)
            out.append((start, payload))
            start += 1
        return out

    def _write_records(self, payloads: list[bytes]) -> bool:
        """Write the records, rolling to new segments as they fill; True if it rolled."""
        segment = self._segments[-1]
        index, pos = self._next_index, segment.end
        pending: list[bytes] = []
        pending_bytes, rolled = 0, False
        for payload in payloads:
            size = RECORD_HEADER_SIZE + len(payload)
            if pos > SEGMENT_HEADER_SIZE and pos + size > self._segment_bytes:
                self._flush(segment, pending, pos)
                pending, pending_bytes = [], 0
                segment = self._roll(index)
                pos, rolled = segment.end, True
            elif pending_bytes >= _WRITE_CHUNK:
                self._flush(segment, pending, pos)
                pending, pending_bytes = [], 0
            if (index - segment.first) % _STRIDE == 0:
                segment.marks.append(pos)
            pending.append(RECORD_HEADER.pack(len(payload), record_crc(index, payload), index))
            pending.append(payload)
            pending_bytes += size
            pos += size
            index += 1
            segment.count += 1
        self._flush(segment, pending, pos)
        self._next_index = index
        return rolled

    def _flush(self, segment: _Segment, pending: list[bytes], pos: int) -> None:
        """Write the pending buffers at the segment's end, which then is ``pos``."""
        if pending:
            assert segment.fd is not None
            _pwritev_all(segment.fd, pending, segment.end)
        segment.end = pos
        self._publish()

    def _roll(self, first: int) -> _Segment:
        """Close the current segment (fsync'd) and start a new one whose first record is ``first``."""
        old = self._segments[-1]
        if self._fsync:
            assert old.fd is not None
            os.fsync(old.fd)
        new = self._create_segment(first)
        self._sealed_bytes += old.end
        self._segments.append(new)
        self._publish()
        self._cache_reader(old)
        return new

    def _roll_back(self, snapshot: tuple[int, int, int, int], exc: BaseException) -> None:
        """Undo a failed append: remove segments it created, cut the old one back.

        Raises JournalFull / JournalError for an OSError; returns (for the caller to re-raise)
        for anything else.
        """
        count_segments, end, count, marks = snapshot
        try:
            created = self._segments[count_segments:]
            del self._segments[count_segments:]
            self._recount()
            for segment in reversed(created):
                self._close_fd(segment)
                os.unlink(segment.path)
            segment = self._segments[-1]
            self._readers.pop(segment.first, None)
            if segment.fd is None:
                segment.fd = os.open(segment.path, os.O_RDWR | os.O_CLOEXEC)
            os.ftruncate(segment.fd, end)
            segment.end, segment.count = end, count
            self._publish()
            del segment.marks[marks:]
            self._next_index = segment.first + count
            if self._fsync:
                # make the cut durable, so a crash cannot bring back records we said were not appended
                os.fsync(segment.fd)
                if created:
                    fsync_dir(self.directory)
        except OSError as undo:
            self._failed = f"append failed ({exc}) and could not be undone ({undo})"
            raise JournalError(f"journal {self.directory}: {self._failed}",
                               hint="reopen the journal; it recovers exactly what is on disk") from exc
        if not isinstance(exc, OSError):
            return
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise JournalFull(f"journal {self.directory} is out of space ({exc.strerror}); "
                              f"nothing of this append was kept") from exc
        raise JournalError(f"journal {self.directory}: append failed ({exc}); nothing of it was kept",
                           hint="check the state directory's file system; the append can be retried") from exc

    # -- sync -----------------------------------------------------------------------------------

    def sync(self) -> int:
        """Make every record appended so far durable (one fsync for all callers); return durable_index."""
        with self._cond:
            self._check_usable()
            if not self._fsync:
                self._durable_index = self._next_index
                return self._durable_index
            target = self._next_index
            while self._durable_index < target and self._syncing:
                self._cond.wait()  # an fsync is running; it may cover us, else we lead the next
                self._check_usable()
            if self._durable_index >= target:
                return self._durable_index
            target = self._next_index  # the group: everything appended until now
            fd = self._segments[-1].fd
            assert fd is not None
            # trim, close or a failed append must not close it under the fsync; and if no
            # descriptor is left (EMFILE) this fails before anything is marked running, so
            # callers waiting for a sync never wait for one that never started
            fd = os.dup(fd)
            self._syncing = True
        try:
            os.fsync(fd)
        except OSError as exc:
            with self._cond:
                self._failed = f"fsync failed: {exc}"
                self._syncing = False
                self._cond.notify_all()
            raise JournalError(f"journal {self.directory}: fsync failed ({exc}); nothing more is "
                               f"reported durable", hint="reopen the journal; it recovers exactly what "
                               "is on disk") from exc
        finally:
            os.close(fd)
        with self._cond:
            self._durable_index = max(self._durable_index, target)
            self._syncing = False
            self._cond.notify_all()
            return self._durable_index

    # -- read -----------------------------------------------------------------------------------

    def read(self, start: int, *, max_records: int | None = None,
             max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """Records with index >= ``start``, in order, as (index, payload).

        At most ``max_records`` records and ``max_bytes`` payload bytes, but always at least one
        record when one exists, so a record bigger than ``max_bytes`` cannot stall a reader.
        Records not yet synced are returned too (``durable_index`` says which are durable).
        Every record read from disk is verified against its checksum; the newest records this
        process appended come from memory as they were appended. Appends wait while a read runs.
        """
        with self._cond:
            self._check_usable()
            if start < 1:
                raise ValueError(f"journal indexes start at 1, not {start}")
            if start < self._first_index:
                raise JournalTrimmed(f"journal {self.directory}: records from {start} were asked for, but "
                                     f"the range below {self._first_index} was trimmed")
            out: list[tuple[int, bytes]] = []
            if max_records is not None and max_records <= 0:
                return out
            if self._tail_first <= start < self._tail_first + len(self._tail):
                return self._read_tail(start, max_records, max_bytes)
            budget = [max_records, max_bytes]
            k = bisect_right(self._segments, start, key=lambda s: s.first) - 1
            try:
                while k < len(self._segments) and start < self._next_index:
                    segment = self._segments[k]
                    if start < segment.first + segment.count and not self._read_segment(
                            segment, start, out, budget):
                        break
                    start = segment.first + segment.count
                    k += 1
            except OSError as exc:
                raise JournalError(f"journal {self.directory}: reading record {start} failed: {exc}") from exc
            return out

    def _read_segment(self, segment: _Segment, start: int, out: list[tuple[int, bytes]],
                      budget: list[int | None]) -> bool:
        """Append records ``start..`` of ``segment`` to ``out``; False once the budget is spent."""
        fd = self._reader_fd(segment)
        mark = (start - segment.first) // _STRIDE
        index, off = segment.first + mark * _STRIDE, segment.marks[mark]
        stop = segment.first + segment.count
        buf, buf_off = b"", off
        while index < stop:
            if off + RECORD_HEADER_SIZE > buf_off + len(buf):
                buf, buf_off = os.pread(fd, min(_READ_CHUNK, segment.end - off), off), off
                if len(buf) < RECORD_HEADER_SIZE:
                    raise self._damaged(segment, off, index, "the file ends early")
            length, crc, stored = RECORD_HEADER.unpack_from(buf, off - buf_off)
            end = off + RECORD_HEADER_SIZE + length
            if index >= start:
                max_records, max_bytes = budget
                if max_bytes is not None and out and length > max_bytes:
                    return False
                if end > buf_off + len(buf):
                    buf, buf_off = os.pread(fd, max(_READ_CHUNK, end - off), off), off
                payload = buf[off + RECORD_HEADER_SIZE - buf_off:end - buf_off]
                if len(payload) != length or stored != index or record_crc(index, payload) != crc:
                    raise self._damaged(segment, off, index, "it no longer matches its checksum")
                out.append((index, payload))
                budget[0] = None if max_records is None else max_records - 1
                budget[1] = None if max_bytes is None else max_bytes - length
                if budget[0] == 0:
                    return False
            off, index = end, index + 1
        return True

    def _damaged(self, segment: _Segment, off: int, index: int, why: str) -> JournalCorrupt:
        return JournalCorrupt(f"journal segment damaged: {segment.path}, offset {off} (record {index}): "
                              f"{why}", hint=_corrupt_hint(self.directory))

    def _reader_fd(self, segment: _Segment) -> int:
        """An open fd for reading ``segment``; old segments' fds are cached, least recently used out."""
        if segment is self._segments[-1]:
            assert segment.fd is not None
            return segment.fd
        if segment.fd is None:
            segment.fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        self._cache_reader(segment)
        return segment.fd

    def _cache_reader(self, segment: _Segment) -> None:
        self._readers[segment.first] = segment
        self._readers.move_to_end(segment.first)
        while len(self._readers) > _MAX_READERS:
            _, evicted = self._readers.popitem(last=False)
            self._close_fd(evicted)

    def _close_fd(self, segment: _Segment) -> None:
        self._readers.pop(segment.first, None)
        if segment.fd is not None:
            fd, segment.fd = segment.fd, None
            os.close(fd)

    # -- trim -----------------------------------------------------------------------------------

    def trim(self, upto: int) -> None:
        """Records below ``upto`` are no longer needed: delete the segments that hold only such records.

        The last segment is never deleted (it remembers the next index), so ``first_index`` may
        stay below ``upto``. Each deletion is made durable (directory fsync) before the next, so a
        crash leaves the remaining segments contiguous.
        """
        with self._cond:
            self._check_usable()
            while len(self._segments) > 1 and self._segments[1].first <= upto:
                segment = self._segments[0]
                try:
                    os.unlink(segment.path)
                    if self._fsync:
                        fsync_dir(self.directory)
                except OSError as exc:
                    raise JournalError(
                        f"journal {self.directory}: cannot delete {segment.path}: {exc}") from exc
                self._close_fd(segment)
                del self._segments[0]
                self._first_index = self._segments[0].first
                self._recount()

    # -- close ----------------------------------------------------------------------------------

    def close(self, *, sync: bool = True) -> None:
        """Sync (unless ``sync=False`` or the journal failed), close the files, release the lock."""
        if self._closed:
            return
        try:
            if sync and self._failed is None:
                self.sync()
        finally:
            with self._cond:
                while self._syncing:
                    self._cond.wait()
                self._closed = True
                self._release()

    def _release(self) -> None:
        for segment in self._segments:
            self._close_fd(segment)
        self._readers.clear()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # releases the flock

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(sync=exc_type is None)

    def __repr__(self) -> str:
        return (f"Journal({str(self.directory)!r}, first={self._first_index}, next={self._next_index}, "
                f"durable={self._durable_index})")

    # -- diagnostics ----------------------------------------------------------------------------

    @classmethod
    def inspect(cls, directory: str | os.PathLike[str]) -> JournalInfo:
        """Verify a journal read-only, without taking its lock: what opening it would find.

        Safe while another process has it open (its unsynced tail may then show as torn).
        """
        directory = Path(directory)
        segments: list[SegmentInfo] = []
        problems: list[str] = []
        corrupt = False
        try:
            found = _list_segments(directory)
        except JournalCorrupt as exc:
            return JournalInfo(directory, (), 1, 1, 0, (str(exc),), True)
        if not found and (directory / META_NAME).exists():
            problems.append(f"no segment files left in {directory}, which was used before (opening refuses)")
            corrupt = True
        expected: int | None = None
        for k, (first, path) in enumerate(found):
            if expected is not None and expected != first:
                problems.append(f"gap: records {expected}..{first - 1} are missing before {path}")
                corrupt = True
            data = path.read_bytes()
            verdict = _verify_segment(path, first, data, k == len(found) - 1)
            problem = None
            if verdict.action is not None:
                label = {"cut": "torn tail (opening cuts it)",
                         "rewrite-header": "torn segment header (opening rewrites it)",
                         "corrupt": "damaged (opening refuses)"}[verdict.action]
                problem = f"{label}: {verdict.message}"
                problems.append(problem)
                corrupt = corrupt or verdict.action == "corrupt"
            segments.append(SegmentInfo(path, first, verdict.scan.count, len(data), problem))
            expected = first + verdict.scan.count
        first_index = segments[0].first_index if segments else 1
        next_index = expected if expected is not None else 1
        return JournalInfo(directory, tuple(segments), first_index, next_index,
                           sum(s.bytes for s in segments), tuple(problems), corrupt)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _pwritev_all(fd: int, buffers: list[bytes], offset: int) -> None:
    """Write ``buffers`` back to back from ``offset`` with as few pwritev calls as possible."""
    if len(buffers) <= _IOV_MAX:  # the usual case: one call writes it all, no views needed
        total = sum(len(b) for b in buffers)
        written = os.pwritev(fd, buffers, offset)
        if written == total:
            return
        buffers, offset = [memoryview(b"".join(buffers))[written:]], offset + written
    views = [memoryview(b) for b in buffers if b]
    while views:
        chunk = views[:_IOV_MAX]
        written = os.pwritev(fd, chunk, offset)
        offset += written
        done = 0
        while done < len(chunk) and written >= len(chunk[done]):
            written -= len(chunk[done])
            done += 1
        if done < len(chunk):
            chunk[done] = chunk[done][written:]
        views = chunk[done:] + views[len(chunk):]


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
