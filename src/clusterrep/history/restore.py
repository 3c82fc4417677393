"""Writing a restore point into a directory: entries and blocks in, a tree out.

`write_tree(dest, entries, blocks_of)` makes the empty directory ``dest`` hold ``entries`` (the
volume at a mark, as `clusterrep.history.view.MarkView.entries` gives them): the plan is
`clusterrep.treediff.compare` against ``dest``'s own walk, carried out by
`clusterrep.replica.syncapply.SyncApplier` (confined beneath ``dest``: nothing outside it is
touched whatever the names). ``blocks_of(entry)`` gives a regular file's non-zero blocks as
``(index, data)``; everything else is a hole, so sparse files stay sparse. Owners, modes,
extended attributes, hard links, symlinks, special files and modification times are set as the
entries say (directories' times last).

When ``entries`` is a partial tree (some paths and the directories above them), ``dest``'s own
root keeps its attributes. Errors: those of `SyncApplier` (`clusterrep.errors.ApplyError` and
its kin), raised with nothing of the failing action half-done beyond one file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..blocks import Codec
from ..confined import Target
from ..replica.syncapply import Block, SyncApplier
from ..snapshot import Entry, walk
from ..treediff import Content, compare

BlocksOf = Callable[[Entry], Iterable[tuple[int, bytes]]]


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
    files = 0
    try:
        for action in compare(entries, here):
            if isinstance(action, Content):
                entry = action.entry
                written = 0

                def payload(entry: Entry = entry) -> Iterable[Block]:
                    nonlocal written
                    for index, data in blocks_of(entry):
                        written += len(data)
                        if progress is not None:
                            progress(len(data))
                        yield Block(index, Codec.RAW, data, None)

                applier.apply(action, payload())
                files += 1
                if progress is not None:
                    progress(entry.size - written)  # (its holes)
            else:
                applier.apply(action)
        target.sync()
    finally:
        target.close()
    stats = applier.stats.as_dict()
    stats["files_with_data"] = files
    return stats
