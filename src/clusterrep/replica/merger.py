"""The merger: many event streams in, one clock-free total order out.

Inputs are the coordinator's stream (every metadata event, numbered by ``gseq``) and one stream
per node (its data events, each stamped ``after`` = the highest gseq the node knew, and the
node's own copies of the metadata operations it asked for). Pieces arrive late, duplicated,
retransmitted and interleaved in any way.

The order emitted is::

    [data with after=0] meta g1 [data with after=1] meta g2 [data with after=2] ...

* metadata events appear once each, in ``gseq`` order, from whichever copy arrived first (the
  node's copy and the coordinator's copy are matched by gseq and must agree: a *time mark*);
* a node's data events appear in that node's ``seq`` order, each right after the metadata event
  its ``after`` stamp names;
* metadata event ``g+1`` is emitted only once every member node has shown that it has nothing
  more to place before it (its stream has reached an ``after`` or a metadata copy >= g+1). Until
  then the merger waits and `waiting_for` says on what.

Clocks play no part. Node copies of metadata never hold a stream back (they only raise the
node's known gseq), so a node whose threads recorded copies out of gseq order cannot deadlock
the merge.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ConflictingCopies, InvalidEvent, StampViolation
from ..events import DataEvent, Event, Evict, Join, Leave, MetaEvent, describe
from .position import Position

COORDINATOR = "coordinator"


class Merger:
    def __init__(self, position: Position | None = None, *, coordinator: str = COORDINATOR):
        # gseq and members are kept current here; node cursors are in self._cursor
        self.position = position.copy() if position is not None else Position()
        self.coordinator = coordinator
        self._meta: dict[int, MetaEvent] = {}
        # per node: seq -> data event, or int gseq for a node's metadata copy
        self._buf: dict[str, dict[int, DataEvent | int]] = {}
        # per node: highest after/gseq seen in its stream, in seq order (a promise about the rest)
        self._known: dict[str, int] = dict(self.position.afters)
        self._cursor: dict[str, int] = dict(self.position.cursors)
        self._floating: set[str] = set(self.position.floating)
        # nodes whose eviction is received and not yet emitted: the merge waits for their
        # streams no more (they are dead: what they shipped is placed by its stamps, the rest is
        # put right from the volume after the eviction)
        self._evicting: set[str] = set()
        self.received = 0
        self.duplicates = 0

    # -- input -------------------------------------------------------------------------------

    def add(self, events: Iterable[Event]) -> None:
        """Take events from any source, in any order, duplicates included."""
        gseq_done = self.position.gseq
        meta = self._meta
        coordinator = self.coordinator
        for ev in events:
            self.received += 1
            src = ev.source
            if isinstance(ev, MetaEvent):
                g = ev.gseq
                if g > gseq_done:
                    old = meta.get(g)
                    if old is None:
                        meta[g] = ev
                        if type(ev) is Evict:
                            self._evicting.add(ev.origin)
                    elif old is not ev and old.payload() != ev.payload():
                        raise ConflictingCopies(
                            f"two different events claim gseq {g}: {describe(old)} / {describe(ev)}"
                        )
                elif src == coordinator:
                    self.duplicates += 1
                if src == coordinator:
                    continue
                item: DataEvent | int = g
            elif isinstance(ev, DataEvent):
                if src == coordinator:
                    raise InvalidEvent(f"the coordinator cannot record data events: {describe(ev)}")
                item = ev
            else:  # pragma: no cover - Event itself is abstract
                raise InvalidEvent(f"not a known event type: {ev!r}")
            if self._floating and src in self._floating:  # its stream starts here (trimmed before)
                self._floating.discard(src)
                self._cursor[src] = ev.seq
            if ev.seq < self._cursor.get(src, 1):
                self.duplicates += 1
                continue
            buf = self._buf.get(src)
            if buf is None:
                buf = self._buf[src] = {}
            old_item = buf.get(ev.seq)
            if old_item is None:
                buf[ev.seq] = item
                continue
            self.duplicates += 1
            if old_item is not item and old_item != item:
                raise ConflictingCopies(
                    f"two different events claim {src}#{ev.seq}; the second is {describe(ev)}"
                )

    # -- output ------------------------------------------------------------------------------

    def drain(self) -> list[Event]:
        """Return every event that can be emitted now, in merged order."""
        out: list[Event] = []
        pos = self.position
        meta = self._meta
        while True:
            g = pos.gseq
            for src, buf in self._buf.items():
                if buf:
                    self._advance(src, buf, g, out)
            nxt = meta.get(g + 1)
            if nxt is None:
                break
            known = self._known
            # (an evicted node's stream ends where it ends: the merge does not wait for it)
            evicting = self._evicting
            if any(known.get(n, 0) <= g for n in pos.members if n not in evicting):
                break
            gone = nxt.origin if type(nxt) is Evict else None
            del meta[g + 1]
            out.append(nxt)
            pos.advance(nxt)
            if isinstance(nxt, Join) and nxt.origin == self.coordinator:
                raise InvalidEvent("the coordinator cannot join as a node")
            if gone is not None:
                evicting.discard(gone)
                dropped = self._buf.pop(gone, None)
                if dropped:
                    self.duplicates += len(dropped)  # placed after its eviction: not applied
            if isinstance(nxt, Leave):
                early = [s for s, item in (self._buf.get(nxt.origin) or {}).items()
                         if type(item) is not int and item.after < nxt.gseq]
                if early:
                    raise StampViolation(
                        f"node {nxt.origin} left at gseq {nxt.gseq} but still has events placed "
                        f"before it: seq {sorted(early)[:5]}"
                    )
        return out

    def _advance(self, src: str, buf: dict[int, DataEvent | int], g: int, out: list[Event]) -> None:
        c = self._cursor.get(src, 1)
        m = self._known.get(src, 0)
        pos = self.position
        members = pos.members
        try:
            while True:
                item = buf.get(c)
                if item is None:
                    return
                if type(item) is int:
                    if item > m:
                        m = item
                    del buf[c]
                    c += 1
                    continue
                a = item.after
                if a < m:
                    raise StampViolation(
                        f"node {src} seq {c}: after={a} goes back below {m}, which the node "
                        "had already shown; its stamps must never decrease"
                    )
                m = a
                if a > g:
                    return
                if src not in members and a >= pos.floor:
                    raise StampViolation(f"node {src} recorded {describe(item)} while not a member "
                                         "(no Join before it, or after its Leave)")
                del buf[c]
                out.append(item)
                pos.applied += 1  # node cursors live in self._cursor while merging
                c += 1
        finally:
            self._cursor[src] = c
            self._known[src] = m

    # -- introspection -----------------------------------------------------------------------

    def consumed(self, node: str) -> int:
        """Highest seq of ``node``'s stream the merge has consumed (emitted or matched)."""
        return self._cursor.get(node, 1) - 1

    @property
    def pending(self) -> int:
        """Events received and not yet emitted."""
        return len(self._meta) + sum(
            1 for buf in self._buf.values() for item in buf.values() if type(item) is not int
        )

    def waiting_for(self) -> list[str]:
        """What the merge needs before it can go further, one readable line each.

        Empty when everything received has been emitted and nothing is known to be missing.
        """
        g = self.position.gseq
        nxt = self._meta.get(g + 1)
        if nxt is None:
            if self.pending:
                have = f" (have up to gseq {max(self._meta)})" if self._meta else ""
                return [f"gseq {g + 1}: not yet received from the coordinator or any node{have}"]
            return []
        reasons = []
        for node in sorted(self.position.members):
            if self._known.get(node, 0) > g or node in self._evicting:
                continue
            c = self._cursor.get(node, 1)
            buf = self._buf.get(node) or {}
            if buf:
                reasons.append(f"node {node}: seq {c} (gap: have seq {min(buf)}..{max(buf)})")
            else:
                reasons.append(f"node {node}: events after seq {c - 1}, to place them before "
                               f"gseq {g + 1} ({describe(nxt)})")
        return reasons
