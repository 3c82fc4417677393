"""The replica service: receive -> journal -> merge -> apply -> checkpoint -> trim.

Receiving (any number of connection threads) and applying (one thread) are decoupled by a queue:

* `receive` validates a batch from one source completely (nothing of a bad batch is kept),
  drops what was already received, refuses a gap, appends the rest to the journal, fsyncs
  (group commit across connections), and only then reports it durable.
* the apply thread feeds the merger, applies what it emits, checkpoints when idle or after a
  bound, and then trims the journal of everything the checkpoint covers.

On start-up the journal is re-read: the merger starts from the applier's checkpoint and the
journal's events are fed to it again; those already applied are dropped by the position.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..durable import atomic_write, generation_of, record_generation
from ..errors import ApplyError, ClusterrepError, InvalidEvent
from ..events import Event, Evict, MetaEvent, SyncStart, decode
from ..history.recorder import Recorder
from ..history.store import SEGMENT_BYTES, Store
from ..journal import Journal
from .applier import Applier
from .merger import COORDINATOR, Merger
from .position import Position
from .sync import ReplicaSync

log = logging.getLogger("clusterrep.replica")


class BatchRefused(ClusterrepError):
    """A batch that cannot be accepted (invalid event, wrong source, gap)."""

    exit_code = 7

    def __init__(self, message: str, next_seq: int) -> None:
        super().__init__(message)
        self.next_seq = next_seq


@dataclass
class SourceState:
    received: int = 0  # highest seq durable here; every seq up to it is in the journal or applied
    captured: int = 0  # highest seq the source says it has captured
    reported_at: float = 0.0  # monotonic time of the last report from the source
    unsettled: int = 0  # files it wrote whose modification time it has not recorded yet
    connected: bool = False
    tls: bool = False  # its (last) connection ran over TLS
    bytes_received: int = 0
    events_received: int = 0
    pending_since: float | None = None  # when the oldest unapplied event of this source arrived
    arrivals: deque[tuple[int, float]] = field(default_factory=deque)


class TargetNotEmpty(ClusterrepError):
    """A replica without state was pointed at a target that already holds files."""

    exit_code = 2


@dataclass(frozen=True)
class HistoryOptions:
    """How much history the replica keeps: ``retain`` seconds of restore points, at most
    ``retain_size`` bytes of history on disk (None: no bound of that kind)."""

    retain: float | None = None
    retain_size: int | None = None


class ReplicaService:
    def __init__(self, target: str | Path, state: str | Path, *, checkpoint_idle: float = 0.5,
                 checkpoint_interval: float = 30.0, adopt_target: bool = False,
                 history: HistoryOptions | None = None) -> None:
        self.state = Path(state)
        # a replica that never ran here (one killed before its first checkpoint has a journal)
        fresh = not (self.state / "apply").exists() and not (self.state / "journal").exists()
        if fresh and not adopt_target and _holds_files(target):
            raise TargetNotEmpty(
                f"target {target} already holds files and this replica has no state for it",
                hint="pass --adopt-target to have the first synchronisation compare it with the "
                     "volume (only what differs moves; every file it deletes is logged), or point "
                     "--target at an empty directory")
        self.state.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state / "journal", tail_cache=0)  # read only to replay after a restart
        self.applier = Applier(target, self.state / "apply")
        self.sync = ReplicaSync(self.state, self.applier.target)
        self.applier.sync = self.sync
        self.history: Recorder | None = None
        if history is not None:
            # undo segments are pruned whole: a small bound or a small disk wants small ones
            (self.state / "history").mkdir(parents=True, exist_ok=True)
            room = os.statvfs(self.state / "history")
            bound = min(history.retain_size or 1 << 62, room.f_blocks * room.f_frsize)
            segment = max(1 << 20, min(SEGMENT_BYTES, bound // 16))
            self.history = Recorder(Store(self.state / "history", segment_bytes=segment), self.applier.target,
                                    retain=history.retain, retain_size=history.retain_size)
            self.applier.history = self.history
            self.sync.before_removal = self.history.before_removal
        self.sync.applied_gseq = lambda: int(self._merge_view.get("gseq", 0))
        if fresh and adopt_target and _holds_files(target):
            self.sync.need(f"adopting target {target}, which already holds files")
        elif (why := self.applier.target_replaced()) is not None:
            self.sync.need(why)
        # sources whose stream (re)started after a gap while awaiting a sync: their first seq
        self._starts: dict[str, int] = {}
        # nodes evicted from the cluster (node -> gseq): their streams are refused
        self.evicted: dict[str, int] = {}
        if (self.state / "evicted.json").exists():
            self.evicted = json.loads((self.state / "evicted.json").read_text())
        self.merger = Merger(self.applier.position)
        self.sources: dict[str, SourceState] = {}
        self.checkpoint_idle = checkpoint_idle
        self.checkpoint_interval = checkpoint_interval
        self.error: str | None = None  # applying stopped for good (needs an operator)
        self.stalled: str | None = None  # applying paused, retried (a full target disk)
        self._retry: list[Event] = []
        self.started = time.time()
        self.generation = generation_of(self.state / "generation", create=False)
        self._lock = threading.Lock()  # received/journal append order
        self._queue: queue.Queue[list[Event] | None] = queue.Queue()
        # journal index -> what decides if a restart needs the record (not the event itself:
        # that would keep every data payload in memory until the next checkpoint)
        self._index: deque[tuple[int, _Keep]] = deque()
        self._stop = threading.Event()
        self._idle = threading.Event()
        # the merger belongs to the apply thread; it publishes a snapshot for status readers
        self._merge_view: dict[str, Any] = {"pending": 0, "waiting_for": [], "consumed": {}}
        self._recover()
        self._publish()
        self._thread = threading.Thread(target=self._apply_loop, name="apply", daemon=True)

    # -- start-up ----------------------------------------------------------------------------

    def _recover(self) -> None:
        saved = self.state / "received.json"
        if saved.exists():
            for source, seq in json.loads(saved.read_text()).items():
                self.sources.setdefault(source, SourceState()).received = int(seq)
        count = 0
        start = self.journal.first_index
        while start < self.journal.next_index:
            records = self.journal.read(start, max_bytes=64 << 20)
            events = []
            for index, raw in records:
                ev = decode(raw)
                st = self.sources.setdefault(ev.source, SourceState())
                st.received = max(st.received, ev.seq)
                self._index.append((index, _keep(ev)))
                events.append(ev)
            self.merger.add(events)
            count += len(events)
            start = records[-1][0] + 1
        if count:
            log.info("recovered %d journaled events; resuming from checkpoint at gseq %d",
                     count, self.applier.position.gseq)
        self.sync.recover(self.applier.position.gseq)
        if self.sync.awaiting is not None:
            start = self._find_start()
            if start is not None:
                self._rebase(start)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(10)
        try:
            if self.error is None:
                self._checkpoint()
        finally:
            self.sync.close()
            if self.history is not None:
                with self.history.lock:
                    self.history.store.close()
            self.applier.target.close()
            self.journal.close()

    # -- receiving ---------------------------------------------------------------------------

    def next_seq(self, source: str) -> int:
        with self._lock:
            return self.sources.setdefault(source, SourceState()).received + 1

    def welcome(self, source: str, first: int, generation: str | None = None) -> dict[str, Any]:
        if source in self.evicted:
            raise BatchRefused(_evicted(source, self.evicted[source]), 0)
        self.check_generation(source, generation)
        return self._welcome(source, first)

    def check_generation(self, source: str, generation: str | None) -> None:
        """Refuse a stream of another cluster generation than the one this state replicates
        (the first coordinator to say hello sets it); a stream that does not say is taken."""
        if not isinstance(generation, str):
            return
        with self._lock:
            if self.generation is None and source == COORDINATOR:
                record_generation(self.state / "generation", generation)
                self.generation = generation
            mine = self.generation
        if mine is not None and generation != mine:
            raise BatchRefused(
                f"{source} belongs to cluster generation {generation}, but this replica's state "
                f"({self.state}) replicates generation {mine}: a failed-over or restored volume is "
                "another cluster. Give this replica a new --state for it (with --adopt-target to "
                "keep the files its target holds, moving only what differs)", 0)

    def _welcome(self, source: str, first: int) -> dict[str, Any]:
        """The answer to ``source``'s hello; ``first``: the oldest seq its journal still holds.

        A stream that starts after what this replica needs lost those events for good (they
        were trimmed once an earlier replica had them): this replica then needs a sync, and
        takes the stream from where it starts."""
        with self._lock:
            st = self.sources.setdefault(source, SourceState())
            need = None
            if first > st.received + 1 and not self._gap_ok(source, st):
                need = (f"{source}'s stream now starts at seq {first}, but this replica has only "
                        f"up to seq {st.received}: the events between were trimmed after a replica "
                        "held them (this replica's state was lost or is an older copy)")
            reply: dict[str, Any] = {"t": "welcome", "next": st.received + 1}
        if need is not None:
            self.sync.need(need)
        with self._lock:
            reply["gap_ok"] = self._gap_ok(source, st)
        reply.update(self.sync_request(source))
        return reply

    def sync_request(self, source: str) -> dict[str, Any]:
        """What to tell the coordinator with every answer: the sync this replica asks for."""
        if source == COORDINATOR and self.sync.awaiting is not None:
            return {"need_sync": {"request": self.sync.request, "reason": self.sync.awaiting}}
        return {}

    def _gap_ok(self, source: str, st: SourceState) -> bool:
        """May ``source``'s stream jump ahead? (Lock held.) Only while awaiting a sync (events
        before its mark are not needed), or for a node whose start this replica never saw since
        a sync re-started it."""
        if self.sync.awaiting is not None:
            return True
        return source in self.applier.position.floating and st.received == 0

    def report(self, source: str, captured: int, connected: bool = True,
               tls: bool | None = None, unsettled: int = 0) -> int:
        with self._lock:
            st = self.sources.setdefault(source, SourceState())
            st.captured = max(st.captured, captured)
            st.unsettled = unsettled
            st.reported_at = time.monotonic()
            st.connected = connected
            if tls is not None:
                st.tls = tls
            return st.received

    def receive(self, source: str, raw_events: list[Any], captured: int,
                on_received: Any = None, unsettled: int = 0) -> int:
        """Make a batch durable; return the source's highest durable seq. All or nothing.

        ``on_received(seq)`` is called once the batch is validated and appended, before the
        fsync (the sender's ``received`` acknowledgement level)."""
        if not isinstance(raw_events, list):
            raise BatchRefused("batch events must be a list", self.next_seq(source))
        if source in self.evicted:
            raise BatchRefused(_evicted(source, self.evicted[source]), self.next_seq(source))
        events: list[Event] = []
        size = 0
        history, marks = self.history, []
        for raw in raw_events:
            if not isinstance(raw, bytes):
                raise BatchRefused("every event must be bytes", self.next_seq(source))
            try:
                ev = decode(raw)
            except InvalidEvent as exc:
                raise BatchRefused(f"invalid event from {source}: {exc}", self.next_seq(source)) from None
            if ev.source != source:
                raise BatchRefused(f"{source} sent an event of source {ev.source!r}",
                                   self.next_seq(source))
            if source == COORDINATOR and not isinstance(ev, MetaEvent):
                raise BatchRefused("the coordinator sent a data event", self.next_seq(source))
            if history is not None and isinstance(ev, MetaEvent) and source == COORDINATOR:
                marks.append(ev.gseq)
            if type(ev) is Evict and ev.origin not in self.evicted:
                self._evict(ev)  # its stream is refused from now on, before this is acknowledged
            events.append(ev)
            size += len(raw)
        with self._lock:
            st = self.sources.setdefault(source, SourceState())
            fresh = [(ev, raw) for ev, raw in zip(events, raw_events, strict=True) if ev.seq > st.received]
            if fresh and fresh[0][0].seq > st.received + 1 and self._gap_ok(source, st):
                log.warning("the stream of %s resumes at seq %d (seq %d..%d are not needed: a "
                            "synchronisation replaces them)", source, fresh[0][0].seq,
                            st.received + 1, fresh[0][0].seq - 1)
                st.received = fresh[0][0].seq - 1
                self._starts[source] = fresh[0][0].seq
            expect = st.received + 1
            for ev, _ in fresh:
                if ev.seq != expect:
                    raise BatchRefused(f"gap in the stream of {source}: expected seq {expect}, "
                                       f"got {ev.seq}", st.received + 1)
                expect += 1
            if fresh:
                first = self.journal.append([raw for _, raw in fresh])
                now = time.monotonic()
                for i, (ev, _) in enumerate(fresh):
                    self._index.append((first + i, _keep(ev)))
                st.arrivals.append((fresh[-1][0].seq, now))
                if st.pending_since is None:
                    st.pending_since = now
        if on_received is not None:
            on_received(fresh[-1][0].seq if fresh else st.received)
        # fsync outside the lock so other sources' batches share the same fsync
        self.journal.sync()
        if marks and history is not None:
            history.note_received(marks, time.time())  # (the replica's clock: `clusterrep marks`)
        with self._lock:
            if fresh:
                st.received = max(st.received, fresh[-1][0].seq)
                st.bytes_received += size
                st.events_received += len(fresh)
                self._queue.put([ev for ev, _ in fresh])
                if source == COORDINATOR and self.sync.awaiting is not None and any(
                        isinstance(ev, SyncStart) and self.sync.answers(ev) for ev, _ in fresh):
                    self._queue.put([])  # wake the apply thread: it re-starts at that mark
                self._idle.clear()
            st.captured = max(st.captured, captured, st.received)
            st.unsettled = unsettled
            st.reported_at = time.monotonic()
            return st.received

    # -- applying ----------------------------------------------------------------------------

    def _apply_loop(self) -> None:
        last_checkpoint = time.monotonic()
        dirty = False
        try:
            self._drain_and_apply()
        except ClusterrepError as exc:
            self.error = str(exc)
            log.critical("replica stopped applying: %s", exc)
        if self.history is not None:
            self.history.ready = True  # (what a crash may have left half-applied is re-applied)
        while not self._stop.is_set():
            try:
                batch = self._queue.get(timeout=self.checkpoint_idle)
            except queue.Empty:
                batch = []
            if batch is None:
                break
            if not batch and self.history is not None:
                self.history.maintain()  # (retention moves with the clock, even on a quiet volume)
            if self.error is not None:
                continue  # keep receiving (journaled, durable), apply nothing until fixed
            try:
                if self.sync.awaiting is not None:
                    # apply nothing until the sync asked for starts: then re-start at its mark
                    start = next((ev for ev in batch if isinstance(ev, SyncStart)
                                  and ev.source == COORDINATOR and self.sync.answers(ev)), None)
                    if start is None:
                        self._publish()
                        continue
                    self._rebase(start)
                    batch = []
                    dirty = True
                if batch:
                    self.merger.add(batch)
                    more = True
                    while more:  # take whatever else is queued before applying
                        try:
                            nxt = self._queue.get_nowait()
                        except queue.Empty:
                            more = False
                        else:
                            if nxt is None:
                                self._stop.set()
                                more = False
                            else:
                                self.merger.add(nxt)
                applied = self._drain_and_apply()
                dirty = dirty or applied > 0
                now = time.monotonic()
                if dirty and self.stalled is None and (
                        not batch or now - last_checkpoint > self.checkpoint_interval):
                    try:
                        self._checkpoint()
                        last_checkpoint, dirty = now, False
                    except OSError as exc:
                        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise ApplyError(f"checkpoint failed: {exc}") from None
                        self.stalled = f"checkpoint: disk full: {exc}"
                if not batch and self._queue.empty():
                    self._idle.set()
            except ClusterrepError as exc:
                self.error = str(exc)
                log.critical("replica stopped applying: %s", exc)

    def _evict(self, ev: Evict) -> None:
        self.evicted[ev.origin] = ev.gseq
        atomic_write(self.state / "evicted.json", json.dumps(self.evicted).encode())
        log.warning("node %s was evicted at gseq %d: its stream is refused from now on", ev.origin,
                    ev.gseq)

    def _find_start(self) -> SyncStart | None:
        """The sync this replica awaits, if its start is journaled already (after a restart)."""
        start = self.journal.first_index
        while start < self.journal.next_index:
            records = self.journal.read(start, max_bytes=64 << 20)
            for _, raw in records:
                ev = decode(raw)
                if isinstance(ev, SyncStart) and ev.source == COORDINATOR and self.sync.answers(ev):
                    return ev
            start = records[-1][0] + 1
        return None

    def _rebase(self, start: SyncStart) -> None:
        """Re-start the merged order at the sync's mark S (apply thread): what is placed before
        S is passed without being applied (the sync's structure and blocks hold it); each node's
        stream is taken from where this replica has it."""
        old = self.applier.position
        with self._lock:
            received = {s: st.received for s, st in self.sources.items() if s != COORDINATOR}
            starts = dict(self._starts)
        # where each node's stream is journaled from: past a gap accepted while awaiting (also
        # one accepted before a restart, which `starts` no longer knows), the first seq after it
        journaled: dict[str, list[int]] = {}
        at = self.journal.first_index
        while at < self.journal.next_index:
            records = self.journal.read(at, max_bytes=64 << 20)
            for _, raw in records:
                ev = decode(raw)
                if ev.source != COORDINATOR:
                    journaled.setdefault(ev.source, []).append(ev.seq)
            at = records[-1][0] + 1
        cursors: dict[str, int] = {}
        for src, got in received.items():
            if src in starts:
                cursors[src] = starts[src]
            elif got > 0:
                cursors[src] = _resume_at(old.cursors.get(src, 1), sorted(set(journaled.get(src, ()))))
        members = set(start.members)
        pos = Position(gseq=start.gseq - 1, members=members, cursors=cursors, afters={},
                       applied=old.applied, floor=start.gseq,
                       floating={m for m in members if m not in cursors})
        self.applier.position = pos
        self.applier.replaying = False
        self.merger = Merger(pos)
        self._retry = []
        at = self.journal.first_index
        while at < self.journal.next_index:
            records = self.journal.read(at, max_bytes=64 << 20)
            self.merger.add(decode(raw) for _, raw in records)
            at = records[-1][0] + 1
        self._checkpoint()
        self.sync.started_at(start)  # (after the checkpoint: a restart now resumes from S)
        log.warning("re-starting the merged order at synchronisation %s (mark g%d): events placed "
                    "before it are not applied, the synchronisation holds their effect",
                    start.sync_id, start.gseq)

    def _drain_and_apply(self) -> int:
        out = self._retry + self.merger.drain()
        self._retry = []
        if out:
            try:
                self.applier.apply(out)  # events already applied are skipped by the position
            except ApplyError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self._stall(out, str(exc))
                return 0
        if self.stalled is not None:
            log.warning("the target has space again: applying resumes")
            self.stalled = None
        self._publish()
        return len(out)

    def _stall(self, events: list[Event], why: str) -> None:
        """The target's disk is full: keep the events, retry later; nothing is skipped."""
        self._retry = events
        if self.stalled is None:
            log.error("target disk full, applying paused (received events stay journaled and "
                      "acknowledged): %s", why)
        self.stalled = f"target disk full: {why}"
        self._publish()

    def _publish(self) -> None:
        with self._lock:
            names = list(self.sources)
        view = {
            "members": sorted(self.merger.position.members),
            "pending": self.merger.pending,
            "waiting_for": self.merger.waiting_for(),
            "consumed": {s: self.merger.consumed(s) for s in names},
            "gseq": self.merger.position.gseq,
        }
        with self._lock:
            self._merge_view = view

    def _checkpoint(self) -> None:
        """Checkpoint the applier, then forget and trim what the checkpoint covers."""
        self.applier.checkpoint()
        pos = self.applier.position
        with self._lock:
            while self._index and not _needed_after_restart(self._index[0][1], pos):
                self._index.popleft()
            upto = self._index[0][0] if self._index else self.journal.next_index
            received = {s: st.received for s, st in self.sources.items()}
            for source, st in self.sources.items():
                applied = self.applied_seq(source)
                while st.arrivals and st.arrivals[0][0] <= applied:
                    st.arrivals.popleft()
                st.pending_since = st.arrivals[0][1] if st.arrivals else None
        # what was received must survive the trim: a restart must not ask for it again
        atomic_write(self.state / "received.json", json.dumps(received).encode())
        self.journal.trim(upto)

    # -- status ------------------------------------------------------------------------------

    def applied_seq(self, source: str) -> int:
        """Highest seq of ``source`` the merge has consumed (applied, or a matched copy)."""
        view = self._merge_view
        if source == COORDINATOR:
            return int(view.get("gseq", 0))
        return int(view["consumed"].get(source, 0))

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            sources = {}
            for name, st in sorted(self.sources.items()):
                applied = self.applied_seq(name)
                sources[name] = {
                    "received": st.received,
                    "captured": st.captured,
                    "applied": applied,
                    "connected": st.connected,
                    "tls": st.tls,
                    "events_received": st.events_received,
                    "bytes_received": st.bytes_received,
                    "lag_events": max(0, st.captured - applied),
                    "lag_seconds": round(now - st.pending_since, 3)
                    if st.pending_since and applied < st.received else 0.0,
                    "report_age": round(now - st.reported_at, 3) if st.reported_at else None,
                    "unsettled": st.unsettled,
                }
            view = self._merge_view
        return {
            "gseq": self.applier.position.gseq,
            "members": view.get("members", []),
            "applied_events": self.applier.position.applied,
            "pending_events": view["pending"],
            "queued_batches": self._queue.qsize(),
            "waiting_for": view["waiting_for"],
            "journal_bytes": self.journal.bytes_total,
            "error": self.error,
            "stalled": self.stalled,
            "sync": self.sync.status(),
            "evicted": dict(self.evicted),
            "last_sync": self.sync.last,
            "history": None if self.history is None else self.history.status(),
            "idle": self._idle.is_set() and self._queue.empty(),
            "sources": sources,
        }


_Keep = tuple[int, str, int]  # (gseq of a metadata event or 0, source, seq)


def _keep(ev: Event) -> _Keep:
    return (ev.gseq if isinstance(ev, MetaEvent) else 0, ev.source, ev.seq)


def _needed_after_restart(keep: _Keep, pos: Position) -> bool:
    """Must the journal keep the event ``keep`` describes for a restart from ``pos``?

    A restarted merger reads each node's stream from the checkpoint's cursor, which only data
    events move: a node's metadata copy at or after it is needed even if its gseq is applied
    (the cursor must pass it). Unapplied metadata is needed whatever its position.
    """
    gseq, source, seq = keep
    if gseq and gseq > pos.gseq:
        return True
    if source == COORDINATOR:
        return False
    return seq >= pos.cursors.get(source, 1)


def _resume_at(cursor: int, seqs: list[int]) -> int:
    """Where a node's stream continues, given the cursor and the seqs journaled (sorted): from
    the start of their last unbroken run (a gap in the journal is one accepted while awaiting a
    sync: what came before it was recorded before the sync's mark), never below the cursor."""
    if not seqs or seqs[-1] < cursor:
        return cursor
    i = len(seqs) - 1
    while i > 0 and seqs[i - 1] + 1 == seqs[i]:
        i -= 1
    return max(seqs[i], cursor)


def _evicted(source: str, gseq: int) -> str:
    return (f"node {source} was evicted from the cluster at gseq {gseq}: its stream is refused "
            "(to bring the host back: stop it, remove its state directory and start it with a new --id)")


def _holds_files(target: str | Path) -> bool:
    try:
        with os.scandir(target) as it:
            return any(True for _ in it)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise ClusterrepError(f"target {target} is not a directory",
                              hint="--target names the directory that holds the replica") from None
