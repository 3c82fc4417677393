"""The replica's position in the merged order: what has been emitted or applied so far.

A position is small and self-contained, so a checkpoint of it is enough to restart the merger
exactly where the applier stopped:

* ``gseq``: the last metadata event applied (every metadata event up to it is applied);
* ``cursors[node]``: every data event of ``node`` with ``seq < cursor`` is applied (a node's
  data events are applied in ``seq`` order, so this is a prefix);
* ``afters[node]``: the ``after`` stamp of that node's last applied data event;
* ``members``: nodes that have joined and not left, as of ``gseq``;
* ``floor``: a synchronisation re-started the replica at mark ``floor``: events placed before
  it (metadata with ``gseq < floor``, data with ``after < floor``) are passed without being
  applied, since the sync's structure and blocks already hold their effect;
* ``floating``: member nodes whose stream this replica has not seen since that re-start: the
  first event received from one is where its stream starts (what came before was trimmed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from ..events import DataEvent, Event, Evict, Join, Leave, MetaEvent

POSITION_VERSION = 1


@dataclass
class Position:
    gseq: int = 0
    members: set[str] = field(default_factory=set)
    cursors: dict[str, int] = field(default_factory=dict)
    afters: dict[str, int] = field(default_factory=dict)
    applied: int = 0
    floor: int = 0
    floating: set[str] = field(default_factory=set)

    def below_floor(self, event: Event) -> bool:
        """Is ``event`` placed before the mark a synchronisation re-started this replica at?"""
        if isinstance(event, DataEvent):
            return event.after < self.floor
        return isinstance(event, MetaEvent) and event.gseq < self.floor

    def advance(self, event: Event) -> None:
        """Move past ``event``, which must be the next event of the merged order."""
        if isinstance(event, MetaEvent):
            self.gseq = event.gseq
            if isinstance(event, Join):
                self.members.add(event.origin)
            elif isinstance(event, (Leave, Evict)):
                self.members.discard(event.origin)
        elif isinstance(event, DataEvent):
            self.cursors[event.source] = event.seq + 1
            self.afters[event.source] = event.after
            if self.floating:
                self.floating.discard(event.source)
        self.applied += 1

    def already_applied(self, event: Event) -> bool:
        """True when ``event`` lies at or before this position (a duplicate for the applier)."""
        if isinstance(event, MetaEvent):
            return event.gseq <= self.gseq
        return event.seq < self.cursors.get(event.source, 1)

    def copy(self) -> Position:
        return Position(self.gseq, set(self.members), dict(self.cursors), dict(self.afters),
                        self.applied, self.floor, set(self.floating))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": POSITION_VERSION,
            "gseq": self.gseq,
            "members": sorted(self.members),
            "cursors": dict(sorted(self.cursors.items())),
            "afters": dict(sorted(self.afters.items())),
            "applied": self.applied,
            "floor": self.floor,
            "floating": sorted(self.floating),
        }

    @classmethod
    def from_json(cls, data: Any) -> Position:
        try:
            if data.get("version") != POSITION_VERSION:
                raise CheckpointError(f"checkpoint version {data.get('version')!r} is not "
                                      f"{POSITION_VERSION}")
            pos = cls(
                gseq=int(data["gseq"]),
                members={str(m) for m in data["members"]},
                cursors={str(k): int(v) for k, v in data["cursors"].items()},
                afters={str(k): int(v) for k, v in data["afters"].items()},
                applied=int(data["applied"]),
                floor=int(data.get("floor", 0)),
                floating={str(m) for m in data.get("floating", ())},
            )
        except CheckpointError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint is malformed: {exc!r}") from None
        return pos

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes) -> Position:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint is not valid JSON: {exc}") from None
        return cls.from_json(data)
