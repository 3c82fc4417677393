"""Asking a replica for its restore points and their contents (the client side of
`clusterrep.history.requests`)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

from .. import wire
from ..blocks import BLOCK_SIZE, decompress
from ..errors import ClusterrepError
from ..snapshot import Entry
from ..syncwire import decode_entries

PREFETCH_FROM = 4 << 20  # files at least this big are received ahead of writing them
_END = object()


class ReplicaRefused(ClusterrepError):
    """The replica answered a history request with an error (its message says why)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code if isinstance(code, int) and 1 <= code <= 125 else 2


class HistoryClient:
    """One authenticated ``client`` connection to a replica, for history requests."""

    def __init__(self, replica: str, auth: wire.Auth | bytes, *, timeout: float = 120.0) -> None:
        self.conn = wire.connect(replica, auth, name=f"cli-{os.getpid()}", role="client")
        self.timeout = timeout

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> HistoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, want: str) -> dict[str, Any]:
        reply = self.conn.recv(timeout=self.timeout)
        if isinstance(reply, dict) and reply.get("t") == "error":
            raise ReplicaRefused(f"the replica says: {reply.get('message')}", reply.get("code", 2))
        if not isinstance(reply, dict) or reply.get("t") != want:
            raise ClusterrepError(f"unexpected answer from the replica: {reply!r:.200}")
        return reply

    def ask(self, msg: dict[str, Any], want: str) -> dict[str, Any]:
        self.conn.send(msg)
        return self._recv(want)

    def marks(self, *, path: str | None = None, limit: int | None = None) -> tuple[list[dict[str, Any]],
                                                                                 dict[str, Any]]:
        """Every restore point (oldest first; at most ``limit``), and the history's status."""
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            page = 1000 if limit is None else min(1000, limit - len(out))
            reply = self.ask({"t": "marks", "path": path, "after": after, "limit": page}, "marks")
            out += reply["marks"]
            if len(reply["marks"]) < page or (limit is not None and len(out) >= limit):
                return out, reply["history"]
            after = out[-1]["gseq"]

    def resolve(self, **how: Any) -> tuple[int, str | None]:
        reply = self.ask({"t": "resolve", **how}, "mark")
        return int(reply["gseq"]), reply.get("received_at")

    def entries(self, gseq: int, paths: list[str] | None) -> list[Entry]:
        self.conn.send({"t": "entries", "gseq": gseq, "paths": paths})
        out: list[Entry] = []
        while True:
            reply = self._recv("entries")
            out += decode_entries(reply["blob"])
            if reply.get("final"):
                return out

    def blocks(self, gseq: int, fid: int, size: int) -> Iterator[tuple[int, bytes]]:
        """A file's non-zero blocks at the mark, decoded. Read to the end before another
        request is sent on this connection."""
        self.conn.send({"t": "content", "gseq": gseq, "fid": fid})
        while True:
            reply = self._recv("blocks")
            for index, codec, payload in reply["blocks"]:
                length = min(BLOCK_SIZE, size - index * BLOCK_SIZE)
                yield index, decompress(codec, payload, length)
            if reply.get("final"):
                return

    def digests(self, gseq: int, fid: int) -> dict[int, bytes]:
        """BLAKE3 of each 64 KiB block of file ``fid`` at mark ``gseq`` that is not all zeros."""
        reply = self.ask({"t": "digests", "gseq": gseq, "fid": fid}, "digests")
        return {int(i): bytes(d) for i, d in reply["digests"]}

    def extents(self, gseq: int, fid: int) -> list[tuple[int, int]]:
        """The byte ranges of file ``fid`` that may hold data at mark ``gseq`` (holes elsewhere)."""
        reply = self.ask({"t": "extents", "gseq": gseq, "fid": fid}, "extents")
        return [(int(a), int(b)) for a, b in reply["extents"]]

    def read(self, gseq: int, fid: int, offset: int, length: int) -> bytes:
        """At most 4 MiB of file ``fid`` at mark ``gseq`` from ``offset`` (shorter at its end)."""
        return bytes(self.ask({"t": "read", "gseq": gseq, "fid": fid, "offset": offset,
                               "length": length}, "data")["data"])


def prefetched(blocks: Iterator[tuple[int, bytes]], depth: int = 256) -> Iterator[tuple[int, bytes]]:
    """``blocks``, received by a thread of its own up to ``depth`` blocks ahead, so receiving
    and decoding overlap with writing them. Read it to the end (the connection is busy until
    then); an error of the receiving side is raised here."""
    q: queue.Queue[Any] = queue.Queue(depth)

    def run() -> None:
        try:
            for item in blocks:
                q.put(item)
        except BaseException as exc:  # (handed to the reader, who raises it)
            q.put(exc)
        q.put(_END)

    threading.Thread(target=run, name="restore-receive", daemon=True).start()
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
