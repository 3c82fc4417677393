"""Byte ranges for the history: what a staged group touched, what was captured since a mark,
and reading a file's ranges into undo rows.

`Touched`: one file's changes staged in the current group (its size after them and the ranges
written; a later overlapping change must wait for the group to be applied). `Ranges`: a set of
byte ranges kept merged (what was captured of a file since the last mark; what a restore window
already took from undo rows). `capture` appends undo rows for a range of a file, holes as zero
rows; `copy_sparse` copies a file keeping its holes (a kept inode on another file system).
"""

from __future__ import annotations

import bisect
import os
from typing import Any

from ..blockread import data_extents

MAX_ROW = 1 << 20  # bytes of one undo row's data (zero rows may be longer)


class Touched:
    """One file's changes staged in the current group: its size after them, the ranges written."""

    __slots__ = ("ends", "size", "starts")

    def __init__(self, size: int) -> None:
        self.size = size
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        if i and self.ends[i - 1] > start:
            return True
        return i < len(self.starts) and self.starts[i] < end

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.starts, start)
        if i and self.ends[i - 1] == start:  # (the common case: a sequential write)
            self.ends[i - 1] = end
            return
        self.starts.insert(i, start)
        self.ends.insert(i, end)


class Ranges:
    """A set of byte ranges, kept merged: what was captured of one file since the last mark."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not in the set, in order."""
        out: list[tuple[int, int]] = []
        i = bisect.bisect_left(self.ends, start + 1)  # the first range that ends after start
        at = start
        while at < end and i < len(self.starts) and self.starts[i] < end:
            if self.starts[i] > at:
                out.append((at, self.starts[i]))
            at = max(at, self.ends[i])
            i += 1
        if at < end:
            out.append((at, end))
        return out

    def add(self, start: int, end: int) -> None:
        starts, ends = self.starts, self.ends
        i = bisect.bisect_left(ends, start)  # the first range that ends at or after start
        j = bisect.bisect_right(starts, end)  # past the last range that starts at or before end
        if i < j:
            start, end = min(start, starts[i]), max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]


def capture(rows: list[list[Any]], blob: bytearray, fid: int, k: int, fd: int, start: int, stop: int,
             before: int) -> None:
    """Undo rows for bytes ``[start, stop)`` of ``fd`` (holes as zero rows)."""
    pos = start
    for a, b in data_extents(fd, stop, start):
        if a > pos:
            rows.append([fid, k, "", k, pos, a - pos, before, -1])
        while a < b:
            n = min(b - a, MAX_ROW)
            data = os.pread(fd, n, a)
            if len(data) < n:
                data += bytes(n - len(data))
            rows.append([fid, k, "", k, a, n, before, len(blob)])
            blob += data
            a += n
        pos = b
    if stop > pos:
        rows.append([fid, k, "", k, pos, stop - pos, before, -1])


def copy_sparse(src: int, dir_fd: int, name: str) -> None:
    size = os.fstat(src).st_size
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        for a, b in data_extents(src, size):
            while a < b:
                data = os.pread(src, min(b - a, MAX_ROW), a)
                if not data:
                    break
                os.pwrite(out, data, a)
                a += len(data)
        os.ftruncate(out, size)
        os.fdatasync(out)
    finally:
        os.close(out)
