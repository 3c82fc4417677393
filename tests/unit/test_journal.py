"""The journal: gap-free indexes, durable sync, exact recovery from torn tails, refusal of damage.

Real files throughout. Tests that reopen many times run in a tmpfs directory (``/dev/shm``) when
there is one, so that fsync is cheap; the code paths are the same as on a disk.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterrep.errors import (
    ClusterrepError,
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalLocked,
    JournalTrimmed,
    RecordTooLarge,
)
from clusterrep.journal import (
    MAX_RECORD,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    Journal,
    segment_name,
)

FAST_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory on tmpfs if available (cheap fsync), else under tmp_path."""
    if FAST_ROOT is None:
        yield tmp_path / "fast"
        return
    root = Path(tempfile.mkdtemp(prefix="cr-journal-test-", dir=FAST_ROOT))
    try:
        yield root / "j"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def payloads(n: int, start: int = 0, size: int = 20) -> list[bytes]:
    return [f"record-{start + k}-".encode().ljust(size, b"x") for k in range(n)]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset, size incl. header) of each record of a valid segment file, parsed independently."""
    data = path.read_bytes()
    out, off = [], SEGMENT_HEADER_SIZE
    while off < len(data):
        length = int.from_bytes(data[off:off + 4], "little")
        out.append((off, RECORD_HEADER_SIZE + length))
        off += RECORD_HEADER_SIZE + length
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def read_all(j: Journal) -> list[tuple[int, bytes]]:
    return j.read(j.first_index)


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_gap_free_from_one_and_reopen(tmp_path: Path) -> None:
    d = tmp_path / "j"  # a real disk directory, real fsyncs
    with Journal(d) as j:
        assert (j.first_index, j.next_index, j.durable_index) == (1, 1, 1)
        assert j.append(payloads(3)) == 1
        assert j.append(payloads(2, 3)) == 4
        assert j.durable_index == 1  # appended, not synced
        assert j.read(1) == list(enumerate(payloads(5), 1))  # unsynced records are readable
        assert j.sync() == 6 == j.durable_index
        assert j.sync() == 6
    assert segments(d) == [d / "00000000000000000001.seg"]
    with Journal(d) as j:
        assert (j.first_index, j.next_index, j.durable_index) == (1, 6, 6)
        assert read_all(j) == list(enumerate(payloads(5), 1))
        assert j.append([b"six"]) == 6
        assert j.read(6) == [(6, b"six")]
        assert j.read(7) == []
    with Journal(d) as j:
        assert j.next_index == 7
        assert j.bytes_total == (d / segment_name(1)).stat().st_size


def test_empty_append_and_bytes_like_records(fast_dir: Path) -> None:
    with Journal(fast_dir) as j:
        assert j.append([]) == 1
        assert j.next_index == 1
        assert j.append([bytearray(b"ab"), memoryview(b"cd"), b""]) == 1
        assert read_all(j) == [(1, b"ab"), (2, b"cd"), (3, b"")]


def test_read_limits(fast_dir: Path) -> None:
    with Journal(fast_dir) as j:
        j.append([bytes([k]) * 100 for k in range(10)])
        assert [i for i, _ in j.read(3, max_records=2)] == [3, 4]
        assert [i for i, _ in j.read(3, max_bytes=250)] == [3, 4]
        assert [i for i, _ in j.read(3, max_bytes=10)] == [3]  # always at least one record
        assert j.read(3, max_records=0) == []
        assert j.read(11) == []
        assert j.read(99) == []


def test_record_too_large_is_refused_whole_batch(fast_dir: Path) -> None:
    with Journal(fast_dir, fsync=False) as j:
        big = bytes(MAX_RECORD + 1)
        with pytest.raises(RecordTooLarge, match="at most") as err:
            j.append([b"ok", big])
        assert isinstance(err.value, ClusterrepError)
        assert j.next_index == 1
        assert j.append([bytes(MAX_RECORD)]) == 1  # the limit itself is fine
        assert len(j.read(1)[0][1]) == MAX_RECORD


# -- segments and trim ---------------------------------------------------------------------------------


def test_rollover_read_across_segments(fast_dir: Path) -> None:
    seg_bytes = 200
    recs = payloads(40, size=30)  # 46 bytes each with header: 4 per segment
    with Journal(fast_dir, segment_bytes=seg_bytes) as j:
        for k in range(0, 40, 7):
            assert j.append(recs[k:k + 7]) == k + 1
        assert j.sync() == 41
        files = segments(fast_dir)
        assert len(files) == 10
        assert all(f.stat().st_size <= seg_bytes for f in files)
        for start in range(1, 41):
            assert j.read(start) == list(enumerate(recs, 1))[start - 1:]
            assert j.read(start, max_records=5) == list(enumerate(recs, 1))[start - 1:start + 4]
    # names are the first index, zero-padded: sorting names sorts indexes
    assert [f.name for f in files] == [segment_name(1 + 4 * k) for k in range(10)]
    with Journal(fast_dir, segment_bytes=seg_bytes) as j:
        assert read_all(j) == list(enumerate(recs, 1))


def test_record_bigger_than_segment_gets_its_own(fast_dir: Path) -> None:
    with Journal(fast_dir, segment_bytes=100) as j:
        j.append([b"a", b"x" * 500, b"b"])
        assert [f.stat().st_size for f in segments(fast_dir)] == [16 + 17, 16 + 516, 16 + 17]
        assert [p for _, p in read_all(j)] == [b"a", b"x" * 500, b"b"]


def test_trim_deletes_whole_old_segments_never_the_last(fast_dir: Path) -> None:
    recs = payloads(20, size=30)
    with Journal(fast_dir, segment_bytes=200) as j:  # 4 records per segment: 1, 5, 9, 13, 17
        j.append(recs)
        j.sync()
        j.trim(4)  # segment 1..4 still holds record 4
        assert j.first_index == 1
        j.trim(5)
        assert j.first_index == 5
        assert not (fast_dir / segment_name(1)).exists()
        j.trim(11)
        assert j.first_index == 9  # may stay below upto: 9 and 10 are in the segment with 11
        with pytest.raises(JournalTrimmed, match="trimmed") as err:
            j.read(8)
        assert isinstance(err.value, JournalError)
        assert j.read(9) == list(enumerate(recs, 1))[8:]
    with Journal(fast_dir, segment_bytes=200) as j:
        assert (j.first_index, j.next_index) == (9, 21)
        j.trim(10**9)  # everything: the last segment stays, it remembers the next index
        assert j.first_index == 17
        assert segments(fast_dir) == [fast_dir / segment_name(17)]
        j.append(payloads(4, 20, size=30))  # segment 17 is full: these go to a new one, 21..24
        j.append([b"next"])  # and this to segment 25
        j.trim(10**9)
        assert segments(fast_dir) == [fast_dir / segment_name(25)]
    with Journal(fast_dir, segment_bytes=200) as j:
        assert (j.first_index, j.next_index) == (25, 26)
        assert j.append([b"on"]) == 26  # indexes are never reused


# -- torn and corrupt tails ----------------------------------------------------------------------------


def build(directory: Path, n: int = 6, **kw: int) -> list[bytes]:
    recs = payloads(n, size=37)
    with Journal(directory, **kw) as j:
        j.append(recs)
    return recs


def test_torn_tail_at_every_byte_of_the_last_record(fast_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    pristine = fast_dir.parent / "pristine"
    recs = build(pristine, 9, segment_bytes=256)  # 4 records per segment: the last has 1
    last = segments(pristine)[-1]
    off, size = record_offsets(last)[-1]
    for cut in range(off, off + size):
        d = fast_dir.parent / f"cut{cut}"
        shutil.copytree(pristine, d)
        os.truncate(d / last.name, cut)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clusterrep.journal"), \
                Journal(d, segment_bytes=256) as j:
            assert (j.first_index, j.next_index, j.durable_index) == (1, 9, 9)
            assert read_all(j) == list(enumerate(recs[:8], 1))
            assert j.append([b"again"]) == 9
        if cut == off:
            assert not caplog.records  # cut exactly at a record boundary: nothing torn
        else:
            (rec,) = caplog.records
            assert rec.levelno == logging.WARNING
            msg = rec.getMessage()
            assert str(d / last.name) in msg and f"offset {off}" in msg
            assert f"dropping {cut - off} bytes" in msg
        with Journal(d, segment_bytes=256) as j:
            assert read_all(j) == [*enumerate(recs[:8], 1), (9, b"again")]
        shutil.rmtree(d)


@pytest.mark.parametrize("where", ["payload", "crc", "length", "index"])
def test_corrupt_last_record_is_cut_with_warning(fast_dir: Path, caplog: pytest.LogCaptureFixture,
                                                 where: str) -> None:
    recs = build(fast_dir)
    seg = segments(fast_dir)[-1]
    off, _ = record_offsets(seg)[-1]
    flip(seg, off + {"length": 1, "crc": 4, "index": 8, "payload": 20}[where])
    with caplog.at_level(logging.WARNING, logger="clusterrep.journal"), Journal(fast_dir) as j:
        assert read_all(j) == list(enumerate(recs[:5], 1))
    assert f"offset {off}" in caplog.text and str(seg) in caplog.text


def test_zero_filled_tail_is_cut(fast_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    recs = build(fast_dir)
    seg = segments(fast_dir)[-1]
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(bytes(4096))  # file size grew but the data never made it
    with caplog.at_level(logging.WARNING, logger="clusterrep.journal"), Journal(fast_dir) as j:
        assert read_all(j) == list(enumerate(recs, 1))
    assert "dropping 4096 bytes" in caplog.text
    assert seg.stat().st_size == size


def test_torn_header_of_a_new_last_segment_is_rewritten(fast_dir: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    recs = build(fast_dir)
    (fast_dir / segment_name(7)).write_bytes(b"CRJ")  # a crash while rolling to segment 7
    with caplog.at_level(logging.WARNING, logger="clusterrep.journal"), Journal(fast_dir) as j:
        assert (j.next_index, read_all(j)) == (7, list(enumerate(recs, 1)))
        assert j.append([b"x"]) == 7
    assert "being created" in caplog.text
    with Journal(fast_dir) as j:
        assert j.read(7) == [(7, b"x")]


@pytest.mark.parametrize("where", ["payload", "crc", "length", "index"])
def test_damage_before_the_tail_raises(fast_dir: Path, where: str) -> None:
    build(fast_dir)
    seg = segments(fast_dir)[0]
    off, _ = record_offsets(seg)[2]  # record 3 of 6: good records follow
    flip(seg, off + {"length": 1, "crc": 4, "index": 8, "payload": 20}[where])
    before = seg.read_bytes()
    with pytest.raises(JournalCorrupt) as err:
        Journal(fast_dir)
    text = str(err.value)
    assert str(seg) in text and f"offset {off}" in text and "valid record follows" in text
    assert f"the journal at {fast_dir} is damaged before its tail" in text
    assert seg.read_bytes() == before  # nothing was cut
    with pytest.raises(JournalCorrupt):  # and it stays refused; the lock was released
        Journal(fast_dir)


def test_damaged_length_that_looks_like_a_torn_tail_still_raises(fast_dir: Path) -> None:
    build(fast_dir)
    seg = segments(fast_dir)[0]
    off, _ = record_offsets(seg)[1]
    data = bytearray(seg.read_bytes())
    data[off + 3] = 0x7F  # length now far beyond the end of the file: looks like a partial payload
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match=f"offset {off}"):
        Journal(fast_dir)


def test_damage_in_a_non_last_segment_raises(fast_dir: Path) -> None:
    build(fast_dir, 12, segment_bytes=256)
    first = segments(fast_dir)[0]
    off, _ = record_offsets(first)[-1]  # the LAST record of a non-last segment
    flip(first, off + 20)
    with pytest.raises(JournalCorrupt, match="not the last") as err:
        Journal(fast_dir, segment_bytes=256)
    assert str(first) in str(err.value) and f"offset {off}" in str(err.value)


def test_truncated_non_last_segment_raises(fast_dir: Path) -> None:
    build(fast_dir, 12, segment_bytes=256)
    first = segments(fast_dir)[0]
    os.truncate(first, first.stat().st_size - 5)
    with pytest.raises(JournalCorrupt):
        Journal(fast_dir, segment_bytes=256)


def test_missing_middle_segment_raises(fast_dir: Path) -> None:
    build(fast_dir, 12, segment_bytes=256)
    files = segments(fast_dir)
    assert len(files) == 3
    files[1].unlink()
    with pytest.raises(JournalCorrupt, match="gap") as err:
        Journal(fast_dir, segment_bytes=256)
    assert str(files[2]) in str(err.value)


def test_journal_whose_segments_all_vanished_is_refused(fast_dir: Path) -> None:
    build(fast_dir, 3)
    for f in segments(fast_dir):
        f.unlink()
    assert Journal.inspect(fast_dir).corrupt
    with pytest.raises(JournalCorrupt, match="reuse indexes"):
        Journal(fast_dir)  # restarting at 1 would hand out seqs the replica already has


def test_short_writes_are_continued(fast_dir: Path) -> None:
    """pwritev may write less than asked (signals, quotas): the rest is written, nothing garbled."""
    real = os.pwritev

    def dribble(fd: int, buffers: list[bytes], offset: int) -> int:
        data = b"".join(bytes(b) for b in buffers)
        return real(fd, [data[:7]], offset)

    recs = [b"a" * 5, b"", b"b" * 30, b"c" * 3]
    with Journal(fast_dir) as j:
        with mock.patch("os.pwritev", dribble):
            assert j.append(recs) == 1
        assert read_all(j) == list(enumerate(recs, 1))
    with Journal(fast_dir) as j:
        assert read_all(j) == list(enumerate(recs, 1))


def test_renamed_segment_and_stray_file_raise(fast_dir: Path) -> None:
    build(fast_dir, 12, segment_bytes=256)
    files = segments(fast_dir)
    files[2].rename(fast_dir / segment_name(10))  # header and record indexes say 9
    with pytest.raises(JournalCorrupt):
        Journal(fast_dir, segment_bytes=256)
    (fast_dir / segment_name(10)).rename(files[2])
    (fast_dir / "junk.seg").write_bytes(b"")
    with pytest.raises(JournalCorrupt, match="unexpected file"):
        Journal(fast_dir, segment_bytes=256)


def test_damage_found_while_reading_raises(fast_dir: Path) -> None:
    with Journal(fast_dir, tail_cache=0) as j:  # the disk path (the tail cache is memory)
        j.append(payloads(5))
        seg = segments(fast_dir)[0]
        off, _ = record_offsets(seg)[3]
        flip(seg, off + 20)
        assert [i for i, _ in j.read(1, max_records=3)] == [1, 2, 3]
        with pytest.raises(JournalCorrupt, match=f"offset {off}"):
            j.read(1)
        os.truncate(seg, off + 3)
        with pytest.raises(JournalCorrupt, match="ends early"):
            j.read(4)


def test_inspect_reports_without_changing_anything(fast_dir: Path) -> None:
    build(fast_dir, 12, segment_bytes=256)
    info = Journal.inspect(fast_dir)
    assert (info.first_index, info.next_index, info.problems, info.corrupt) == (1, 13, (), False)
    assert [s.records for s in info.segments] == [4, 4, 4]
    assert info.bytes_total == sum(f.stat().st_size for f in segments(fast_dir))
    last = segments(fast_dir)[-1]
    size = last.stat().st_size
    os.truncate(last, size - 3)
    info = Journal.inspect(fast_dir)
    assert info.next_index == 12 and not info.corrupt and "torn tail" in info.problems[0]
    assert last.stat().st_size == size - 3  # inspect cuts nothing
    flip(segments(fast_dir)[0], SEGMENT_HEADER_SIZE + 20)
    assert Journal.inspect(fast_dir).corrupt


# -- locking ----------------------------------------------------------------------------------------


def test_second_opener_is_locked_out(fast_dir: Path) -> None:
    j = Journal(fast_dir)
    try:
        with pytest.raises(JournalLocked, match=f"process {os.getpid()}") as err:
            Journal(fast_dir)  # flock is per open file description: same process conflicts too
        assert err.value.hint
        code = ("import sys\n"
                "from clusterrep.errors import JournalLocked\n"
                "from clusterrep.journal import Journal\n"
                f"try:\n    Journal({str(fast_dir)!r})\n"
                "except JournalLocked as e:\n    print(e)\n    sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 3, proc.stderr
        assert "already open" in proc.stdout
    finally:
        j.close()
    Journal(fast_dir).close()  # released on close


def test_use_after_close_is_refused(fast_dir: Path) -> None:
    j = Journal(fast_dir)
    j.close()
    j.close()
    with pytest.raises(JournalError, match="closed"):
        j.append([b"x"])


# -- disk full and I/O errors -----------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_a_real_small_filesystem(small_tmpfs: Path) -> None:
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(bytes(200 * 1024))
    d = small_tmpfs / "j"
    rec = bytes(range(256)) * 64  # 16 KiB
    kept: list[bytes] = []
    j = Journal(d, segment_bytes=128 * 1024)
    try:
        with pytest.raises(JournalFull) as err:
            for k in range(1000):
                batch = [rec[:-1] + bytes([k % 256]), rec]
                j.append(batch)
                kept.extend(batch)
                j.sync()
        assert "out of space" in str(err.value) and err.value.hint
        assert j.next_index == len(kept) + 1
        assert j.durable_index == len(kept) + 1
        assert [p for _, p in read_all(j)] == kept
        with pytest.raises(JournalFull):  # the same batch again: still full, still consistent
            j.append(batch)
        j.close()
        j = Journal(d, segment_bytes=128 * 1024)  # reopens cleanly: no warning needed, nothing torn
        assert [p for _, p in read_all(j)] == kept
        ballast.unlink()  # space comes back
        assert j.append([b"after", rec]) == len(kept) + 1
        assert j.sync() == len(kept) + 3
        j.close()
        j = Journal(d, segment_bytes=128 * 1024)
        assert [p for _, p in read_all(j)] == [*kept, b"after", rec]
    finally:
        j.close()


class FailingWrites:
    """os.pwrite and os.pwritev that write ``budget`` more bytes (the last write short), then
    raise ``err``: a file system filling up."""

    def __init__(self, budget: int, err: int = errno.ENOSPC) -> None:
        self.budget, self.err, self.real = budget, err, os.pwrite

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if self.budget <= 0:
            raise OSError(self.err, os.strerror(self.err))
        n = min(len(data), self.budget)
        self.budget -= n
        return self.real(fd, memoryview(data)[:n], offset)

    def pwritev(self, fd: int, buffers: list[bytes], offset: int) -> int:
        return self.pwrite(fd, b"".join(buffers), offset)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with mock.patch("os.pwrite", self.pwrite), mock.patch("os.pwritev", self.pwritev):
            yield


@pytest.mark.parametrize("budget", [0, 5, 16, 40, 60, 300, 600])
def test_failed_append_is_rolled_back_completely(fast_dir: Path, budget: int) -> None:
    """A batch that fails part-way (also after rolling to new segments) leaves nothing behind."""
    with Journal(fast_dir, segment_bytes=256) as j:
        j.append(payloads(3, size=37))
        j.sync()
        j.append([b"unsynced"])
        names, sizes = segments(fast_dir), [f.stat().st_size for f in segments(fast_dir)]
        with FailingWrites(budget).installed(), pytest.raises(JournalFull):
            j.append(payloads(12, 100, size=37))  # rolls twice when it gets that far
        assert segments(fast_dir) == names
        assert [f.stat().st_size for f in segments(fast_dir)] == sizes
        assert (j.next_index, j.durable_index) == (5, 4)  # the unsynced record is not called durable
        assert j.append([b"five"]) == 5
        assert j.sync() == 6
    with Journal(fast_dir, segment_bytes=256) as j:
        assert [p for _, p in read_all(j)] == [*payloads(3, size=37), b"unsynced", b"five"]


@pytest.mark.parametrize("budget", [0, 7, 30, 90])
def test_a_failed_single_record_append_is_rolled_back(fast_dir: Path, budget: int) -> None:
    """The one-record fast path (every FUSE write) keeps the all-or-nothing rule."""
    with Journal(fast_dir) as j:
        j.append([b"a" * 50])
        size = segments(fast_dir)[0].stat().st_size
        with FailingWrites(budget).installed(), pytest.raises(JournalFull):
            j.append([b"b" * 100])
        assert segments(fast_dir)[0].stat().st_size == size
        assert j.next_index == 2 and j.read(1) == [(1, b"a" * 50)]
        assert j.append([b"c"]) == 2
    with Journal(fast_dir) as j:
        assert [p for _, p in read_all(j)] == [b"a" * 50, b"c"]


def test_other_write_errors_are_journal_errors(fast_dir: Path) -> None:
    with Journal(fast_dir) as j:
        with FailingWrites(10, errno.EIO).installed(), \
                pytest.raises(JournalError, match="nothing of it was kept") as err:
            j.append([b"x" * 100])
        assert not isinstance(err.value, JournalFull)
        assert j.append([b"y"]) == 1


def test_failed_fsync_stops_the_journal(fast_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal(fast_dir)
    j.append([b"a"])

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(JournalError, match="fsync failed"):
        j.sync()
    assert j.durable_index == 1  # nothing reported durable
    with pytest.raises(JournalError, match="reopen"):
        j.append([b"b"])
    monkeypatch.undo()
    j.close()
    with Journal(fast_dir) as j:  # reopening recovers what is on disk
        assert read_all(j) == [(1, b"a")]


# -- concurrency -----------------------------------------------------------------------------------


def test_threads_append_sync_and_read_concurrently(fast_dir: Path) -> None:
    j = Journal(fast_dir, segment_bytes=4096)
    calls: dict[tuple[int, int], tuple[int, int]] = {}  # (thread, call) -> (first index, count)
    durable_seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(t: int) -> None:
        try:
            for c in range(60):
                batch = [f"{t}:{c}:{k}".encode() * 5 for k in range(1 + (t + c) % 5)]
                first = j.append(batch)
                calls[t, c] = (first, len(batch))
                if c % 3 == t % 3:
                    assert j.sync() >= first + len(batch)
        except BaseException as exc:
            errors.append(exc)

    def watcher() -> None:
        try:
            while not done.is_set():
                durable_seen.append(j.durable_index)
                j.read(j.first_index, max_records=50)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    watch = threading.Thread(target=watcher)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    assert not errors, errors
    assert j.sync() == j.next_index
    records = read_all(j)
    j.close()
    assert [i for i, _ in records] == list(range(1, len(records) + 1))
    assert len(records) == sum(n for _, n in calls.values())
    by_index = dict(records)
    for (t, c), (first, n) in calls.items():  # each call's records are contiguous, in order
        assert [by_index[first + k] for k in range(n)] == [f"{t}:{c}:{k}".encode() * 5 for k in range(n)]
    assert durable_seen == sorted(durable_seen)


def test_group_commit_shares_one_fsync(fast_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal(fast_dir)
    real_fsync = os.fsync
    fsyncs: list[int] = []
    running, release = threading.Event(), threading.Event()

    def slow_fsync(fd: int) -> None:
        fsyncs.append(fd)
        running.set()
        release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    results: dict[str, int] = {}

    def call(name: str) -> threading.Thread:
        t = threading.Thread(target=lambda: results.__setitem__(name, j.sync()))
        t.start()
        return t

    j.append([b"a"])
    leader = call("leader")
    assert running.wait(5)
    covered = call("covered")  # arrives while the fsync covering its record runs
    time.sleep(0.05)
    j.append([b"b"])  # appended during the fsync: needs one more ...
    later = [call("later1"), call("later2"), call("later3")]  # ... shared by all three
    time.sleep(0.05)
    assert len(fsyncs) == 1
    release.set()
    for t in [leader, covered, *later]:
        t.join(5)
    assert len(fsyncs) == 2
    assert results.pop("covered") >= 2  # 3 if it woke after the second fsync
    assert results == {"leader": 2, "later1": 3, "later2": 3, "later3": 3}
    monkeypatch.undo()
    j.close()


# -- property: any sequence of operations and crashes keeps every synced record ------------------------


class FsyncLedger:
    """Wraps os.fsync and keeps each file's content as of its last fsync: what a crash keeps."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.synced: dict[tuple[int, int], bytes] = {}

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        self.real(fd)
        if stat.S_ISREG(st.st_mode):  # read through a new descriptor: fd may be write-only
            self.synced[st.st_dev, st.st_ino] = Path(f"/proc/self/fd/{fd}").read_bytes()

    def crash(self, path: Path, rng: random.Random) -> None:
        """Leave ``path`` as a crash could: its fsync'd content plus any prefix of later appends.

        A file changed otherwise since its fsync (truncated) goes back to its fsync'd content.
        """
        st = path.stat()
        synced = self.synced.get((st.st_dev, st.st_ino), b"")
        current = path.read_bytes()
        if current.startswith(synced):
            path.write_bytes(current[:len(synced) + rng.randint(0, len(current) - len(synced))])
        else:
            path.write_bytes(synced)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.lists(st.binary(max_size=50), min_size=1, max_size=6)),
        st.tuples(st.just("failed-append"), st.lists(st.binary(max_size=50), min_size=1, max_size=6),
                  st.integers(0, 400)),
        st.tuples(st.just("sync")),
        st.tuples(st.just("trim"), st.integers(0, 30)),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("crash"), st.integers(0, 2**32)),
    ),
    max_size=25,
)


