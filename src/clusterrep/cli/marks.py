"""`clusterrep marks`: the restore points a replica keeps, and pinning them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..history.client import HistoryClient
from .common import add_auth, auth, gseq, peer_address


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "marks", help="list the restore points the replica keeps (and pin them)",
        description="List the restore points in the replica's history window, oldest first: "
                    "each is a mark of the merged order (a consistent cut over every file of the "
                    "volume) with its gseq, kind, paths, the node it came from, and when the "
                    "replica received it (the replica's clock, UTC). A mark is listed once "
                    "everything up to it is durable on the replica. Restore one with "
                    "`clusterrep restore --mark GSEQ`. Needs a replica started with --retain "
                    "or --retain-size.")
    p.add_argument("--replica", required=True, type=peer_address, metavar="HOST:PORT")
    add_auth(p)
    p.add_argument("--path", metavar="P", help="only marks that touched P (or something under it)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N marks (the oldest)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of objects (gseq, kind, paths, origin, received_at)")
    p.add_argument("--pin", type=gseq, metavar="GSEQ",
                   help="keep restore point GSEQ past the retention window (with --name)")
    p.add_argument("--name", metavar="NAME", help="the pin's name (restore it with --name NAME)")
    p.add_argument("--unpin", metavar="NAME", help="let the pinned restore point NAME go")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.pin is not None and not args.name:
        raise SystemExit("clusterrep marks: error: --pin needs --name NAME")
    if args.name and args.pin is None:
        raise SystemExit("clusterrep marks: error: --name goes with --pin GSEQ")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("clusterrep marks: error: --limit must be at least 1")
    with HistoryClient(args.replica, auth(args)) as client:
        if args.pin is not None:
            client.ask({"t": "pin", "gseq": args.pin, "name": args.name}, "ok")
            print(f"pinned g{args.pin} as {args.name!r}: it stays restorable until unpinned")
            return 0
        if args.unpin:
            gseq = client.ask({"t": "unpin", "name": args.unpin}, "ok")["gseq"]
            print(f"unpinned {args.unpin!r} (g{gseq}): the retention may prune it")
            return 0
        marks, history = client.marks(path=args.path, limit=args.limit)
    if args.json:
        json.dump(marks, sys.stdout, indent=1)
        print()
        return 0
    print(_header(history))
    for m in marks:
        pin = f"  [pinned: {m['pin']}]" if "pin" in m else ""
        print(f"g{m['gseq']:<10} {m['received_at']}  {m['kind']:<13} {m['origin']:<12} "
              f"{' -> '.join(m['paths'])}{pin}")
    return 0


def _header(h: dict[str, Any]) -> str:
    lines = []
    if not h.get("recording"):
        lines.append("history: not recording yet" + (" (a synchronisation is running)" if h.get("syncing")
                                                      else ""))
    else:
        lines.append(f"history: {h['restore_points']} restore points, g{h['oldest']} .. g{h['newest']}, "
                     f"{h['bytes'] / 2**20:.1f} MiB on disk")
    if h.get("alarm"):
        lines.append(f"ALARM: {h['alarm']}")
    return "\n".join(lines)
