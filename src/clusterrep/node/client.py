"""The node's links to the coordinator.

`CoordinatorClient` carries requests: many threads may call `call` at once; each request has an
id and a reader thread hands every reply to the thread waiting for it. A broken link is
reconnected on the next call; a request in flight when the link broke fails with EIO (the
application sees an I/O error; the operation may or may not have run, as on NFS).

`ControlLink` receives recalls, gseq and unlock pushes, and answers recalls.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import wire
from ..errors import AuthError, ClusterrepError
from ..timing import pause

log = logging.getLogger("clusterrep.node")


class _LinkLost(Exception):
    """The link broke before the answer came: the request may be sent again."""


class CoordinatorClient:
    """``timeout`` (s): how long one request waits for its answer on a live link;
    ``wait_for`` (s): how long a request waits for an unreachable coordinator (it is sent again
    whenever the link comes back) before it fails with EIO."""

    def __init__(self, addr: str, auth: wire.Auth | bytes, name: str, *, timeout: float = 60.0,
                 wait_for: float = 120.0) -> None:
        self.addr, self.auth, self.name, self.timeout = addr, auth, name, timeout
        self.wait_for = wait_for
        # monotonic time at which the newest request that was answered had been sent: the
        # coordinator heard from us at or after it (what the node's lease counts from)
        self.alive_at = 0.0
        self._outage: float | None = None  # monotonic time the coordinator became unreachable
        # called with every answer before it is returned (the agent checks the coordinator's
        # process and its own epoch there, before it acts on what the answer grants)
        self.on_reply: Callable[[dict[str, Any]], None] | None = None
        self._outage_lock = threading.Lock()
        self._conn: wire.Connection | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}  # id -> [Event, reply]
        self._closed = False

    def _connection(self) -> wire.Connection:
        with self._lock:
            if self._conn is None:
                if self._closed:
                    raise OSError(errno.ESHUTDOWN, "node agent is stopping")
                conn = wire.connect(self.addr, self.auth, name=self.name, role="node")
                self._conn = conn
                threading.Thread(target=self._read, args=(conn,), name="coord-reader",
                                 daemon=True).start()
            return self._conn

    def _read(self, conn: wire.Connection) -> None:
        try:
            while True:
                msg = conn.recv()
                if isinstance(msg, dict):
                    slot = self._waiting.pop(msg.get("id"), None)  # type: ignore[arg-type]
                    if slot is not None:
                        slot[1] = msg
                        slot[0].set()
        except (ClusterrepError, OSError) as exc:
            if not self._closed:
                log.warning("link to coordinator %s lost: %s", self.addr, exc)
        finally:
            with self._lock:
                if self._conn is conn:
                    self._conn = None
            conn.close()
            for slot in list(self._waiting.values()):
                slot[0].set()  # reply stays None: the caller fails with EIO

    def call(self, op: str, *, patience: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raise OSError(errno) if it failed.

        If the link breaks before the reply, the same request (same op_id) is sent again for
        up to ``wait_for`` seconds (``patience``, if given, for this request and its answer):
        the coordinator runs an op_id once and answers a retry with the first answer, so a
        coordinator restart costs the application only a pause. After that the request fails
        with EIO.
        """
        deadline = time.monotonic() + (self.wait_for if patience is None else patience)
        while True:
            try:
                reply = self._call_once(op, fields, patience)
            except _LinkLost as exc:
                self._unreachable(exc)
                if self._closed or time.monotonic() > deadline:
                    raise OSError(errno.EIO, f"{exc}; gave up after waiting "
                                             f"{self.wait_for:g} s") from None
                pause(0.2)
                continue
            self._reachable()
            return reply

    def _unreachable(self, exc: _LinkLost) -> None:
        with self._outage_lock:
            if self._outage is not None or self._closed:
                return
            self._outage = time.monotonic()
        log.warning("coordinator unreachable (%s): operations wait for it, up to %g s each",
                    exc, self.wait_for)

    def _reachable(self) -> None:
        if self._outage is None:
            return
        with self._outage_lock:
            began, self._outage = self._outage, None
        if began is not None:
            log.warning("coordinator reachable again after %.1f s: waiting operations go on",
                        time.monotonic() - began)

    def _call_once(self, op: str, fields: dict[str, Any], patience: float | None = None) -> dict[str, Any]:
        try:
            conn = self._connection()
        except AuthError:
            raise  # retrying cannot help: wrong token or not the coordinator
        except (ClusterrepError, OSError) as exc:
            raise _LinkLost(f"coordinator {self.addr} unreachable: {exc}") from None
        rid = next(self._ids)
        slot: list[Any] = [threading.Event(), None]
        self._waiting[rid] = slot
        sent = time.monotonic()
        try:
            conn.send({"id": rid, "op": op, **fields})
        except (ClusterrepError, OSError) as exc:
            self._waiting.pop(rid, None)
            raise _LinkLost(f"coordinator {self.addr}: {exc}") from None
        if not slot[0].wait(self.timeout if patience is None else patience):
            self._waiting.pop(rid, None)
            if patience is not None:
                raise _LinkLost(f"coordinator {self.addr} did not answer {op} within {patience:g} s")
            raise OSError(errno.ETIMEDOUT, f"coordinator {self.addr} did not answer {op}")
        reply = slot[1]
        if reply is None:
            raise _LinkLost(f"link to coordinator lost during {op}")
        if self.on_reply is not None:
            self.on_reply(reply)  # first: tokens it voids are dropped before the lease counts
        self.alive_at = max(self.alive_at, sent)
        if "errno" in reply:
            raise OSError(int(reply["errno"]), str(reply.get("message", "")))
        return reply

    def drop_link(self) -> None:
        """Treat the link as broken (it stopped answering): waiting requests are sent again on
        a new one, or fail once the coordinator stays away too long."""
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class ControlLink:
    """Keeps the control connection up; calls ``on_recall(ino)``, ``on_gseq(g)``,
    ``on_unlocked(ino)`` for pushes, ``on_up()`` (in a thread of its own) each time the link
    comes up and ``on_down()`` each time it breaks."""

    def __init__(self, addr: str, auth: wire.Auth | bytes, name: str, *, on_recall: Callable[[int], None],
                 on_gseq: Callable[[int], None], on_down: Callable[[], None],
                 on_unlocked: Callable[[int], None] | None = None,
                 on_up: Callable[[], None] | None = None) -> None:
        self.addr, self.auth, self.name = addr, auth, name
        self.on_recall, self.on_gseq, self.on_down = on_recall, on_gseq, on_down
        self.on_unlocked, self.on_up = on_unlocked, on_up
        self.up = threading.Event()
        self._stop = threading.Event()
        self._conn: wire.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._conn is not None:
            self._conn.close()
        self._thread.join(5)

    def reconnect(self) -> None:
        """Drop the current link (it may be half open: the coordinator behind it is gone); the
        loop connects again and calls ``on_up``."""
        conn = self._conn
        if conn is not None:
            conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = wire.connect(self.addr, self.auth, name=self.name, role="node-control")
            except (ClusterrepError, OSError) as exc:
                log.debug("control link: %s", exc)
                self._stop.wait(0.5)
                continue
            self._conn = conn
            self.up.set()
            if self.on_up is not None:
                threading.Thread(target=self.on_up, name="control-up", daemon=True).start()
            try:
                while True:
                    msg = conn.recv()
                    if not isinstance(msg, dict):
                        continue
                    if msg.get("t") == "recall" and isinstance(msg.get("ino"), int):
                        self.on_recall(msg["ino"])
                        conn.send({"t": "released", "id": msg.get("id")})
                    elif msg.get("t") == "gseq" and isinstance(msg.get("g"), int):
                        self.on_gseq(msg["g"])
                    elif (msg.get("t") == "unlocked" and isinstance(msg.get("ino"), int)
                          and self.on_unlocked is not None):
                        self.on_unlocked(msg["ino"])
            except (ClusterrepError, OSError) as exc:
                if not self._stop.is_set():
                    log.warning("control link to coordinator lost: %s", exc)
            finally:
                self.up.clear()
                conn.close()
                self.on_down()
            self._stop.wait(0.2)