@given(OPS)
def test_synced_records_survive_any_history(ops: list[tuple]) -> None:
    """Crash = close without sync, then cut every segment anywhere after what was really fsync'd.

    What was fsync'd is observed (FsyncLedger), not taken from the journal, so a journal that
    called records durable without fsyncing them fails here.
    """
    ledger = FsyncLedger()
    with tempfile.TemporaryDirectory(dir=FAST_ROOT) as tmp, mock.patch("os.fsync", ledger):
        d = Path(tmp) / "j"

        def opener() -> Journal:
            return Journal(d, segment_bytes=160)

        j = opener()
        model: dict[int, bytes] = {}
        synced = 1  # every record below this was synced by sync(), close() or found at reopen
        try:
            for op in ops:
                if op[0] == "append":
                    expected = j.next_index
                    assert j.append(op[1]) == expected
                    model.update(zip(range(expected, expected + len(op[1])), op[1], strict=True))
                elif op[0] == "failed-append":
                    expected = j.next_index
                    try:
                        with FailingWrites(op[2]).installed():
                            j.append(op[1])
                    except JournalFull:
                        assert j.next_index == expected
                    else:
                        model.update(zip(range(expected, expected + len(op[1])), op[1], strict=True))
                elif op[0] == "sync":
                    synced = j.sync()
                    assert synced == j.next_index
                elif op[0] == "trim":
                    before, upto = j.first_index, j.first_index + op[1]
                    j.trim(upto)
                    assert before <= j.first_index <= max(upto, before)
                    model = {i: p for i, p in model.items() if i >= j.first_index}
                elif op[0] == "reopen":
                    j.close()
                    j = opener()
                    synced = j.next_index
                    assert j.durable_index == synced
                else:  # crash: every file loses what was not fsync'd, from an arbitrary byte on
                    claimed = j.durable_index
                    j.close(sync=False)
                    rng = random.Random(op[1])
                    for seg in segments(d):
                        ledger.crash(seg, rng)
                    j = opener()
                    assert j.next_index >= claimed  # every record called durable is still there
                    model = {i: p for i, p in model.items() if i < j.next_index}
                    synced = j.next_index
                assert synced <= j.durable_index <= j.next_index
                assert read_all(j) == sorted(model.items())
                if model:
                    assert j.next_index == max(model) + 1
                if j.first_index > 1:
                    with pytest.raises(JournalTrimmed):
                        j.read(j.first_index - 1)
        finally:
            j.close()


