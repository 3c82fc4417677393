"""The shipper: sends a source's journal (its event stream) to the replica, forever.

Used by node agents (their spool) and by the coordinator (its metadata stream). The journal's
record index is the event's ``seq``. On every (re)connection the replica says which seq it needs
next and the shipper resends from there, so a broken link loses nothing and duplicates nothing
the replica cannot drop. Records are trimmed from the journal only once the replica has called
them durable.

Protocol (msgpack frames over an authenticated `wire.Connection`):

    -> {"t": "hello", "source": NAME, "first": SEQ}
                            <- {"t": "welcome", "next": SEQ, "gap_ok": BOOL, ["need_sync": {...}]}
    -> {"t": "batch", "events": [bytes...], "captured": N, "unsettled": K}
                                <- {"t": "recv", "received": SEQ}   (validated, in memory)
                                <- {"t": "ack", "durable": SEQ}     (fsync'd in its journal)
    -> {"t": "beat", "captured": N, "unsettled": K}              <- {"t": "ack", "durable": SEQ}
    <- {"t": "error", "message": TEXT, "next": SEQ}   (the replica refuses; resend from next)

Up to ``window`` big batches are sent before their acknowledgements come back, so reading and
sending the next one overlaps the replica's journal write and fsync of the previous one (a
backlog of large writes); small batches wait for the acknowledgement and grow meanwhile. The
replica answers them in order; a refusal ends the connection, and the resend starts from the
replica's ``next`` as after any reconnect.

``first`` is the oldest seq the journal still holds. A replica that needs older ones lost them
(they were trimmed once a replica had them): it then needs a synchronisation, says ``gap_ok``,
and the stream is sent from ``first``. To the coordinator's shipper the replica adds
``need_sync`` (``request``, ``reason``) to its answers while it waits for one; ``on_reply``
sees every answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import wire
from .errors import ClusterrepError
from .journal import Journal

log = logging.getLogger("clusterrep.shipper")


class ReplicaRefused(ClusterrepError):
    """The replica refused a batch or the hello."""

    exit_code = 7


class Shipper:
    def __init__(self, journal: Journal, replica: str, auth: wire.Auth | bytes, *, name: str, role: str,
                 batch_bytes: int = 4 << 20, beat_interval: float = 0.2,
                 retry_interval: float = 0.5, linger: float = 0.002, window: int = 4,
                 unsettled: Callable[[], int] = lambda: 0,
                 on_reply: Callable[[dict[str, Any]], None] | None = None,
                 generation: Callable[[], str | None] = lambda: None) -> None:
        self.journal = journal
        self.generation = generation  # the cluster generation this stream belongs to, if known
        self.on_reply = on_reply
        # files written whose modification time is not recorded yet (`NodeAgent.unsettled`):
        # reported with every batch and beat, so `clusterrep wait` waits for them too
        self.unsettled = unsettled
        self.replica = replica
        self.auth = auth
        self.name = name
        self.role = role
        self.batch_bytes = batch_bytes
        self.beat_interval = beat_interval
        self.retry_interval = retry_interval
        self.linger = linger  # wait this long for more events before shipping a small batch
        self.window = window  # batches sent ahead of their acknowledgement (pipelining)
        self.durable = journal.first_index - 1
        self.received = self.durable  # in the replica's memory (not yet fsync'd there)
        self._acks = threading.Condition()
        self.connected = False
        self.last_error = ""
        self.shipped_bytes = 0
        self.shipped_events = 0
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shipper-{name}", daemon=True)
        self._conn: wire.Connection | None = None

    # -- control -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """New records were appended: ship them now rather than at the next beat."""
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.notify()
        conn = self._conn
        if conn is not None:
            conn.close()
        self._thread.join(timeout)

    @property
    def captured(self) -> int:
        return self.journal.next_index - 1

    @property
    def backlog(self) -> int:
        """Events captured and not yet durable on the replica."""
        return self.captured - self.durable

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._session()
            except (ClusterrepError, OSError) as exc:
                if self._stop.is_set():
                    break
                if str(exc) != self.last_error:
                    log.warning("%s: shipping to replica %s: %s (retrying)", self.name,
                                self.replica, exc)
                self.last_error = str(exc)
            finally:
                self.connected = False
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            self._stop.wait(self.retry_interval)

    def _session(self) -> None:
        conn = wire.connect(self.replica, self.auth, name=self.name, role=self.role)
        self._conn = conn
        conn.send({"t": "hello", "source": self.name, "first": self.journal.first_index,
                   "generation": self.generation()})
        reply = self._reply(conn)
        nxt = int(reply["next"])
        if nxt < self.journal.first_index and reply.get("gap_ok") is True:
            log.warning("%s: the replica asks for seq %d, trimmed here; it is synchronising, so the "
                        "stream goes on from seq %d", self.name, nxt, self.journal.first_index)
            nxt = self.journal.first_index
        if nxt > self.journal.next_index:
            raise ReplicaRefused(
                f"the replica already has seq {nxt - 1} from {self.name}, but this journal ends at "
                f"{self.journal.next_index - 1}: this source's state was reset or restored from an "
                "older copy, and its new events would be taken for duplicates",
                hint="give this node a new --id, or reset the replica")
        if nxt < self.journal.first_index:
            raise ReplicaRefused(
                f"the replica needs seq {nxt} but this journal starts at "
                f"{self.journal.first_index}: those events were trimmed after the replica "
                "called them durable, so the replica lost them",
                hint="resynchronise the replica (the replica's state directory was reset?)")
        self._acked(nxt - 1)
        self.connected = True
        if self.last_error:
            log.info("%s: connected to replica %s, resending from seq %d", self.name,
                     self.replica, nxt)
            self.last_error = ""
        last_beat = 0.0
        inflight: deque[int] = deque()  # last seq of each batch sent and not yet acknowledged
        while not self._stop.is_set():
            if len(inflight) < self.window:
                records = self._next_batch(nxt, idle=not inflight)
                if records and (not inflight or self._full(records)):
                    conn.send({"t": "batch", "events": [raw for _, raw in records],
                               "captured": self.captured, "unsettled": self.unsettled()})
                    inflight.append(records[-1][0])
                    nxt = records[-1][0] + 1
                    self.shipped_events += len(records)
                    self.shipped_bytes += sum(len(raw) for _, raw in records)
                    continue
            if inflight:  # the window is full, or nothing more to send: take a reply
                reply = self._reply(conn)
                if reply.get("t") == "recv":  # in the replica's memory; the fsync'd ack follows
                    self._acked(None, received=int(reply["received"]))
                    continue
                inflight.popleft()
                self._acked(int(reply["durable"]))
                last_beat = time.monotonic()
                continue
            if time.monotonic() - last_beat >= self.beat_interval:
                conn.send({"t": "beat", "captured": self.captured,
                           "unsettled": self.unsettled()})
                self._acked(int(self._reply(conn)["durable"]))
                last_beat = time.monotonic()
            with self._wake:
                if self.journal.next_index <= nxt and not self._stop.is_set():
                    self._wake.wait(self.beat_interval)

    def _full(self, records: list[tuple[int, bytes]]) -> bool:
        """Is this batch worth sending ahead of the last one's acknowledgement? Only a big one:
        small batches sent ahead would each cost the replica a journal write and an fsync (in a
        random-write run that doubled its CPU per event); waiting lets them grow instead."""
        return len(records) >= 1024 or sum(len(raw) for _, raw in records) >= self.batch_bytes // 2

    def _next_batch(self, nxt: int, *, idle: bool) -> list[tuple[int, bytes]]:
        """The durable records from ``nxt`` on, up to ``batch_bytes`` (none if there are none)."""
        if nxt >= self.journal.next_index:
            return []
        if idle and self.linger and self.journal.next_index - nxt < 256:
            # a few events only and nothing in flight: let more come, so that one fsync and one
            # round trip (here and on the replica) carry many of them
            self._stop.wait(self.linger)
        if self.journal.durable_index <= nxt:
            # never let the replica hold an event this source could lose in a crash: it would
            # reuse the seq and the replica would drop the new event
            self.journal.sync()
        records = self.journal.read(nxt, max_bytes=self.batch_bytes)
        return [r for r in records if r[0] < self.journal.durable_index]

    def _reply(self, conn: wire.Connection) -> dict[str, Any]:
        reply = conn.recv(timeout=60.0)
        if not isinstance(reply, dict):
            raise ReplicaRefused(f"unexpected reply from the replica: {reply!r:.100}")
        if reply.get("t") == "error":
            raise ReplicaRefused(f"the replica refused: {reply.get('message')}")
        if reply.get("t") not in ("welcome", "ack", "recv"):
            raise ReplicaRefused(f"unexpected reply from the replica: {reply!r:.100}")
        if self.on_reply is not None and "need_sync" in reply:
            self.on_reply(reply)
        return reply

    def _acked(self, durable: int | None, *, received: int | None = None) -> None:
        with self._acks:
            if received is not None and received > self.received:
                self.received = received
            if durable is not None and durable > self.durable:
                self.durable = durable
                self.received = max(self.received, durable)
            self._acks.notify_all()
        if durable is not None and durable >= self.journal.first_index:
            self.journal.trim(durable + 1)

    def wait_for(self, seq: int, *, durable: bool, timeout: float) -> bool:
        """Wait until the replica has ``seq`` (fsync'd if ``durable``); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._acks:
            while (self.durable if durable else self.received) < seq:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._acks.wait(min(left, 0.5))
        return True
