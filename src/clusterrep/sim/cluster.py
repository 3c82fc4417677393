"""The simulated cluster: hosts, a coordinator, write tokens, and the streams they record.

`Cluster` executes operations on an in-memory `Volume` in one real order and records what the
real system would record: the coordinator's copy of every metadata event, each host's copy of
its own metadata operations (possibly late and out of gseq order, as concurrent threads
produce them), its data events stamped ``after`` = the gseq it knows, and ticks.

It also keeps the causal history: a vector clock for every event (process 0 is the coordinator,
process i the i-th host), and the real execution order. From those, `consistent_cut` checks
that a set of applied events is closed under happens-before, and `cut_state` gives the volume
state such a cut stands for.

Rules the hosts follow, as the real node agent does:

* a host writes, truncates, unlinks or renames a file only while holding its write token; a
  change of holder is an `Acquire` (metadata, so a mark) issued after the old holder stopped;
* a host's per-file lock: it never records a data event on a path, or starts another operation
  on it, while its own copy of an operation on that path (or a parent) is still unrecorded;
* a directory rename recalls every token beneath it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..events import (
    Acquire,
    Create,
    DataEvent,
    Event,
    Join,
    MetaEvent,
    Rename,
    Tick,
    Truncate,
    Unlink,
    Write,
)
from ..replica.merger import COORDINATOR
from .volume import Volume

HOUR_NS = 3600 * 10**9
BASE_WALL = 1_790_000_000 * 10**9  # a fixed epoch so runs are reproducible

EventKey = tuple[Any, ...]  # ("g", gseq) or ("d", host, seq)

# Marks whose origin holds the file's write token: nobody else can be writing the file at that
# moment, so at such a mark the replica's copy of the file must be exactly the volume's.
EXACT_MARKS = (Acquire, Create, Truncate)


def related(a: str, b: str) -> bool:
    """True if the paths are equal or one lies beneath the other."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def event_key(ev: Event) -> EventKey:
    if isinstance(ev, MetaEvent):
        return ("g", ev.gseq)
    return ("d", ev.source, ev.seq)


@dataclass
class Host:
    name: str
    index: int
    skew_ns: int
    seq: int = 0
    known: int = 0
    vc: list[int] = field(default_factory=list)
    pending: list[MetaEvent] = field(default_factory=list)
    ops: int = 0


