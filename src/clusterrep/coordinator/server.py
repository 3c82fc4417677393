"""The coordinator's network face.

Each node opens two authenticated connections:

* role ``node``: requests, each ``{"id": N, "op": ...}``, answered ``{"id": N, ...}``; requests
  run concurrently (a request waiting for a token recall must not hold up the node's others).
  Ops: ``join``, ``leave``, ``meta`` (kind + fields), ``acquire`` (ino, path), ``where``
  (ino, path: the file's current path, or none once it has no name), ``ping``.
  A failure is answered ``{"id": N, "errno": E, "message": TEXT}``.
* role ``node-control``: the coordinator pushes ``{"t": "recall", "id": K, "ino": I}`` (answered
  ``{"t": "released", "id": K}`` once the node has stopped writing that file) and
  ``{"t": "gseq", "g": G}`` whenever the global sequence advanced, so idle nodes can tick, and
  ``{"t": "unlocked", "ino": I}`` when a lock on a file this node waits for was released.

Lock requests (op ``lock``: ino, path, kind, owner, type, start, end, test, wait) never wait in
the coordinator: a refused one is answered at once and the node waits for ``unlocked`` (or
for a signal). After a restart, nodes ``reclaim`` (locks: list) what they hold.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import serve, wire
from ..errors import ClusterrepError, InvalidLock, OpFailed, ReclaimConflict
from ..shipper import Shipper
from .requests import answer
from .service import CoordinatorService
from .sync import SyncRunner

log = logging.getLogger("clusterrep.coordinator")
RECALL_TIMEOUT = 30.0


class _Control:
    """One node's control connection and the recalls waiting on it."""

    def __init__(self, conn: wire.Connection) -> None:
        self.conn = conn
        self.waiting: dict[int, threading.Event] = {}
        self.pushed = -1
        self.closed = threading.Event()