def _fail_after(good: int) -> Callable[[int, list[bytes], int], int]:
    """An os.pwritev that writes ``good`` times, then fails with ENOSPC."""
    real, calls = os.pwritev, [0]

    def pwritev(fd: int, bufs: list[bytes], off: int) -> int:
        calls[0] += 1
        if calls[0] > good:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, off)

    return pwritev


@given(st.lists(st.tuples(st.sampled_from(["append", "trim", "reopen", "full"]),
                          st.integers(1, 6)), max_size=25))
def test_bytes_total_always_equals_the_segment_files(steps: list[tuple[str, int]]) -> None:
    """bytes_total is kept without a lock or a sum (the FUSE write path asks on every write): it
    must still match the files through rolls, trims, reopening and a failed append rolled back."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        j = Journal(d, segment_bytes=200, fsync=False)
        try:
            for action, n in steps:
                if action == "append":
                    j.append([bytes([n]) * (10 * n)] * n)
                elif action == "trim":
                    j.trim(j.next_index - n)
                elif action == "reopen":
                    j.close()
                    j = Journal(d, segment_bytes=200, fsync=False)
                else:
                    fail_late = _fail_after(1)
                    with mock.patch("os.pwritev", fail_late), contextlib.suppress(JournalFull):
                        j.append([b"z" * 60] * (4 + n))
                assert j.bytes_total == sum(f.stat().st_size for f in segments(d))
        finally:
            j.close()


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=60), st.integers(1, 8000),
       st.lists(st.tuples(st.integers(1, 80), st.none() | st.integers(0, 20),
                          st.none() | st.integers(0, 9000)), min_size=1, max_size=20))
def test_the_tail_cache_answers_exactly_as_the_disk_does(
        sizes: list[int], cache: int, reads: list[tuple[int, int | None, int | None]]) -> None:
    """Reads served from the in-memory tail (no pread, no checksum pass) must return exactly what
    a reader without the cache gets from the files, budgets included, through rolls."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with Journal(d, segment_bytes=4096, fsync=False, tail_cache=cache) as cached:
            for k, size in enumerate(sizes):
                cached.append([bytes([k % 256]) * size])
            expected = {}
            for start, max_records, max_bytes in reads:
                expected[(start, max_records, max_bytes)] = cached.read(
                    start, max_records=max_records, max_bytes=max_bytes)
        with Journal(d, segment_bytes=4096, fsync=False, tail_cache=0) as disk:
            for (start, max_records, max_bytes), got in expected.items():
                assert got == disk.read(start, max_records=max_records, max_bytes=max_bytes)


