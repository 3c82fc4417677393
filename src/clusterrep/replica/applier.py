"""The applier: merged events in, target directory and checkpoint out.

Exactly-once apply rests on two facts:

1. The checkpoint holds a `Position`; events at or before it are skipped, so a restart resumes
   where the last checkpoint stopped. It is written only after the target is synced (syncfs),
   by `atomic_write` (temp, fsync, rename, fsync dir).
2. Between two checkpoints the events form a *replay-safe batch*: re-applying the whole batch on
   top of a tree that already holds any prefix of it gives the same tree. Per operation:

   * ``Write`` (pwrite of fixed bytes at a fixed offset), ``Truncate`` (set a size) and
     ``SetAttr`` (set mode/times): the last operation touching a byte, the size or an attribute
     decides the result, and a replay repeats that same last operation; what no operation in the
     batch touches is as it was at the checkpoint.
   * ``Create`` opens with ``O_TRUNC``: a file created and then written in the batch is emptied
     and written again. ``Mkdir`` accepts an existing directory. ``Symlink`` replaces an existing
     link with the same name. These never remove a name, so a batch's path-to-file mapping only
     grows and every replayed operation finds the file it found the first time.
   * ``Fallocate``, ``Stamp``, ``SetXattr`` and the ``attrs`` every metadata event carries set
     a state (a range's content and the size, a time, an attribute), so the same holds.
   * ``Link`` and ``Mknod`` add a name; replayed, they find it there (as the same inode, or
     replace it).
   * ``Unlink``, ``Rmdir``, ``Rename`` and ``Exchange`` remove or move a name, so they are
     *barriers*: the applier checkpoints just before and just after each. Replayed alone, each
     detects it already ran (the name is gone; the rename's source is gone and its destination
     exists; the exchange's source is no longer the inode noted just before it ran) and does
     nothing. ``RemoveXattr`` of an attribute already gone does nothing while replaying.
   * ``Open``, ``Close``, ``Acquire``, ``Lock``, ``Join``, ``Leave``, ``Tick`` change nothing on disk.

Outside the replay window (from start-up to the first barrier, the furthest a crash can have
got past the checkpoint), a missing or unexpected name is not
excused: it means the target diverged from the volume and the applier stops with `ApplyError`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from ..confined import Target
from ..durable import atomic_write
from ..errors import ApplyError, CheckpointError
from ..events import (
    Create,
    DataEvent,
    Event,
    Exchange,
    Fallocate,
    Link,
    MetaEvent,
    Mkdir,
    Mknod,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Stamp,
    Symlink,
    SyncBlocks,
    SyncEnd,
    SyncEntries,
    SyncStart,
    Truncate,
    Unlink,
    Write,
    describe,
)
from ..history.recorder import HISTORY_FAULTS, Recorder
from .position import Position

log = logging.getLogger("clusterrep.replica")
CHECKPOINT = "checkpoint.json"
EXCHANGE_NOTE = "exchange.json"  # the exchange about to run: gseq and its source's inode
_BARRIERS = (Unlink, Rmdir, Rename, Exchange, SyncStart, SyncEnd)
_SYNC = (SyncStart, SyncEntries, SyncBlocks, SyncEnd)


class SyncHandler(Protocol):
    """What applies a synchronisation's events (`clusterrep.replica.sync.ReplicaSync`)."""

    def apply(self, ev: MetaEvent, replaying: bool) -> None: ...
    def flush(self) -> None: ...


