"""The coordinator's synchronisation worker: brings the replica to the volume's content.

A sync is asked for by the replica (its answers carry ``need_sync`` while it does not hold the
volume), by an operator (`clusterrep sync`), or recorded at the coordinator's first start on a
volume that already holds files. One runs at a time; a newer request replaces an unfinished
one (recorded as ``aborted``).

Steps (docs/architecture.md, "Synchronisation"): `CoordinatorService.begin_sync` records mark
S and the structure; the replica applies the structure and lists the files whose content may
differ, each with the manifest of its own copy. This worker then, over a ``sync`` connection
to the replica, takes each listed file's write token, hashes a chunk of ``chunk_blocks`` blocks
of the volume's file, asks the replica's manifest of that chunk, reads the blocks that differ
and records them as `SyncBlocks` (compressed where that pays), gives the token back, and goes
on with the next chunk; then records `SyncEnd`. ``sync.json`` in the state directory keeps the
running sync, so a restarted coordinator carries on with it (the replica lists what is still
to do).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import wire
from ..blockread import RateLimiter, range_manifest
from ..blocks import (
    BLOCK_SIZE,
    DIGEST_SIZE,
    HOLE,
    Manifest,
    block_count,
    block_length,
    compress,
    diff_blocks,
    hash_block,
)
from ..client import fetch_status
from ..durable import atomic_write
from ..errors import ClusterrepError
from ..replica.syncapply import Block, Hole
from ..syncwire import encode_blocks

if TYPE_CHECKING:
    from .service import CoordinatorService

log = logging.getLogger("clusterrep.coordinator.sync")
CHUNK_BLOCKS = 1024  # blocks read under one hold of a file's write token (64 MiB)
EVENT_BYTES = 4 << 20  # block payload per SyncBlocks event


class SyncAborted(ClusterrepError):
    """The replica no longer follows this sync (a newer one replaced it)."""


class SyncRunner:
    def __init__(self, service: CoordinatorService, replica: str, auth: wire.Auth | bytes, *,
                 chunk_blocks: int = CHUNK_BLOCKS, rate: float | None = None) -> None:
        self.service = service
        self.replica = replica
        self.auth = auth
        self.chunk_blocks = chunk_blocks
        self.limiter = RateLimiter(rate) if rate else None
        self._file = service.state / "sync.json"
        try:
            self.current: dict[str, Any] | None = json.loads(self._file.read_text()) or None
        except FileNotFoundError:
            self.current = None
        self._request: tuple[str, str, str] | None = None  # the replica's: (sync id, reason, mode)
        self._ended: set[str] = set()  # syncs over (answers still in flight may name them)
        # operators' syncs, verifies, repairs and evictions' files syncs, in the order asked
        self._queue: deque[tuple[str, str, str, list[list[Any]] | None]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ops = 0
        self._unsynced = self._synced_at = 0  # events recorded since the stream's last fsync
        self._fresh: Manifest | None = None  # the replica's copy of the file at hand, if fresh
        self.progress: dict[str, Any] = {}
        self.last: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)

    # -- requests ----------------------------------------------------------------------------

    def on_replica_reply(self, reply: dict[str, Any]) -> None:
        """The replica's shipper answer carries ``need_sync``: start the sync it asks for."""
        need = reply.get("need_sync")
        if not isinstance(need, dict) or not isinstance(need.get("request"), str):
            return
        self.request(need["request"], str(need.get("reason", "the replica asked")))

    def _known(self, sync_id: str) -> bool:
        """Is ``sync_id`` running, asked for, queued or over? (lock held)"""
        return (self.current is not None and self.current["sync_id"] == sync_id) or (
            self._request is not None and self._request[0] == sync_id) or sync_id in self._ended \
            or any(q[0] == sync_id for q in self._queue)

    def request(self, sync_id: str, reason: str) -> None:
        """The replica asks for sync ``sync_id``: it no longer follows the running one (it will
        pass everything placed before the new mark), so that one is replaced at once."""
        with self._lock:
            if self._known(sync_id):
                return
            self._request = (sync_id, reason, "sync")
        log.warning("the replica asks for a synchronisation (%s)", reason)
        self._wake.set()

    def start_now(self, reason: str, mode: str = "sync", files: list[list[Any]] | None = None) -> str:
        """An operator's sync (``mode``: sync, verify, repair; files: only ``files``, as
        ``[ino, path]``), run after those before it (a sync the replica needs is never cut
        short by one of these): returns its id."""
        sync_id = secrets.token_hex(8)
        with self._lock:
            self._queue.append((sync_id, reason, mode, files))
        log.info("%s %s queued (%s)", mode, sync_id, reason)
        self._wake.set()
        return sync_id
    # -- running -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                request, self._request = self._request, None
                if request is None and self.current is None and self._queue:
                    request = self._queue.popleft()
            try:
                if request is not None:
                    if self.current is not None:
                        self._ended.add(self.current["sync_id"])
                        self.service.record_end(self.current["sync_id"], "aborted")
                        log.warning("synchronisation %s replaced by %s", self.current["sync_id"], request[0])
                    self.current = {"sync_id": request[0], "gseq": 0, "reason": request[1],
                                    "mode": request[2], "files": request[3] if len(request) > 3 else None}
                    self._save()  # (a restart before the mark is recorded records it then)
                if self.current is not None and not self.current["gseq"]:
                    self.current["gseq"] = self.service.begin_sync(
                        self.current["sync_id"], self.current["reason"], self.current.get("mode", "sync"),
                        self.current.get("files"))
                    self._save()
                if self.current is not None:
                    outcome = self._carry_out(self.current)
                    if outcome is not None:
                        self._ended.add(self.current["sync_id"])
                        self.service.record_end(self.current["sync_id"], outcome)
                        self.last = {**self.current, **self.progress, "outcome": outcome}
                        log.info("synchronisation %s %s: %s", self.current["sync_id"], outcome,
                                 self.progress)
                        self.current = None
                        self._save()
            except (ClusterrepError, OSError) as exc:
                if not self._stop.is_set():
                    log.warning("synchronisation: %s (trying again)", exc)
                self._stop.wait(1.0)
                continue
            self._wake.wait(0.5)
            self._wake.clear()

    def _save(self) -> None:
        atomic_write(self._file, json.dumps(self.current).encode())

    def _carry_out(self, cur: dict[str, Any]) -> str | None:
        """Compare and send every file the replica lists; the outcome, or None if interrupted."""
        sync_id = cur["sync_id"]
        conn = wire.connect(self.replica, self.auth, name="coordinator", role="coordinator")
        try:
            conn.send({"t": "sync", "sync_id": sync_id, "generation": self.service.generation})
            self._ask(conn, None, "ready")
            self.progress = {"files": 0, "bytes_read": 0, "bytes_sent": 0, "blocks_sent": 0,
                             "started": time.time()}
            after = 0
            # what this coordinator recorded before (a restart) must be applied before the
            # replica says what is left, or it would be sent twice
            recorded = self.service.gseq
            while not self._stop.is_set():
                if self._request is not None:
                    return None  # a newer request replaces this sync
                self._sync_stream()  # (the replica must have what it is asked about)
                plan = self._ask(conn, {"t": "plan", "after": after}, "plan")
                state = plan.get("state")
                awaiting = plan.get("awaiting")
                if state == "unknown" and ((awaiting and awaiting != sync_id)
                                           or int(plan.get("applied", 0)) > cur["gseq"] > 0):
                    return "aborted"  # the replica follows another sync
                if state in ("wait", "unknown") or int(plan.get("applied", 0)) < recorded:
                    self._stop.wait(0.1)
                    continue
                recorded = 0
                files = plan.get("files") or []
                if not files:
                    return "done"
                for ino, raw, upto, fresh, size in files:
                    # a fresh file on the replica is one hole of its size: no need to ask
                    self._fresh = Manifest.holes_only(int(size), 0, block_count(int(size))) \
                        if fresh else None
                    try:
                        self._sync_file(conn, sync_id, int(ino), os.fsdecode(raw), int(upto),
                                        cur.get("mode", "sync"))
                    except OSError as exc:  # this file only: say so, go on with the others
                        log.error("synchronisation %s: cannot read %r on the volume: %s", sync_id,
                                  os.fsdecode(raw), exc)
                        self._ask(conn, {"t": "skip", "ino": int(ino),
                                         "why": f"cannot read it on the volume: {exc}"}, "ok")
                    after = int(ino)
                    self.progress["files"] += 1
            return None
        finally:
            conn.close()

    def _sync_stream(self) -> None:
        """Make what was recorded durable (and shippable): once per 256 events or 32 MiB."""
        self.service._durable()
        self._unsynced, self._synced_at = 0, self.progress.get("bytes_sent", 0)

    def _ask(self, conn: wire.Connection, msg: dict[str, Any] | None, kind: str) -> dict[str, Any]:
        if msg is not None:
            conn.send(msg)
        reply = conn.recv(timeout=600)
        if not isinstance(reply, dict) or reply.get("t") != kind:
            raise SyncAborted(f"the replica answered {reply!r:.200} to a sync {kind} request")
        return reply

    def _sync_file(self, conn: wire.Connection, sync_id: str, ino: int, hint: str, first: int,
                   mode: str) -> None:
        while True:
            with self.service.hold_token(ino, hint) as path:
                if path is None:
                    self._ask(conn, {"t": "skip", "ino": ino}, "ok")
                    return
                hint = path
                end, total = self._chunk(conn, sync_id, ino, path, first, mode)
            if end >= total:
                return
            first = end

    def _chunk(self, conn: wire.Connection, sync_id: str, ino: int, path: str,
               first: int, mode: str) -> tuple[int, int]:
        """One chunk of a file whose token is held: compare, record; returns (end, total)."""
        opath = self.service.vol.inode(path)
        try:
            fd = os.open(f"/proc/self/fd/{opath}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(opath)
        try:
            st = os.fstat(fd)
            size, total = st.st_size, block_count(st.st_size)
            first = min(first, total)  # (it shrank since a chunk was sent)
            end = _past_holes(fd, min(first + self.chunk_blocks, total), total)
            ours = range_manifest(fd, size, first, end, self.limiter)
            if self._fresh is not None:
                theirs: Manifest | None = self._fresh.slice(first, end)
            else:
                theirs = _their(self._ask(conn, {"t": "manifest", "ino": ino, "first": first,
                                                 "count": end - first}, "manifest"))
            answered = theirs
            if theirs is None or theirs.count == 0 or theirs.first != first:
                theirs = Manifest(size, first, 0, b"", b"")  # nothing there: every data block
                wanted = [i for i, b in ours.items() if b != HOLE] if ours.digests else []
            else:
                wanted = diff_blocks(ours, theirs)
            self.progress["bytes_read"] += len(ours.digests) // DIGEST_SIZE * BLOCK_SIZE
            # events of at most EVENT_BYTES each, every one covering a contiguous range of the
            # chunk (the blocks of it not listed are equal): the replica's progress in the file
            # is then exact after any of them, should the rest never come
            groups: list[tuple[int, list[Block | Hole]]] = [(first, [])]
            held = 0
            for index in wanted:
                k = index - first
                if ours.holes[k >> 3] >> (k & 7) & 1:
                    groups[-1][1].append(Hole(index))
                    continue
                if mode == "verify":  # report, change nothing: the digest says enough
                    digest = ours.slice(index, index + 1).digests
                    groups[-1][1].append(Block(index, 0, b"", digest))
                    continue
                data = os.pread(fd, block_length(size, index), index * BLOCK_SIZE)
                codec, payload = compress(data)
                if held + len(payload) > EVENT_BYTES and groups[-1][1]:
                    groups.append((index, []))
                    held = 0
                digest = hash_block(data)  # (what was read now: the manifest's may be older)
                groups[-1][1].append(Block(index, int(codec), payload, digest))
                held += len(payload)
                self.progress["bytes_sent"] += len(payload)
                self.progress["blocks_sent"] += 1
            for n, (start, group) in enumerate(groups):
                stop = groups[n + 1][0] if n + 1 < len(groups) else end
                self._ops += 1
                self.service.record_blocks(
                    f"sync-{sync_id}-{self.service.incarnation}-b{self._ops}", ino, path,
                    {"size": size, "first": start, "count": stop - start, "blocks": encode_blocks(group),
                     "final": int(end >= total and n == len(groups) - 1),
                     "base": b"" if answered is None else answered.slice(start, stop).fingerprint()},
                    durable=False)
                self._unsynced += 1
            if self._unsynced >= 256 or self.progress["bytes_sent"] - self._synced_at >= 32 << 20:
                self._sync_stream()
            return end, total
        finally:
            os.close(fd)

    def report(self, sync_id: str) -> dict[str, Any]:
        """How far sync ``sync_id`` is: ``state`` (queued, running, recorded: every step is in
        the stream, aborted, unknown), this coordinator's progress, and the replica's view
        (``replica``: its status's ``sync`` and ``last_sync``; None if it cannot be asked)."""
        cur, last = self.current, self.last
        if cur is not None and cur["sync_id"] == sync_id:
            state, progress = "running", {**cur, **self.progress}
        elif (self._request is not None and self._request[0] == sync_id) or any(
                q[0] == sync_id for q in self._queue):
            state, progress = "queued", {}
        elif last is not None and last["sync_id"] == sync_id:
            state, progress = ("recorded" if last["outcome"] == "done" else "aborted"), last
        elif sync_id in self._ended:
            state, progress = "aborted", {}
        else:
            state, progress = "unknown", {}
        try:
            st = fetch_status(self.replica, self.auth, name="coordinator")
            replica = {"sync": st.get("sync"), "last_sync": st.get("last_sync"),
                       "error": st.get("error")}
        except (ClusterrepError, OSError) as exc:
            replica = {"unreachable": str(exc)}
        return {"state": state, "progress": progress, "replica": replica}


def _past_holes(fd: int, end: int, total: int) -> int:
    """``end``, moved on past the holes that follow it (a run of holes costs one chunk)."""
    if end >= total:
        return end
    try:
        data = os.lseek(fd, end * BLOCK_SIZE, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # only holes up to the end
            return total
        return end
    return max(end, min(data // BLOCK_SIZE, total))


def _their(reply: dict[str, Any]) -> Manifest | None:
    if reply.get("state") != "ok":
        return None
    try:
        size, first, count, holes, digests = reply["m"]
        return Manifest(int(size), int(first), int(count), bytes(holes), bytes(digests))
    except (KeyError, TypeError, ValueError) as exc:
        raise SyncAborted(f"the replica sent a malformed manifest: {exc}") from None