def test_the_tail_cache_is_bounded_and_starts_empty_after_a_reopen(fast_dir: Path) -> None:
    with Journal(fast_dir, fsync=False, tail_cache=10_000) as j:
        j.append([b"x" * 1000] * 50)
        assert j._tail_bytes <= 10_000 and j._tail_first + len(j._tail) == 51
        assert j.read(1, max_records=2) == [(1, b"x" * 1000), (2, b"x" * 1000)]  # from disk
    with Journal(fast_dir, fsync=False, tail_cache=10_000) as j:
        assert j._tail == [] and j._tail_first == 51
        assert len(j.read(1)) == 50
        j.append([b"y"])
        assert j.read(51) == [(51, b"y")]


def test_a_sync_that_finds_no_descriptor_left_fails_and_hangs_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a long property run that leaked descriptors: a sync failing with EMFILE left
    the journal marked as syncing, and every later sync and close waited forever."""
    import threading

    import clusterrep.journal as journal_module

    j = Journal(tmp_path / "j")
    j.append([b"one"])
    real_dup = os.dup

    def no_descriptor_left(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(journal_module.os, "dup", no_descriptor_left)
    with pytest.raises(OSError):
        j.sync()
    monkeypatch.setattr(journal_module.os, "dup", real_dup)
    later = threading.Thread(target=lambda: (j.sync(), j.close()), daemon=True)
    later.start()
    later.join(10)
    assert not later.is_alive(), "a later sync or close waits for the sync that never ran"