class CoordinatorServer:
    def __init__(self, service: CoordinatorService, listen: str, replica: str,
                 auth: wire.Auth | bytes, *, sync_rate: float | None = None,
                 evict_after: float | None = None) -> None:
        self.service = service
        self.server = serve.Server(listen, auth, name="coordinator", role="coordinator",
                                  handler=self._handle)
        self.sync = SyncRunner(service, replica, auth, rate=sync_rate)
        self.shipper = Shipper(service.journal, replica, auth, name="coordinator", role="coordinator",
                               generation=lambda: service.generation,
                               on_reply=self.sync.on_replica_reply)
        service.recaller = self._recall
        service.on_record = self._recorded
        service.on_unlock = self._unlocked
        self._controls: dict[str, _Control] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="coord-op")
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._unlocks: list[tuple[str, int]] = []  # (node, ino) to tell "unlocked"
        self._pusher = threading.Thread(target=self._push_gseq, name="gseq-push", daemon=True)
        self.evict_after = evict_after
        self._evictor = threading.Thread(target=self._evict_silent, name="evict", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> None:
        self.sync.start()
        self.shipper.start()
        self.server.start()
        self._pusher.start()
        if self.evict_after is not None:
            self._evictor.start()

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self.server.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.sync.stop()
        self.shipper.stop()
        self.service.close()

    # -- connections -------------------------------------------------------------------------

    def _handle(self, conn: wire.Connection) -> None:
        serve.route(conn, {"node": self._requests, "node-control": self._control,
                           "client": self._client}, log)

    def _client(self, conn: wire.Connection) -> None:
        """An operator's requests: ``{"t": "sync"}`` starts a synchronisation now;
        ``{"t": "sync-status", "sync_id": ID}`` says how far it is (the replica asked too)."""
        while True:
            msg = conn.recv()
            kind = msg.get("t") if isinstance(msg, dict) else None
            if kind == "sync":
                mode = msg.get("mode", "sync")
                if mode not in ("sync", "verify", "repair"):
                    conn.send({"t": "error", "message": f"unknown sync mode {mode!r}"})
                    return
                command = "clusterrep sync" if mode == "sync" else \
                    f"clusterrep verify --online{' --repair' if mode == 'repair' else ''}"
                sync_id = self.sync.start_now(f"requested by an operator ({command})", mode)
                log.info("an operator asked for %s %s", mode, sync_id)
                conn.send({"t": "sync", "sync_id": sync_id})
            elif kind == "evict" and isinstance(msg.get("node"), str):
                conn.send({"t": "evict", **self.evict(msg["node"])})
            elif kind == "sync-status" and isinstance(msg.get("sync_id"), str):
                conn.send({"t": "sync-status", **self.sync.report(msg["sync_id"])})
            else:
                conn.send({"t": "error", "message": f"unexpected request {kind!r}"})
                return

    def _requests(self, conn: wire.Connection) -> None:
        node = conn.peer_name
        while True:
            msg = conn.recv()
            if not isinstance(msg, dict) or not isinstance(msg.get("id"), int):
                conn.send({"errno": errno.EINVAL, "message": "request must be a map with an id"})
                return
            self._pool.submit(self._answer, conn, node, msg)

    def _answer(self, conn: wire.Connection, node: str, msg: dict[str, Any]) -> None:
        try:
            reply = answer(self.service, node, msg)
        except OpFailed as exc:
            reply = {"errno": exc.errno, "message": str(exc)}
        except InvalidLock as exc:
            reply = {"errno": errno.EINVAL, "message": str(exc)}
        except ReclaimConflict as exc:
            log.error("node %s could not reclaim its locks: %s", node, exc)
            reply = {"errno": errno.ENOLCK, "message": str(exc)}
        except ClusterrepError as exc:
            log.error("request %r from %s failed: %s", msg.get("op"), node, exc)
            reply = {"errno": errno.EIO, "message": str(exc)}
        except Exception as exc:  # a bug must not take the coordinator down
            log.exception("request %r from %s crashed", msg.get("op"), node)
            reply = {"errno": errno.EIO, "message": f"internal error: {exc}"}
        reply["id"] = msg["id"]
        with contextlib.suppress(ClusterrepError, OSError):
            conn.send(reply)

    def evict(self, node: str) -> dict[str, Any]:
        """Remove ``node`` for good, then compare the files it was writing with the volume."""
        try:
            gseq, files = self.service.evict(node)
        except ClusterrepError as exc:
            return {"error": str(exc)}
        with self._lock:
            ctl = self._controls.pop(node, None)
        if ctl is not None:
            ctl.conn.close()
        sync_id = None
        if files:
            sync_id = self.sync.start_now(f"node {node} was evicted: the {len(files)} file(s) it was "
                                          "writing are compared with the volume", "files", files)
        return {"gseq": gseq, "files": len(files), "sync_id": sync_id}

    def _evict_silent(self) -> None:
        """``--evict-after``: evict a member silent for that long (never before its lease ran out)."""
        while not self._stop.wait(1.0):
            if self.evict_after is None:
                return
            for node in sorted(self.service.members):
                silent = time.monotonic() - self.service.seen.get(node, self.service.started)
                if silent > self.evict_after and self.service.lease_left(node) <= 0:
                    log.warning("node %s silent for %.0f s (--evict-after %g): evicting it", node,
                                silent, self.evict_after)
                    self.evict(node)

    # -- control links: recalls and gseq pushes ----------------------------------------------

    def _control(self, conn: wire.Connection) -> None:
        node = conn.peer_name
        ctl = _Control(conn)
        with self._lock:
            old = self._controls.get(node)
            self._controls[node] = ctl
        if old is not None:
            old.conn.close()
        log.info("node %s control link up from %s", node, conn.peer_addr)
        try:
            while True:
                msg = conn.recv()
                if isinstance(msg, dict) and msg.get("t") == "released":
                    event = ctl.waiting.pop(msg.get("id"), None)
                    if event is not None:
                        event.set()
        finally:
            ctl.closed.set()
            for event in list(ctl.waiting.values()):
                event.set()
            with self._lock:
                if self._controls.get(node) is ctl:
                    del self._controls[node]
                    self.service.node_gone(node)  # its tokens died with the link
            log.info("node %s control link down", node)

    def _recall(self, node: str, ino: int) -> None:
        """Ask ``node`` to release the token of ``ino`` and wait for its answer, sending the
        recall again on each new control link (the node may be reconnecting). A node that does
        not answer keeps the token until its lease has run out: then it has stopped writing by
        itself, and its tokens and locks are taken."""
        deadline = time.monotonic() + RECALL_TIMEOUT
        sent_on: _Control | None = None
        done = threading.Event()
        while True:
            if done.is_set() and sent_on is not None and not sent_on.closed.is_set():
                return  # answered (not merely woken by the end of its link)
            with self._lock:
                ctl = self._controls.get(node)
            if ctl is not None and ctl is not sent_on:
                sent_on, done = ctl, self._send_recall(ctl, ino)
            left = self.service.lease_left(node)
            if left <= 0:
                self.service.expire(node, "did not answer a recall and its lease ran out")
                return
            if time.monotonic() > deadline:
                raise OpFailed(f"node {node} did not release the write token of inode {ino} "
                               f"within {RECALL_TIMEOUT:.0f} s", errno.ETIMEDOUT)
            done.wait(min(left, 0.2))

    def _send_recall(self, ctl: _Control, ino: int) -> threading.Event:
        """Send one recall on ``ctl``; the event is set by the answer or by the link's end."""
        rid = next(self._ids)
        done = threading.Event()
        ctl.waiting[rid] = done
        try:
            ctl.conn.send({"t": "recall", "id": rid, "ino": ino})
        except (ClusterrepError, OSError):
            ctl.waiting.pop(rid, None)
        return done

    def _unlocked(self, nodes: set[str], ino: int) -> None:
        """Tell ``nodes`` that a lock on ``ino`` was released: their waiters try again. (Called
        under the service's lock: the pusher thread sends it.)"""
        with self._changed:
            self._unlocks.extend((node, ino) for node in nodes)
            self._changed.notify_all()

    def _push_unlocks(self) -> None:
        with self._changed:
            pending, self._unlocks = self._unlocks, []
        for node, ino in pending:
            with self._lock:
                ctl = self._controls.get(node)
            if ctl is not None:
                with contextlib.suppress(ClusterrepError, OSError):
                    ctl.conn.send({"t": "unlocked", "ino": ino})

    def _recorded(self) -> None:
        self.shipper.notify()
        with self._changed:
            self._changed.notify_all()

    def _push_gseq(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                if not self._unlocks:
                    self._changed.wait(0.1)
            self._push_unlocks()  # at once: a waiting program gets its lock
            self._stop.wait(0.02)  # at most ~50 pushes a second: ticks stay cheap
            g = self.service.gseq
            with self._lock:
                controls = list(self._controls.values())
            for ctl in controls:
                if ctl.pushed < g:
                    try:
                        ctl.conn.send({"t": "gseq", "g": g})
                        ctl.pushed = g
                    except (ClusterrepError, OSError):
                        pass
