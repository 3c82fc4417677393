"""The replica's answers to history requests from `clusterrep marks`, `restore` and `mount-mark`.

Each request is one msgpack map on an authenticated ``client`` connection (see docs/protocol.md,
"History"); every answer is a map whose ``t`` says what it is, or ``{"t": "error", "message",
"code"}`` with the exit code the client should end with:

* ``{"t": "marks", "path", "after", "limit"}`` -> ``{"t": "marks", "marks": [...], "window",
  "history"}``: restore points oldest first (gseq > after);
* ``{"t": "pin", "gseq", "name"}`` / ``{"t": "unpin", "name"}`` -> ``{"t": "ok", "gseq"}``;
* ``{"t": "resolve", one of "mark" | "time" | "latest" | "name"}`` -> ``{"t": "mark", "gseq",
  "received_at"}``;
* ``{"t": "entries", "gseq", "paths"}`` -> ``{"t": "entries", "blob", "final"}`` ... : the
  entries at the mark (`clusterrep.syncwire.encode_entries`, at most 4096 per message);
* ``{"t": "content", "gseq", "fid"}`` -> ``{"t": "blocks", "blocks": [[index, codec, payload],
  ...], "final"}`` ...: a file's non-zero 64 KiB blocks at the mark, about 4 MiB per message;
* ``{"t": "read", "gseq", "fid", "offset", "length"}`` -> ``{"t": "data", "data"}``: at most
  4 MiB of a file at the mark (shorter at its end; `clusterrep mount-mark` reads this way);
* ``{"t": "digests", "gseq", "fid"}`` -> ``{"t": "digests", "digests": [[index, blake3], ...]}``:
  the BLAKE3 digest of each 64 KiB block of a file at the mark that is not all zeros (a failback
  compares the old site's copy with it);
* ``{"t": "extents", "gseq", "fid"}`` -> ``{"t": "extents", "extents": [[start, end], ...]}``:
  the ranges that may hold data at the mark (outside them: holes).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from .. import wire
from ..blocks import Codec, compress, hash_block
from ..errors import ClusterrepError
from ..syncwire import encode_entries
from .recorder import Recorder
from .view import Marks, MarkView, iso, parse_time

ENTRIES_PER_MESSAGE = 4096
BLOCK_BYTES_PER_MESSAGE = 4 << 20
log = logging.getLogger("clusterrep.history")
KINDS = ("marks", "pin", "unpin", "resolve", "entries", "content", "read", "extents", "digests")
MAX_READ = 4 << 20


class _Session:
    """One client connection's history requests (a restore keeps its view between them)."""

    def __init__(self, recorder: Recorder | None) -> None:
        self.rec = recorder
        self.view: MarkView | None = None

    def _recorder(self) -> Recorder:
        if self.rec is None:
            raise ClusterrepError("this replica keeps no history",
                                  hint="start it with --retain DURATION (and --retain-size SIZE)")
        return self.rec

    def _view(self, gseq: Any) -> MarkView:
        if self.view is None or self.view.mark != gseq:
            self.view = MarkView(self._recorder(), _int(gseq, "gseq"))
        return self.view

    def answer(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        try:
            getattr(self, "_" + msg["t"])(conn, msg)
        except ClusterrepError as exc:
            conn.send({"t": "error", "message": str(exc), "code": exc.exit_code})
        except (OSError, sqlite3.Error, OverflowError, ValueError) as exc:  # (the replica goes on)
            log.error("history request %s failed: %r", msg.get("t"), exc)
            conn.send({"t": "error", "message": f"the replica could not answer: {exc}", "code": 2})

    def _marks(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        rec = self._recorder()
        marks = Marks(rec)
        path = msg.get("path")
        items = marks.list(path=path if isinstance(path, str) else None,
                           after=_int(msg.get("after", 0), "after"),
                           limit=max(1, min(_int(msg.get("limit", 1000), "limit"), 10000)))
        conn.send({"t": "marks", "marks": items, "window": marks.window(), "history": rec.status()})

    def _pin(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        gseq = _int(msg.get("gseq"), "gseq")
        Marks(self._recorder()).pin(gseq, str(msg.get("name", "")))
        conn.send({"t": "ok", "gseq": gseq})

    def _unpin(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        conn.send({"t": "ok", "gseq": Marks(self._recorder()).unpin(str(msg.get("name", "")))})

    def _resolve(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        marks = Marks(self._recorder())
        if msg.get("mark") is not None:
            gseq = marks.check(_int(msg["mark"], "mark"))
        elif msg.get("time") is not None:
            gseq = marks.at_time(parse_time(str(msg["time"])))
        elif msg.get("name") is not None:
            gseq = marks.pinned(str(msg["name"]))
        else:
            gseq = marks.latest()
        row = self._recorder().db.execute("SELECT received_at FROM marks WHERE gseq=?", (gseq,)).fetchone()
        conn.send({"t": "mark", "gseq": gseq, "received_at": iso(row[0]) if row else None})

    def _entries(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        paths = msg.get("paths")
        if paths is not None and (not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)):
            raise ClusterrepError("paths must be a list of strings")
        entries = self._view(msg.get("gseq")).entries(paths)
        for i in range(0, len(entries), ENTRIES_PER_MESSAGE):
            chunk = entries[i:i + ENTRIES_PER_MESSAGE]
            conn.send({"t": "entries", "blob": encode_entries(chunk),
                       "final": i + ENTRIES_PER_MESSAGE >= len(entries)})

    def _content(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        view = self._view(msg.get("gseq"))
        batch: list[list[Any]] = []
        size = 0
        tries = 0  # (a file whose first blocks do not compress is sent raw: images rarely do)
        for index, data in view.blocks(_int(msg.get("fid"), "fid")):
            codec, payload = Codec.RAW, data
            if tries < 8 or tries % 64 == 0:
                codec, payload = compress(data)
                tries = 0 if codec == Codec.ZSTD else tries + 1
            else:
                tries += 1
            batch.append([index, int(codec), payload])
            size += len(payload)
            if size >= BLOCK_BYTES_PER_MESSAGE:
                conn.send({"t": "blocks", "blocks": batch, "final": False})
                batch, size = [], 0
        conn.send({"t": "blocks", "blocks": batch, "final": True})


    def _read(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        view = self._view(msg.get("gseq"))
        length = min(_int(msg.get("length"), "length"), MAX_READ)
        data = view.read(_int(msg.get("fid"), "fid"), _int(msg.get("offset"), "offset"), length)
        conn.send({"t": "data", "data": data})


    def _extents(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        view = self._view(msg.get("gseq"))
        spans = view.extents(_int(msg.get("fid"), "fid"))
        conn.send({"t": "extents", "extents": [list(s) for s in spans]})


    def _digests(self, conn: wire.Connection, msg: dict[str, Any]) -> None:
        view = self._view(msg.get("gseq"))
        digests = [[index, hash_block(data)] for index, data in view.blocks(_int(msg.get("fid"), "fid"))]
        conn.send({"t": "digests", "digests": digests})


def session(recorder: Recorder | None) -> _Session:
    return _Session(recorder)


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise ClusterrepError(f"{what} must be an integer from 0 to 2**63-1, not {value!r:.40}")
    return value
