"""The replica's network face: authenticated connections in, `ReplicaService` calls out.

Roles: ``node`` and ``coordinator`` peers ship their streams (see `clusterrep.shipper` for the
protocol); ``client`` peers ask for ``{"t": "status"}``. A peer's authenticated name is its
source name: a node cannot ship events in another source's name.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import serve, wire
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
        if not isinstance(hello, dict) or hello.get("t") != "hello" or hello.get("source") != source:
            conn.send({"t": "error", "message": "expected hello for the authenticated source"})
            return
        self.service.report(source, 0, tls=conn.tls)
        conn.send({"t": "welcome", "next": self.service.next_seq(source)})
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
                    conn.send({"t": "ack", "durable": durable})
                elif kind == "beat":
                    conn.send({"t": "ack", "durable": self.service.report(
                        source, captured, unsettled=unsettled)})
                else:
                    conn.send({"t": "error", "message": f"unexpected message {kind!r}"})
                    return
        finally:
            self.service.report(source, 0, connected=False)
            log.info("%s %s disconnected", conn.peer_role, source)

    def _client(self, conn: wire.Connection) -> None:
        while True:
            msg = conn.recv()
            if isinstance(msg, dict) and msg.get("t") == "status":
                conn.send({"t": "status", "status": self.service.status()})
            else:
                conn.send({"t": "error", "message": "unknown request"})


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