class Cluster:
    def __init__(self, hosts: list[str], skews_hours: dict[str, float] | None = None,
                 coordinator_skew_hours: float = 0.0) -> None:
        skews = skews_hours or {}
        n = len(hosts) + 1
        self.hosts = {
            h: Host(h, i + 1, int(skews.get(h, 0.0) * HOUR_NS), vc=[0] * n)
            for i, h in enumerate(hosts)
        }
        self.coord_skew = int(coordinator_skew_hours * HOUR_NS)
        self.coord_vc = [0] * n
        self.gseq = 0
        self.time = 0
        self.volume = Volume()
        self.tokens: dict[str, str] = {}
        self.streams: dict[str, list[Event]] = {COORDINATOR: []}
        self.streams.update({h: [] for h in hosts})
        self.order: list[EventKey] = []  # real execution order of everything that changes state
        self.events: dict[EventKey, Event] = {}
        self.vcs: dict[EventKey, tuple[int, ...]] = {}
        self.proc: dict[EventKey, tuple[int, int]] = {}  # key -> (process, index in process)
        self.host_keys: dict[str, list[EventKey]] = {h: [] for h in hosts}
        # for marks that need the file's write token: the file as it was when the mark executed
        self.mark_files: dict[int, tuple[str, tuple | None]] = {}

    # -- clocks ------------------------------------------------------------------------------

    def step(self, ns: int = 1_000_000) -> None:
        self.time += ns

    def wall(self, host: str | None) -> int:
        skew = self.coord_skew if host is None else self.hosts[host].skew_ns
        return BASE_WALL + self.time + skew

    # -- recording ---------------------------------------------------------------------------

    def _record(self, host: str, make: Any) -> Event:
        h = self.hosts[host]
        h.seq += 1
        ev = make(h.seq)
        self.streams[host].append(ev)
        return ev

    def _data(self, host: str, ev_factory: Any) -> DataEvent:
        h = self.hosts[host]
        ev = self._record(host, ev_factory)
        assert isinstance(ev, DataEvent)
        h.vc[h.index] += 1
        key = event_key(ev)
        self.events[key] = ev
        self.vcs[key] = tuple(h.vc)
        self.proc[key] = (h.index, h.vc[h.index])
        self.host_keys[host].append(key)
        self.order.append(key)
        return ev

    def _merge(self, into: list[int], other: list[int]) -> None:
        for i, v in enumerate(other):
            if v > into[i]:
                into[i] = v

    def meta(self, host: str, cls: type[MetaEvent], *, defer: bool = False, **fields: Any) -> MetaEvent:
        """Host asks the coordinator to run one operation; the coordinator executes and numbers it.

        With ``defer`` the host's own copy is recorded later (`record_pending`), as when another
        thread of the host records first.
        """
        h = self.hosts[host]
        for path in [v for k, v in fields.items() if k in ("path", "dst")]:
            self.flush(host, path)
        self._merge(self.coord_vc, h.vc)  # the request carries the host's history
        self.gseq += 1
        g = self.gseq
        self.coord_vc[0] = g
        h.ops += 1
        op_id = f"{host}-{h.ops}"
        copy = cls(source=COORDINATOR, seq=g, wall=self.wall(None), gseq=g, op_id=op_id,
                   origin=host, **fields)
        self.volume.apply(copy)
        if cls in EXACT_MARKS:
            self.mark_files[g] = (copy.path, self.volume.snapshot_of(copy.path))  # type: ignore[attr-defined]
        self.streams[COORDINATOR].append(copy)
        key = ("g", g)
        self.events[key] = copy
        self.vcs[key] = tuple(self.coord_vc)
        self.proc[key] = (0, g)
        self.order.append(key)
        # the reply: the host learns g (and the coordinator's history) now
        self._merge(h.vc, self.coord_vc)
        h.known = max(h.known, g)
        mine = cls(source=host, seq=1, wall=self.wall(host), gseq=g, op_id=op_id, origin=host,
                   **fields)
        if defer:
            h.pending.append(mine)
        else:
            self._record_copy(host, mine)
        return copy

    def _record_copy(self, host: str, template: MetaEvent) -> None:
        from dataclasses import replace

        self._record(host, lambda seq: replace(template, seq=seq, wall=self.wall(host)))

    def record_pending(self, host: str, which: int = 0) -> bool:
        h = self.hosts[host]
        if not h.pending:
            return False
        self._record_copy(host, h.pending.pop(which % len(h.pending)))
        return True

    def flush(self, host: str, path: str | None = None) -> None:
        """Record the host's pending copies (those related to ``path``, or all)."""
        h = self.hosts[host]
        keep = []
        for ev in h.pending:
            if path is None or any(related(p, path) for p in ev.paths()):
                self._record_copy(host, ev)
            else:
                keep.append(ev)
        h.pending = keep

    def tick(self, host: str) -> Tick:
        """The host hears the coordinator's current gseq and records a progress mark."""
        h = self.hosts[host]
        self._merge(h.vc, self.coord_vc)
        h.known = self.gseq
        ev = self._data(host, lambda seq: Tick(source=host, seq=seq, wall=self.wall(host),
                                               after=h.known))
        assert isinstance(ev, Tick)
        return ev

    # -- operations --------------------------------------------------------------------------

    def join(self, host: str) -> MetaEvent:
        return self.meta(host, Join)

    def acquire(self, host: str, path: str, *, defer: bool = False) -> None:
        """Make ``host`` the writer of ``path`` (recalling the token from its holder)."""
        holder = self.tokens.get(path)
        if holder == host:
            return
        if holder is not None:
            self.release(holder, path)
        self.meta(host, Acquire, path=path, defer=defer)
        self.tokens[path] = host

    def release(self, holder: str, path: str) -> None:
        """The holder stops writing ``path`` and tells the coordinator (a recall)."""
        self.flush(holder, path)
        self._merge(self.coord_vc, self.hosts[holder].vc)
        del self.tokens[path]

    def write(self, host: str, path: str, offset: int, data: bytes) -> Write:
        assert self.tokens.get(path) == host, f"{host} writes {path} without its token"
        self.flush(host, path)
        h = self.hosts[host]
        ev = self._data(host, lambda seq: Write(source=host, seq=seq, wall=self.wall(host),
                                                after=h.known, path=path, offset=offset,
                                                data=data))
        self.volume.apply(ev)
        assert isinstance(ev, Write)
        return ev

    def create(self, host: str, path: str, mode: int = 0o644, *, defer: bool = False) -> None:
        self.meta(host, Create, path=path, mode=mode, defer=defer)
        self.tokens[path] = host

    def truncate(self, host: str, path: str, size: int, *, defer: bool = False) -> None:
        self.acquire(host, path)
        self.meta(host, Truncate, path=path, size=size, defer=defer)

    def unlink(self, host: str, path: str, *, defer: bool = False) -> None:
        if self.volume.kind(path) == "f":
            self.acquire(host, path)
        self.meta(host, Unlink, path=path, defer=defer)
        self.tokens.pop(path, None)

    def rename(self, host: str, src: str, dst: str, *, defer: bool = False) -> None:
        if self.volume.kind(src) == "d":
            for path, holder in list(self.tokens.items()):
                if related(path, src) or related(path, dst):
                    self.release(holder, path)
        else:
            if self.volume.kind(src) == "f":
                self.acquire(host, src)
            if self.volume.kind(dst) == "f":
                self.acquire(host, dst)
        self.meta(host, Rename, path=src, dst=dst, defer=defer)
        if self.volume.kind(dst) == "f" and src in self.tokens:
            self.tokens[dst] = self.tokens.pop(src)
        else:
            self.tokens.pop(dst, None)

    def finish(self) -> None:
        """End of the run: every host records what is pending and shows the final gseq."""
        for host in self.hosts:
            self.flush(host)
        for host in self.hosts:
            self.tick(host)

    # -- causal checks -----------------------------------------------------------------------

    def consistent_cut(self, applied: set[EventKey]) -> str | None:
        """None if ``applied`` is closed under happens-before, else a description of a violation."""
        vec = [0] * len(self.coord_vc)
        for key in applied:
            proc, index = self.proc[key]
            vec[proc] = max(vec[proc], index)
        for g in range(1, vec[0] + 1):
            if ("g", g) not in applied:
                return f"metadata gseq {g} missing below gseq {vec[0]}"
        lasts: list[EventKey] = [("g", vec[0])] if vec[0] else []
        for host, keys in self.host_keys.items():
            count = vec[self.hosts[host].index]
            if any(k not in applied for k in keys[:count]):
                return f"host {host}: its applied events are not a prefix of its history"
            if count:
                lasts.append(keys[count - 1])
        # clocks grow along each process, so checking each process's last event suffices
        for key in lasts:
            for proc, need in enumerate(self.vcs[key]):
                if need > vec[proc]:
                    return (f"{key} is applied but depends on event {need} of process {proc}, "
                            f"which is not (the cut has {vec[proc]})")
        return None

    def cut_state(self, applied: set[EventKey]) -> Volume:
        """The volume after exactly the events in ``applied``, in the real order."""
        vol = Volume()
        for key in self.order:
            if key in applied:
                vol.apply(self.events[key])
        return vol
