"""Failing back: before the old site's copy is brought to the new volume, keep what it wrote
that never reached the replica.

After a failover the new volume started from restore point M of the old replica. When the old
site returns, its volume holds the state at M *plus* whatever it wrote after M that never
reached the replica (lost writes, as far as the new volume knows). A replica adopting that copy
(``--adopt-target``) would make it equal to the new volume and so overwrite them.
`save_unreplicated` compares the old copy with M first (the old replica's history: every
entry at M, and the BLAKE3 of each 64 KiB block of each file, `HistoryClient.digests`; the
old copy's blocks are hashed where they are, so only digests cross the network):

* a regular file whose blocks differ from M: those blocks are copied to ``save_to`` under the
  same path (a sparse file holding just them) and listed with their byte ranges;
* a regular file not at M (made after it): copied whole, listed as ``new``;
* anything at M missing from the old copy, or another kind of entry that differs (a symlink's
  target, a type): listed only (nothing of the old site's to keep).

The list is written to ``save_to/failback.json`` (and returned); with ``save_to`` None nothing is
copied (``--discard-old-changes``): the list is still written beside the state and logged.
Errors: `clusterrep.errors.ClusterrepError` if the old replica cannot answer; OSError from the
old copy.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..blockread import data_extents
from ..blocks import BLOCK_SIZE, hash_block
from ..durable import atomic_write
from ..snapshot import Kind, walk
from .client import HistoryClient
from .ranges import Ranges

log = logging.getLogger("clusterrep.failback")


@dataclass
class Unreplicated:
    """What the old site holds that restore point ``mark`` does not."""

    mark: int
    changed: dict[str, list[list[int]]] = field(default_factory=dict)  # path -> [[start, end], ...]
    new: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # at the mark, missing at the old site
    other: list[str] = field(default_factory=list)  # another kind, or a symlink's target
    saved_to: str | None = None
    bytes: int = 0

    def summary(self) -> str:
        return (f"{len(self.changed)} file(s) with blocks written after mark g{self.mark} "
                f"({self.bytes} bytes), {len(self.new)} made after it, {len(self.gone)} removed "
                f"after it, {len(self.other)} other difference(s)")


def save_unreplicated(target: Path, client: HistoryClient, mark: int, save_to: Path | None) -> Unreplicated:
    """Compare ``target`` (the old site's copy) with restore point ``mark``; keep what differs
    in ``save_to`` (module docstring)."""
    at_mark = {e.path: e for e in client.entries(mark, None)}
    report = Unreplicated(mark=mark, saved_to=None if save_to is None else str(save_to))
    seen: set[str] = set()
    for entry in walk(target):
        seen.add(entry.path)
        then = at_mark.get(entry.path)
        if entry.kind is Kind.FILE:
            if then is None or then.kind is not Kind.FILE:
                ranges = [(0, entry.size)] if entry.size else []
                report.new.append(entry.path)
            else:
                ranges = _changed(target / entry.path, client.digests(mark, then.inode[1]), then.size)
            if ranges:
                report.changed[entry.path] = [list(r) for r in ranges]
                report.bytes += sum(b - a for a, b in ranges)
                if save_to is not None:
                    _copy_ranges(target / entry.path, save_to / entry.path, ranges)
        elif then is None or then.kind is not entry.kind or then.target != entry.target:
            report.other.append(entry.path)
    report.gone = sorted(p for p in at_mark if p not in seen)
    if save_to is not None:
        save_to.mkdir(parents=True, exist_ok=True)
        atomic_write(save_to / "failback.json", json.dumps(asdict(report), indent=1).encode())
    return report


def _changed(path: Path, digests: dict[int, bytes], size_then: int) -> list[tuple[int, int]]:
    """Byte ranges of ``path`` whose 64 KiB blocks differ from ``digests`` (the blocks at the
    mark; absent: zeros) or lie past ``size_then``."""
    out = Ranges()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data_blocks: set[int] = set()
        for a, b in data_extents(fd, size):
            for index in range(a // BLOCK_SIZE, (b - 1) // BLOCK_SIZE + 1):
                data_blocks.add(index)
        for index in sorted(data_blocks | {i for i in digests if i * BLOCK_SIZE < size}):
            start = index * BLOCK_SIZE
            block = os.pread(fd, min(BLOCK_SIZE, size - start), start)
            zero = block.count(0) == len(block)
            then = digests.get(index)
            same = (then is None and zero) or (then is not None and hash_block(block) == then)
            if not same or start + len(block) > size_then:
                out.add(start, start + len(block))
    finally:
        os.close(fd)
    return list(zip(out.starts, out.ends, strict=True))


def _copy_ranges(src: Path, dst: Path, ranges: list[tuple[int, int]]) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for a, b in ranges:
            while a < b:
                data = os.pread(fin, min(b - a, 1 << 20), a)
                if not data:
                    break
                os.pwrite(fout, data, a)
                a += len(data)
        os.ftruncate(fout, os.fstat(fin).st_size)
        os.fsync(fout)
    finally:
        os.close(fin)
        os.close(fout)


def report_lines(report: Unreplicated) -> list[str]:
    """What an operator reads in the log: every path, what happened to it."""
    lines = [f"{p}: blocks written after the failover mark, {_ranges_text(r)}" for p, r in
             sorted(report.changed.items()) if p not in report.new]
    lines += [f"{p}: made after the failover mark" for p in report.new]
    lines += [f"{p}: removed after the failover mark" for p in report.gone]
    lines += [f"{p}: differs from the failover mark (type or symlink target)" for p in report.other]
    return lines


def _ranges_text(ranges: list[list[int]]) -> str:
    shown = ", ".join(f"{a}..{b}" for a, b in ranges[:5])
    return shown + (f" and {len(ranges) - 5} more" if len(ranges) > 5 else "")

