"""The replica's network face: authenticated connections in, `ReplicaService` calls out.

Roles: ``node`` and ``coordinator`` peers ship their streams (see `clusterrep.shipper` for the
protocol); ``client`` peers ask for ``{"t": "status"}`` and for the history's restore points and their
contents (`clusterrep.history.requests`). A peer's authenticated name is its
source name: a node cannot ship events in another source's name.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import serve, wire
from ..history import requests
from .merger import COORDINATOR
from .service import BatchRefused, ReplicaService

log = logging.getLogger("clusterrep.replica")


class ReplicaServer:
    def __init__(self, service: ReplicaService, listen: str, auth: wire.Auth | bytes) -> None:
        self.service = service
        self.server = serve.Server(listen, auth, name="replica", role="replica", handler=self._handle)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> None:
        self.service.start()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.service.stop()

    # -- one connection ----------------------------------------------------------------------

    def _handle(self, conn: wire.Connection) -> None:
        serve.route(conn, {"node": self._stream, "coordinator": self._stream,
                          "client": self._client}, log)

    def _stream(self, conn: wire.Connection) -> None:
        source = conn.peer_name
        if conn.peer_role == "coordinator" and source != COORDINATOR:
            raise BatchRefused(f"the coordinator must authenticate as {COORDINATOR!r}", 0)
        if conn.peer_role == "node" and source == COORDINATOR:
            raise BatchRefused(f"a node cannot be named {COORDINATOR!r}", 0)
        hello = conn.recv(timeout=30)
        if source == COORDINATOR and isinstance(hello, dict) and hello.get("t") == "sync":
            self._sync_session(conn, hello)
            return
        if not isinstance(hello, dict) or hello.get("t") != "hello" or hello.get("source") != source:
            conn.send({"t": "error", "message": "expected hello for the authenticated source"})
            return
        try:
            generation = hello.get("generation")
            welcome = self.service.welcome(source, max(1, _int(hello.get("first", 1))),
                                           generation if isinstance(generation, str) else None)
        except BatchRefused as exc:
            log.warning("refused %s (%s): %s", source, conn.peer_addr, exc)
            conn.send({"t": "error", "message": str(exc)})
            return
        self.service.report(source, 0, tls=conn.tls)
        conn.send(welcome)
        log.info("%s %s connected from %s", conn.peer_role, source, conn.peer_addr)
        try:
            while True:
                msg = conn.recv()
                kind = msg.get("t") if isinstance(msg, dict) else None
                captured = _int(msg.get("captured", 0)) if isinstance(msg, dict) else 0
                unsettled = _int(msg.get("unsettled", 0)) if isinstance(msg, dict) else 0
                if kind == "batch":
                    try:
                        durable = self.service.receive(
                            source, msg.get("events"), captured,
                            lambda seq: conn.send({"t": "recv", "received": seq}), unsettled)
                    except BatchRefused as exc:
                        log.warning("refused a batch from %s (%s): %s", source, conn.peer_addr, exc)
                        conn.send({"t": "error", "message": str(exc), "next": exc.next_seq})
                        return
                    conn.send({"t": "ack", "durable": durable, **self.service.sync_request(source)})
                elif kind == "beat":
                    conn.send({"t": "ack", "durable": self.service.report(
                        source, captured, unsettled=unsettled), **self.service.sync_request(source)})
                else:
                    conn.send({"t": "error", "message": f"unexpected message {kind!r}"})
                    return
        finally:
            self.service.report(source, 0, connected=False)
            log.info("%s %s disconnected", conn.peer_role, source)

    def _sync_session(self, conn: wire.Connection, hello: dict[str, Any]) -> None:
        """The coordinator's questions during a sync: which files are pending (``plan``), and
        the target's blocks of a range of one (``manifest``). See `clusterrep.replica.sync`."""
        sync = self.service.sync
        sync_id = hello.get("sync_id")
        if not isinstance(sync_id, str):
            conn.send({"t": "error", "message": "a sync session needs a sync_id"})
            return
        generation = hello.get("generation")
        try:
            self.service.check_generation(COORDINATOR, generation if isinstance(generation, str) else None)
        except BatchRefused as exc:
            conn.send({"t": "error", "message": str(exc)})
            return
        conn.send({"t": "ready"})
        while True:
            msg = conn.recv()
            kind = msg.get("t") if isinstance(msg, dict) else None
            if kind == "plan":
                conn.send(sync.plan(sync_id, _int(msg.get("after", 0))))
            elif kind == "manifest":
                count = _int(msg.get("count", 0))
                conn.send(sync.manifest(sync_id, _int(msg.get("ino", 0)), _int(msg.get("first", 0)),
                                        count))
            elif kind == "skip":
                why = msg.get("why")
                sync.skip(sync_id, _int(msg.get("ino", 0)), why[:1000] if isinstance(why, str) else None)
                conn.send({"t": "ok"})
            else:
                conn.send({"t": "error", "message": f"unexpected message {kind!r}"})
                return

    def _client(self, conn: wire.Connection) -> None:
        history = requests.session(self.service.history)
        while True:
            msg = conn.recv()
            if isinstance(msg, dict) and msg.get("t") == "status":
                conn.send({"t": "status", "status": self.service.status()})
            elif isinstance(msg, dict) and msg.get("t") in requests.KINDS:
                history.answer(conn, msg)
            else:
                conn.send({"t": "error", "message": "unknown request"})


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
