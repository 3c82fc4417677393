"""The activity log: which regions of which files are being written, kept on disk.

A node writes the volume first and records the event right after. If it dies in between, the
volume has data no event describes. As DRBD does with its activity log, the node records an
*extent* (1 MiB of one file) as active before its first write into it, and fsyncs that record
before the write. After an unclean stop the log is not empty: the node re-reads every active
extent from the volume and records what the volume holds there as *repair writes*, so the
replica converges anyway. A clean stop empties the log.

Extents stay active while they are written; the retire thread drops those not written for a
while, taking the file's lock so that no write into them is in flight. A writer that moves on
sequentially activates the next extents with the current one, so that one fdatasync covers
16 MiB of its writes (DRBD's activity log uses 4 MiB extents for the same reason).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..durable import atomic_write

EXTENT = 1 << 20
LOOKAHEAD = 15  # a sequential writer entering a new extent activates this many more with it

Extent = tuple[int, str, int]  # (ino, path when written, extent number)


class ActivityLog:
    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.recovered: list[Extent] = self._load()
        self._lock = threading.Lock()
        self._active: dict[tuple[int, int], tuple[str, float]] = {}  # (ino, e) -> (path, used)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        for ino, p, e in self.recovered:  # still active until repaired
            self._active[(ino, e)] = (p, time.monotonic())

    def _load(self) -> list[Extent]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out: dict[tuple[int, int], Extent] = {}
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                out[(int(rec["ino"]), int(rec["e"]))] = (int(rec["ino"]), str(rec["path"]), int(rec["e"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line: the write it announced never started
        return list(out.values())

    def activate(self, ino: int, path: str, offset: int, length: int) -> None:
        """Before writing [offset, offset+length) of ``ino``: make its extents active, durably."""
        now = time.monotonic()
        first, last = offset // EXTENT, (offset + max(length, 1) - 1) // EXTENT
        active = self._active
        new = []
        for e in range(first, last + 1):
            slot = active.get((ino, e))
            if slot is None:
                new.append(e)
            else:
                active[(ino, e)] = (slot[0], now)
        if not new:
            return
        if (ino, first - 1) in active:
            # a sequential writer: activate the extents ahead too, so one fdatasync covers 16 MiB
            # of its writes instead of one (an extent activated early only costs a re-read of
            # what the volume holds there, should the node die before retiring it)
            new += [e for e in range(last + 1, last + 1 + LOOKAHEAD) if (ino, e) not in active]
        with self._lock:
            data = "".join(json.dumps({"ino": ino, "path": path, "e": e}) + "\n" for e in new)
            os.write(self._fd, data.encode("utf-8", "surrogateescape"))
            if self.fsync:
                os.fdatasync(self._fd)
            for e in new:
                active[(ino, e)] = (path, now)

    def retire(self, idle: float, lock_of: Callable[[int], threading.Lock],
               make_durable: Callable[[], object] = lambda: None) -> int:
        """Forget extents not written for ``idle`` seconds (none may be in flight); return how many.

        ``make_durable`` (the spool's sync) runs before the log forgets them on disk: an extent
        may only leave the log once the records of the writes into it cannot be lost, or a power
        cut could lose a record and leave nothing to say where to repair.
        """
        cutoff = time.monotonic() - idle
        stale = [(key, slot) for key, slot in list(self._active.items()) if slot[1] < cutoff]
        if not stale:
            return 0
        for (ino, e), slot in stale:
            with lock_of(ino):  # no write into this file is between its pwrite and its record
                if self._active.get((ino, e)) == slot:
                    del self._active[(ino, e)]
        make_durable()
        self._rewrite()
        return len(stale)

    def _rewrite(self) -> None:
        with self._lock:
            lines = "".join(json.dumps({"ino": ino, "path": p, "e": e}) + "\n"
                            for (ino, e), (p, _) in list(self._active.items()))
            atomic_write(self.path, lines.encode("utf-8", "surrogateescape"))
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def repaired(self, extents: list[Extent]) -> None:
        for ino, _p, e in extents:
            self._active.pop((ino, e), None)
        self.recovered = []
        self._rewrite()

    def close_clean(self) -> None:
        """Nothing is being written any more (the file system is unmounted): empty the log."""
        self._active.clear()
        self._rewrite()
        os.close(self._fd)
