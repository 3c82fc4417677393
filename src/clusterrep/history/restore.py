"""Writing a restore point into a directory: entries and blocks in, a tree out.

`write_tree(dest, entries, blocks_of)` makes the empty directory ``dest`` hold ``entries`` (the
volume at a mark, as `clusterrep.history.view.MarkView.entries` gives them): the plan is
`clusterrep.treediff.compare` against ``dest``'s own walk, carried out through
`clusterrep.confined.Target` (confined beneath ``dest``: nothing outside it is touched whatever
the names) and `clusterrep.replica.syncapply.SyncApplier` for everything but a regular file's
data. ``blocks_of(entry)`` gives a regular file's non-zero 64 KiB blocks as ``(index, data)`` in
increasing order; they are written as the file grows (runs of consecutive blocks in one write)
and the file is extended to its size at the end, so what no block covers is a hole and sparse
files stay sparse. (Writing a file front to back is several times faster than filling the holes
of one extended to its size first.) Owners, modes, extended attributes, hard links, symlinks,
special files and modification times are set as the entries say (directories' times last).

When ``entries`` is a partial tree (some paths and the directories above them), ``dest``'s own
root keeps its attributes. Errors: those of `SyncApplier` and `Target`
(`clusterrep.errors.ApplyError` and its kin).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..blocks import BLOCK_SIZE
from ..confined import Target
from ..errors import ApplyError
from ..replica.syncapply import SyncApplier
from ..snapshot import Entry, Kind, walk
from ..treediff import Content, Create, compare

BlocksOf = Callable[[Entry], Iterable[tuple[int, bytes]]]
RUN_BYTES = 1 << 20  # consecutive blocks written together


def write_tree(dest: str | os.PathLike[str], entries: list[Entry], blocks_of: BlocksOf, *,
               whole: bool = True, progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Make ``dest`` hold ``entries``; counts of what was done. ``whole``: the entries are the
    whole volume (its root's attributes go to ``dest``); ``progress(n)``: ``n`` more bytes of
    regular files are done (holes included)."""
    dest = Path(dest)
    here = list(walk(dest))
    if not whole:
        root = here[0]
        entries = [dataclasses.replace(root, inode=(0, -1)), *entries[1:]]
    target = Target(dest)
    applier = SyncApplier(target)
    written = files = 0
    try:
        for action in compare(entries, here):
            if isinstance(action, Create) and action.entry.kind is Kind.FILE:
                target.create(action.entry.path, 0o600, exist_ok=False)  # (empty: it grows)
                applier.stats.created += 1
            elif isinstance(action, Content):
                written += _content(target, action.entry, blocks_of(action.entry), progress)
                files += 1
            else:
                applier.apply(action)
        target.sync()
    except OSError as exc:
        raise ApplyError(f"writing the restore into {dest} failed: {exc}", errno=exc.errno or 5) from None
    finally:
        target.close()
    stats = applier.stats.as_dict()
    stats["files_with_data"] = files
    stats["bytes_written"] = written
    return stats


def _content(target: Target, entry: Entry, blocks: Iterable[tuple[int, bytes]],
             progress: Callable[[int], None] | None) -> int:
    """Write a new, empty file's blocks front to back, then extend it to its size."""
    fd = target.file_fd(entry.path)
    run: list[bytes] = []
    start = last = -1
    written = 0

    def flush() -> None:
        nonlocal written
        if run:
            data = b"".join(run)
            view = memoryview(data)
            offset = start * BLOCK_SIZE
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            written += len(data)
            if progress is not None:
                progress(len(data))
            run.clear()

    for index, data in blocks:
        if index <= last or index * BLOCK_SIZE >= max(entry.size, 1):
            raise ApplyError(f"content of {entry.path!r}: block {index} after block {last} in a file "
                             f"of {entry.size} bytes")
        if index != last + 1 or len(run) * BLOCK_SIZE >= RUN_BYTES:
            flush()
        if not run:
            start = index
        run.append(data)
        last = index
    flush()
    os.ftruncate(fd, entry.size)
    if progress is not None:
        progress(entry.size - written)  # (its holes)
    return written
