"""The coordinator's part of a synchronisation that needs its lock: the marks it records.

`CoordinatorService` mixes this in. Why these steps make the replica exact while nodes keep
writing (docs/architecture.md, "Synchronisation"):

* `begin_sync` recalls every write token, then, in one hold of the lock, records `SyncStart`
  (mark S) and the volume's structure as `SyncEntries`. No write is in flight at S and no
  metadata operation runs during the walk, so the structure is the volume's at S exactly, and
  every write placed before S is in it.
* `hold_token` takes one file's write token (recalled from its writer, who waits for it back),
  so while the sync reads the file nobody writes it; `record_blocks` records what was read as
  `SyncBlocks` at a mark G inside that hold: every write placed before G is in what was read,
  every write after G comes after it in the merged order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import ClusterrepError
from ..events import Attr, SyncBlocks, SyncEnd, SyncEntries, SyncStart
from ..snapshot import Entry, Kind, order_key, read_entry, walk
from ..syncwire import MAX_BATCH_BYTES, encode_entries
from ..timing import pause
from .namespace import UNKNOWN
from .volumestate import SYNC_HOLDER

log = logging.getLogger("clusterrep.coordinator")


class SyncMarks:
    """Mixin of `CoordinatorService` (uses its lock, journal, holders, recall and recording)."""

    lock: threading.RLock
    holders: dict[int, str]
    members: set[str]
    gseq: int
    _barrier: bool

    def begin_sync(self, sync_id: str, reason: str, mode: str = "sync",
                   files: list[list[Any]] | None = None) -> int:
        """Recall every write token, then record mark S and the structure; returns S."""
        self.wait_for_grace()  # type: ignore[attr-defined]
        with self.lock:
            self._barrier = True  # no token is granted until S is recorded
        try:
            while True:
                with self.lock:
                    busy = [(ino, h) for ino, h in self.holders.items() if h != SYNC_HOLDER]
                    if not busy:
                        start = self._record_start(sync_id, reason, mode, files)
                        break
                for ino, holder in busy:
                    self._recall(holder, ino)  # type: ignore[attr-defined]
        finally:
            with self.lock:
                self._barrier = False
        self._durable()  # type: ignore[attr-defined]
        return start

    def _record_start(self, sync_id: str, reason: str, mode: str = "sync",
                      files: list[list[Any]] | None = None) -> int:
        """Record S and the structure (lock held); mode "files": only ``files`` ([ino, path])."""
        ev = self._record(SyncStart, SYNC_HOLDER, f"sync-{sync_id}", sync_id=sync_id,  # type: ignore[attr-defined]
                          reason=reason[:4000], stream="volume", members=tuple(sorted(self.members)),
                          mode=mode)
        batch: list[Any] = []
        size = entries = 0
        for entry in (walk(self.volume_path) if mode != "files"  # type: ignore[attr-defined]
                      else self._file_entries(files or [])):
            batch.append(entry)
            size += 64 + len(entry.path) + sum(len(v) + len(n) for n, v in entry.xattrs)
            entries += 1
            if size >= MAX_BATCH_BYTES:
                self._record(SyncEntries, SYNC_HOLDER, f"sync-{sync_id}-s{entries}",  # type: ignore[attr-defined]
                             entries=encode_entries(batch))
                batch, size = [], 0
        self._record(SyncEntries, SYNC_HOLDER, f"sync-{sync_id}-s{entries}-end",  # type: ignore[attr-defined]
                     entries=encode_entries(batch), final=1)
        log.info("synchronisation %s: mark g%d, structure of %d entries recorded (%s)", sync_id,
                 ev.gseq, entries, reason)
        return ev.gseq

    def _file_entries(self, files: list[list[Any]]) -> Iterator[Entry]:
        """The entries of those of ``files`` that still have a name (lock held), in walk order."""
        found: dict[str, Entry] = {}
        for ino, hint in files:
            path = self._resolve(int(ino), str(hint))  # type: ignore[attr-defined]
            if path is UNKNOWN:
                path = self._search(int(ino))  # type: ignore[attr-defined]
            if not isinstance(path, str) or path in found:
                continue
            try:
                fd = self.vol.inode(path)  # type: ignore[attr-defined]
            except (OSError, ClusterrepError):
                continue
            try:
                entry = read_entry(path, fd)
            finally:
                os.close(fd)
            if entry.kind is Kind.FILE and entry.inode[1] == int(ino):
                found[path] = entry
        yield from (found[p] for p in sorted(found, key=order_key))

    @contextlib.contextmanager
    def hold_token(self, ino: int, hint: str) -> Iterator[str | None]:
        """Hold file ``ino``'s write token (its writer gives it back and waits); yields its
        path, or None if it has no name any more."""
        self.wait_for_grace()  # type: ignore[attr-defined]
        path: str | None = None
        while True:
            where = self.locate(ino, hint)  # type: ignore[attr-defined]
            if where is None:
                break
            with self.lock:
                found = self._resolve(ino, where)  # type: ignore[attr-defined]
                if found is UNKNOWN:
                    continue
                if found is None:
                    break
                holder = self.holders.get(ino)
                if holder is None:
                    self.holders[ino] = SYNC_HOLDER
                    path = found
                    break
            self._recall(holder, ino)  # type: ignore[attr-defined]
        if path is None:
            yield None
            return
        try:
            yield path
        finally:
            with self.lock:
                if self.holders.get(ino) == SYNC_HOLDER:
                    del self.holders[ino]

    def wait_released(self, ino: int) -> None:
        """A recall of a token the sync holds: wait until the sync gives it back."""
        while True:
            with self.lock:
                if self.holders.get(ino) != SYNC_HOLDER:
                    return
            pause(0.005)

    def record_blocks(self, op_id: str, ino: int, hint: str, fields: dict[str, Any], *,
                      durable: bool = True) -> int:
        """Record one `SyncBlocks` of file ``ino`` (its token held) at its current path;
        ``durable``: fsync the stream now (else the caller does, after the chunk's last)."""
        with self.lock:
            path = self._resolve(ino, hint)  # type: ignore[attr-defined]
            if not isinstance(path, str):
                path = hint
            attr = self._attr(path, xattrs=False)  # type: ignore[attr-defined]
            attrs: tuple[Attr, ...] = (attr,) if attr is not None else ()
            ev = self._record(SyncBlocks, SYNC_HOLDER, op_id, path=path, ino=ino,  # type: ignore[attr-defined]
                              attrs=attrs, **fields)
        if durable:
            self._durable()  # type: ignore[attr-defined]
        return int(ev.gseq)

    def record_end(self, sync_id: str, outcome: str) -> int:
        with self.lock:
            ev = self._record(SyncEnd, SYNC_HOLDER, f"sync-{sync_id}-end",  # type: ignore[attr-defined]
                              sync_id=sync_id, outcome=outcome)
        self._durable()  # type: ignore[attr-defined]
        return int(ev.gseq)


