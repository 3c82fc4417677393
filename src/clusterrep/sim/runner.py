"""Drive the real merger and applier with a simulated cluster, and check the result.

`run` generates a workload, delivers its streams as a bad network would, feeds the real
`Merger` and `Applier` (into a real target directory), optionally crashes the replica and
restarts it from its checkpoint, and checks:

* at every metadata event applied (a mark), that the applied set is a consistent cut of the
  happens-before order and that the target on disk equals the volume that cut stands for; and
  at a mark whose origin held the file's write token (acquire, create, truncate), that the file
  is exactly as it was on the volume when the mark executed;
* at the end, that the merger has nothing left and the target equals the volume byte for byte.

With ``history=True`` the applier also keeps a history (`clusterrep.history`), pruned at random
points; `run` restores random marks of its window into fresh directories, during the run and at
the end, and checks each equals the volume at that mark (the target's state checked there).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SimulatedCrash
from ..events import Event, MetaEvent, Write
from ..history.recorder import Recorder
from ..history.restore import write_tree
from ..history.store import Store
from ..history.view import MarkView
from ..replica.applier import Applier
from ..replica.merger import Merger
from .cluster import Cluster, EventKey, event_key
from .delivery import deliver
from .volume import diff, read_tree
from .workload import SimConfig, generate


class SimFailure(AssertionError):
    """The replica did not match the simulated volume."""


@dataclass
class RunReport:
    config: SimConfig
    hosts: int
    events: int
    delivered: int
    write_bytes: int
    metadata: int
    marks_checked: int = 0
    crashes: int = 0
    duplicates: int = 0
    order: list[EventKey] = field(default_factory=list)
    seconds: float = 0.0
    identical: bool = False
    restores_checked: int = 0
    prunes: int = 0

    def summary(self) -> str:
        c = self.config
        return (
            f"simulated {self.hosts} hosts, {c.vms} VMs, {c.steps} steps (seed {c.seed}, clocks "
            f"skewed up to {c.max_skew_hours:g} h)\n"
            f"  events recorded   {self.events} ({self.metadata} metadata, "
            f"{self.write_bytes} bytes written)\n"
            f"  events delivered  {self.delivered} (duplicates and retransmits dropped: "
            f"{self.duplicates})\n"
            f"  marks checked     {self.marks_checked} consistent cuts\n"
            f"  replica crashes   {self.crashes} (restarted from checkpoint)\n"
            f"  replica           {'IDENTICAL to the volume' if self.identical else 'DIFFERENT'}"
            f" ({self.seconds:.2f} s)"
        )


class _Replica:
    """A merger and an applier that can crash and restart from the checkpoint."""

    def __init__(self, target: Path, state: Path, crash_rate: float, rng: random.Random,
                 history: bool = False) -> None:
        self.target, self.state = target, state
        self.history = history
        self.recorder: Recorder | None = None
        self.crash_rate, self.rng = crash_rate, rng
        self.received: list[list[Event]] = []
        self.crashes = 0
        self.duplicates = 0
        self.start()

    def _fault(self, ev: Event) -> None:
        if self.crash_rate and self.rng.random() < self.crash_rate:
            raise SimulatedCrash(f"crash before {ev.source}#{ev.seq}")

    def start(self) -> None:
        self.applier = Applier(self.target, self.state, checkpoint_every=self.rng.randint(1, 40),
                               fault=self._fault)
        if self.history:
            self.recorder = Recorder(Store(self.state / "history"), self.applier.target)
            self.recorder.ready = True
            self.applier.history = self.recorder
        self.merger = Merger(self.applier.position)
        for chunk in self.received:  # the journal: everything received so far
            self.merger.add(chunk)
        self._refeed_duplicates = self.merger.duplicates  # not the network's doing

    @property
    def network_duplicates(self) -> int:
        return self.duplicates + self.merger.duplicates - self._refeed_duplicates

    def crash(self) -> None:
        self.crashes += 1
        self.duplicates = self.network_duplicates
        self.applier.target.close()  # no checkpoint: the process died
        if self.recorder is not None:
            self.recorder.store.close()  # (what was not committed is lost)
        self.start()


def run(cfg: SimConfig, workdir: str | Path, *, check_marks: bool = True,
        cluster: Cluster | None = None, history: bool = False) -> RunReport:
    started = time.perf_counter()
    cluster = cluster or generate(cfg)
    rng = random.Random(cfg.seed * 7919 + 1)
    chunks = deliver(cluster.streams, rng, max_chunk=cfg.max_chunk,
                     duplicate_rate=cfg.duplicate_rate, retransmit_rate=cfg.retransmit_rate,
                     reorder_within_stream=cfg.reorder_within_stream)
    workdir = Path(workdir)
    target, state = workdir / "target", workdir / "state"
    for d in (target, state):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    replica = _Replica(target, state, cfg.crash_rate, random.Random(cfg.seed * 31 + 7), history)
    states: dict[int, dict] = {}  # mark -> the target's tree right after it (checked against the cut)
    all_events = [ev for evs in cluster.streams.values() for ev in evs]
    report = RunReport(
        config=cfg, hosts=len(cluster.hosts), events=len(all_events),
        delivered=sum(len(c) for c in chunks),
        write_bytes=sum(len(ev.data) for ev in all_events if isinstance(ev, Write)),
        metadata=len(cluster.streams["coordinator"]),
    )
    applied: set[EventKey] = set()
    high_water = 0  # applied count reached before the last crash: marks below it are replays

    def drain() -> None:
        nonlocal high_water
        while True:
            try:
                for ev in replica.merger.drain():
                    replica.applier.apply([ev])
                    key = event_key(ev)
                    if key not in applied:
                        applied.add(key)
                        report.order.append(key)
                    done = replica.applier.position.applied
                    if check_marks and isinstance(ev, MetaEvent) and done > high_water:
                        states[ev.gseq] = _check_mark(cluster, applied, target, ev)
                        report.marks_checked += 1
                if history and rng.random() < 0.2:
                    _history_step(replica, states, rng, workdir, report)
                return
            except SimulatedCrash:
                high_water = max(high_water, replica.applier.position.applied)
                replica.crash()

    for chunk in chunks:
        replica.received.append(chunk)
        replica.merger.add(chunk)
        if rng.random() < cfg.drain_rate:
            drain()
    drain()
    merger = replica.merger
    if merger.pending or merger.waiting_for():
        raise SimFailure(f"merge did not finish: {merger.pending} events pending; waiting for "
                         f"{merger.waiting_for()}")
    replica.applier.close()
    if history:
        for _ in range(4):
            _history_step(replica, states, rng, workdir, report, prune=False)
        assert replica.recorder is not None
        replica.recorder.store.close()
    report.duplicates = replica.network_duplicates
    report.crashes = replica.crashes
    expected, actual = cluster.volume.snapshot(), read_tree(target)
    if expected != actual:
        raise SimFailure("replica differs from the volume:\n  " + "\n  ".join(diff(expected, actual)))
    report.identical = True
    report.seconds = time.perf_counter() - started
    return report


def _history_step(replica: _Replica, states: dict[int, dict], rng: random.Random, workdir: Path,
                  report: RunReport, *, prune: bool = True) -> None:
    """Maybe prune the history, then restore a random listed mark and compare it with the
    target's state recorded at that mark."""
    rec = replica.recorder
    assert rec is not None
    if not rec.active:
        return
    with rec.lock:
        low, high = max(rec.window, rec.base or 0), rec.durable
    marks = sorted(g for g in states if low <= g <= high)
    if not marks:
        return
    if prune and rng.random() < 0.3:
        with rec.lock:
            rec._prune(rng.choice(marks))  # as the retention would
        report.prunes += 1
        marks = [g for g in marks if g >= rec.window]
    gseq = rng.choice(marks)
    view = MarkView(rec, gseq)
    dest = workdir / f"restore-{report.restores_checked}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    write_tree(dest, view.entries(), lambda e: view.blocks(e.inode[1]))
    got = read_tree(dest)
    shutil.rmtree(dest)
    if got != states[gseq]:
        raise SimFailure(f"restore at mark g{gseq} is not the volume at that mark:\n  "
                         + "\n  ".join(diff(states[gseq], got)))
    report.restores_checked += 1


def _check_mark(cluster: Cluster, applied: set[EventKey], target: Path, mark: MetaEvent) -> dict:
    problem = cluster.consistent_cut(applied)
    if problem:
        raise SimFailure(f"at mark gseq {mark.gseq}: not a consistent cut: {problem}")
    expected = cluster.cut_state(applied).snapshot()
    actual = read_tree(target)
    exact = cluster.mark_files.get(mark.gseq)
    if exact is not None and actual.get(exact[0]) != exact[1]:
        raise SimFailure(f"at mark gseq {mark.gseq} ({type(mark).__name__}): {exact[0]!r} is not "
                         "exactly as it was on the volume when the mark executed")
    if expected != actual:
        raise SimFailure(f"at mark gseq {mark.gseq} ({type(mark).__name__}): target is not the "
                         "state of its cut:\n  " + "\n  ".join(diff(expected, actual)))
    return actual