class Applier:
    """Applies merged events to ``target`` and checkpoints into ``state_dir``.

    ``checkpoint_every`` (events) and ``checkpoint_bytes`` (written) bound how much may need
    replay after a crash; each checkpoint syncs the target file system, so checkpointing too
    often stalls writes behind writeback. The service also checkpoints when idle. ``fault`` is a
    test hook called with each event before it is applied (it may raise to simulate a crash).
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        state_dir: str | os.PathLike[str],
        *,
        checkpoint_every: int = 250_000,
        checkpoint_bytes: int = 1 << 30,
        fault: Callable[[Event], None] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.target = Target(target)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_bytes = checkpoint_bytes
        self._bytes = 0
        self.fault = fault
        self.checkpoint_path = self.state_dir / CHECKPOINT
        self.position, self.replaying = self._load()
        self._since = 0
        self.skipped = 0
        self.checkpoints = 0
        self.emulated = 0  # fallocate modes the target's file system refused, done by hand
        self.sync: SyncHandler | None = None  # applies SyncStart/SyncEntries/SyncBlocks/SyncEnd
        self.history: Recorder | None = None  # keeps restore points (`clusterrep.history`)
        self._staged: list[DataEvent] = []

    def _load(self) -> tuple[Position, bool]:
        try:
            raw = self.checkpoint_path.read_bytes()
        except FileNotFoundError:
            # no checkpoint yet: a crash may still have left part of the first batch applied
            return Position(), True
        pos = Position.loads(raw)
        marker = self.state_dir / "target"
        if marker.exists() and marker.read_text() != os.path.realpath(self.target.root):
            raise CheckpointError(
                f"state directory {self.state_dir} belongs to target {marker.read_text()!r}, "
                f"not {os.path.realpath(self.target.root)!r}"
            )
        return pos, True

    def target_replaced(self) -> str | None:
        """Why the target is not the directory this state was applied to (None: it is, or no
        state was applied yet)."""
        try:
            saved = (self.state_dir / "target-id").read_text()
        except FileNotFoundError:
            return None
        st = os.fstat(self.target.root_fd)
        now = f"{st.st_dev}:{st.st_ino}"
        if saved == now:
            return None
        return (f"the target {self.target.root} is another directory than the one this replica's "
                f"state was applied to (device:inode {saved}, now {now}): it was replaced")

    # -- applying ----------------------------------------------------------------------------

    def apply(self, events: Iterable[Event]) -> None:
        if self.history is not None:
            self._apply_recorded(events, self.history)
            return
        position = self.position
        cursors, afters = position.cursors, position.afters
        write = self.target.write
        # (only until the merged order has passed the mark: nothing placed before it comes
        # after it, so the apply loop checks nothing once a sync's re-start is behind it)
        floor = position.floor if position.floor > position.gseq else 0
        for ev in events:
            if floor and position.below_floor(ev):
                position.advance(ev)  # a synchronisation since holds its effect
                self.skipped += 1
                continue
            if type(ev) is Write and self.fault is None:
                # fast path for the bulk of the traffic; same steps as below
                src = ev.source
                if ev.seq < cursors.get(src, 1):
                    self.skipped += 1
                    continue
                try:
                    write(ev.path, ev.offset, ev.data)
                except OSError as exc:
                    raise ApplyError(f"applying {describe(ev)} failed: {exc}",
                                     errno=exc.errno or 5) from None
                cursors[src] = ev.seq + 1
                afters[src] = ev.after
                position.applied += 1
                self._since += 1
                self._bytes += len(ev.data)
                if self._since >= self.checkpoint_every or self._bytes >= self.checkpoint_bytes:
                    self.checkpoint()
                continue
            if position.already_applied(ev):
                self.skipped += 1
                continue
            barrier = isinstance(ev, _BARRIERS) or (type(ev) is SyncEntries and ev.final)
            if barrier and self._since:
                self.checkpoint()
            if self.fault is not None:
                self.fault(ev)
            self._apply_checked(ev)
            position.advance(ev)
            self._since += 1
            if barrier or self._since >= self.checkpoint_every:
                self.checkpoint()
            if barrier:
                # a crash can only have applied events up to the first barrier after the
                # checkpoint we started from: from here on, nothing is a replay
                self.replaying = False

    def _apply_recorded(self, events: Iterable[Event], history: Recorder) -> None:
        """`apply` while keeping history: data events go in staged groups whose undo is made
        durable before any of them touches the target; metadata events one at a time, between
        what the history keeps before and records after them (`clusterrep.history.recorder`)."""
        position = self.position
        try:
            for ev in events:
                if position.floor > position.gseq and position.below_floor(ev):
                    position.advance(ev)
                    self.skipped += 1
                    continue
                if position.already_applied(ev):
                    self.skipped += 1
                    continue
                if isinstance(ev, DataEvent):
                    if not self._stage(ev, history):
                        self._apply_staged(history)
                        self._stage(ev, history)
                    self._staged.append(ev)
                    continue
                self._apply_staged(history)
                self._apply_meta(ev, history)
        finally:
            self._apply_staged(history)

    def _stage(self, ev: DataEvent, history: Recorder) -> bool:
        if not history.active:
            return True
        try:
            return history.stage(ev, self.replaying)
        except HISTORY_FAULTS as exc:
            history.broken(exc)
            return True

    def _apply_staged(self, history: Recorder) -> None:
        staged, self._staged = self._staged, []
        if not staged:
            return
        position = self.position
        with history.lock:
            if history.active:
                try:
                    history.commit_staged(position)
                except HISTORY_FAULTS as exc:
                    history.broken(exc)
            for ev in staged:
                if self.fault is not None:
                    self.fault(ev)
                self._apply_checked(ev)
                position.advance(ev)
                if history.active:
                    try:
                        history.after_data(ev, position)
                    except HISTORY_FAULTS as exc:
                        history.broken(exc)
                self._since += 1
                if type(ev) is Write:
                    self._bytes += len(ev.data)
            if self._since >= self.checkpoint_every or self._bytes >= self.checkpoint_bytes:
                self.checkpoint()

    def _apply_meta(self, ev: Event, history: Recorder) -> None:
        assert isinstance(ev, MetaEvent)
        position = self.position
        barrier = isinstance(ev, _BARRIERS) or (type(ev) is SyncEntries and ev.final)
        if barrier and self._since:
            self.checkpoint()
        if self.fault is not None:
            self.fault(ev)
        with history.lock:
            try:
                history.before_meta(ev, position, self.replaying)
            except HISTORY_FAULTS as exc:
                history.broken(exc)
            self._apply_checked(ev)
            position.advance(ev)
            try:
                history.after_meta(ev, position, self.replaying)
            except HISTORY_FAULTS as exc:
                history.broken(exc)
        self._since += 1
        if barrier or self._since >= self.checkpoint_every:
            self.checkpoint()
        if barrier:
            self.replaying = False

    def _apply_checked(self, ev: Event) -> None:
        """`_apply_one`, a failure of the target raised as `ApplyError` naming the event."""
        try:
            self._apply_one(ev)
        except OSError as exc:
            raise ApplyError(f"applying {describe(ev)} failed: {exc}", errno=exc.errno or 5) from None

    def _apply_one(self, ev: Event) -> None:
        t = self.target
        cls = type(ev)
        if cls is Write:
            t.write(ev.path, ev.offset, ev.data)  # type: ignore[attr-defined]
        elif cls is Truncate:
            t.truncate(ev.path, ev.size)  # type: ignore[attr-defined]
        elif cls is Create:
            t.create(ev.path, ev.mode, exist_ok=self.replaying)  # type: ignore[attr-defined]
        elif cls is Mkdir:
            t.mkdir(ev.path, ev.mode, exist_ok=self.replaying)  # type: ignore[attr-defined]
        elif cls is SetAttr:
            t.setattr(ev.path, ev.mode, ev.atime_ns, ev.mtime_ns,  # type: ignore[attr-defined]
                      ev.uid, ev.gid)  # type: ignore[attr-defined]
        elif cls is Symlink:
            t.symlink(ev.path, ev.target, replace=self.replaying)  # type: ignore[attr-defined]
        elif cls is Unlink:
            t.unlink(ev.path, missing_ok=self.replaying)  # type: ignore[attr-defined]
        elif cls is Rmdir:
            t.rmdir(ev.path, missing_ok=self.replaying)  # type: ignore[attr-defined]
        elif cls is Rename:
            self._rename(ev)  # type: ignore[arg-type]
        elif cls is Exchange:
            self._exchange(ev)  # type: ignore[arg-type]
        elif cls is Link:
            t.link(ev.path, ev.dst, replace=self.replaying)  # type: ignore[attr-defined]
        elif cls is Mknod:
            t.mknod(ev.path, ev.mode, ev.rdev, replace=self.replaying)  # type: ignore[attr-defined]
        elif cls is SetXattr:
            t.setxattr(ev.path, ev.name, ev.value)  # type: ignore[attr-defined]
        elif cls is RemoveXattr:
            t.removexattr(ev.path, ev.name, missing_ok=self.replaying)  # type: ignore[attr-defined]
        elif cls is Fallocate:
            if not t.fallocate(ev.path, ev.mode, ev.offset, ev.length):  # type: ignore[attr-defined]
                if not self.emulated:
                    log.warning("the target's file system refuses fallocate mode %#x: its "
                                "effect is written by hand (zeros; the replica may use more "
                                "space than the volume)", ev.mode)  # type: ignore[attr-defined]
                self.emulated += 1
        elif cls is Stamp:
            t.stamp(ev.path, ev.mtime_ns)  # type: ignore[attr-defined]
        elif cls in _SYNC:
            if self.sync is None:
                raise ApplyError(f"{describe(ev)}: this applier cannot apply a synchronisation")
            self.sync.apply(ev, self.replaying)  # type: ignore[arg-type]
        # Open, Close, Acquire, Lock, Join, Leave, Tick: marks only
        if isinstance(ev, MetaEvent):
            for attr in getattr(ev, "attrs", ()):
                t.apply_attr(attr)

    def _rename(self, ev: Rename) -> None:
        t = self.target
        if self.replaying and not t.exists(ev.path) and t.exists(ev.dst):
            return  # this rename ran before the crash; its checkpoint did not
        t.rename(ev.path, ev.dst)

    def _exchange(self, ev: Exchange) -> None:
        """Swap two names. Both exist before and after, so whether it already ran is told by
        a note written (durably) just before it: the inode that was at ``ev.path``."""
        t = self.target
        note = self.state_dir / EXCHANGE_NOTE
        ino = t.lstat(ev.path).st_ino
        if self.replaying:
            try:
                seen = json.loads(note.read_text())
            except (FileNotFoundError, ValueError):
                seen = None
            if seen is not None and seen.get("gseq") == ev.gseq and seen.get("ino") != ino:
                return  # it ran before the crash: the source is another inode now
        atomic_write(note, json.dumps({"gseq": ev.gseq, "ino": ino}).encode())
        t.exchange(ev.path, ev.dst)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Make the target durable, then record the position durably."""
        if self.sync is not None:
            self.sync.flush()
        self.target.sync()
        if self.history is not None:
            with self.history.lock:
                try:
                    self.history.checkpoint(self.position)
                except HISTORY_FAULTS as exc:
                    self.history.broken(exc)
        marker = self.state_dir / "target"
        if not marker.exists():
            atomic_write(marker, os.path.realpath(self.target.root).encode())
        ident = self.state_dir / "target-id"
        st = os.fstat(self.target.root_fd)
        if not ident.exists() or ident.read_text() != f"{st.st_dev}:{st.st_ino}":
            atomic_write(ident, f"{st.st_dev}:{st.st_ino}".encode())
        atomic_write(self.checkpoint_path, self.position.dumps())
        self._since = 0
        self._bytes = 0
        self.checkpoints += 1

    def close(self) -> None:
        """Checkpoint what was applied and release the target."""
        if self._since:
            self.checkpoint()
        self.target.close()


def load_position(state_dir: str | os.PathLike[str]) -> Position:
    """The position recorded in ``state_dir`` (a fresh one if there is no checkpoint)."""
    path = Path(state_dir) / CHECKPOINT
    try:
        return Position.loads(path.read_bytes())
    except FileNotFoundError:
        return Position()
    except OSError as exc:
        raise ApplyError(f"cannot read checkpoint {path}: {exc}") from None
