"""`clusterrep status` and `clusterrep wait`: what the replica has, and waiting until it has all."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from .. import wire
from ..errors import ClusterrepError
from .common import add_token, token


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="show what the replica received and applied, per source",
                       description="Per source (each node and the coordinator): events captured, "
                                   "received, applied, and the lag in events, bytes and seconds; "
                                   "what the merge is waiting for; errors.")
    p.add_argument("--replica", required=True, metavar="HOST:PORT")
    add_token(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=status_main)

    w = sub.add_parser("wait", help="wait until the replica has applied everything captured",
                       description="Exit 0 once every source has shipped all it captured and the "
                                   "replica has applied it; exit 1 on timeout, saying what is "
                                   "pending.")
    w.add_argument("--replica", required=True, metavar="HOST:PORT")
    add_token(w)
    w.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up after this long (default 60)")
    w.add_argument("--quiet", action="store_true", help="print nothing on success")
    w.set_defaults(func=wait_main)


def fetch_status(replica: str, secret: bytes) -> dict[str, Any]:
    conn = wire.connect(replica, secret, name=f"cli-{os.getpid()}", role="client")
    try:
        conn.send({"t": "status"})
        reply = conn.recv(timeout=30)
    finally:
        conn.close()
    if not isinstance(reply, dict) or reply.get("t") != "status":
        raise ClusterrepError(f"unexpected answer from the replica: {reply!r:.200}")
    return reply["status"]


def format_status(st: dict[str, Any]) -> str:
    lines = [f"replica: gseq {st['gseq']}, members {', '.join(st['members']) or '-'}, "
             f"{st['applied_events']} events applied, {st['pending_events']} pending, "
             f"journal {st['journal_bytes'] / 2**20:.1f} MiB"]
    if st.get("error"):
        lines.append(f"ERROR: applying stopped: {st['error']}")
    head = f"{'source':14} {'link':5} {'captured':>9} {'received':>9} {'applied':>9} " \
           f"{'lag ev':>7} {'lag s':>6} {'MiB in':>8}"
    lines.append(head)
    for name, s in st["sources"].items():
        lines.append(f"{name:14} {'up' if s['connected'] else 'down':5} {s['captured']:>9} "
                     f"{s['received']:>9} {s['applied']:>9} {s['lag_events']:>7} "
                     f"{s['lag_seconds']:>6.1f} {s['bytes_received'] / 2**20:>8.1f}")
    for reason in st.get("waiting_for") or []:
        lines.append(f"waiting for: {reason}")
    return "\n".join(lines)


def status_main(args: argparse.Namespace) -> int:
    st = fetch_status(args.replica, token(args))
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0 if not st.get("error") else 1


def pending(st: dict[str, Any], since: float) -> list[str]:
    """Why the replica is not caught up (empty when it is). ``since``: seconds waited so far."""
    out: list[str] = []
    if st.get("error"):
        out.append(f"applying stopped: {st['error']}")
    for name, s in st["sources"].items():
        if s["applied"] < s["captured"]:
            out.append(f"{name}: applied up to seq {s['applied']} of {s['captured']} captured "
                       f"({s['received']} received)")
        elif s["connected"] and (s["report_age"] is None or s["report_age"] > since):
            out.append(f"{name}: no report from it since the wait began")
    if st["pending_events"] or st["queued_batches"]:
        out.append(f"{st['pending_events']} events received but not yet applied")
    out.extend(f"merge waits for {w}" for w in st.get("waiting_for") or [])
    return out


def wait_for(replica: str, secret: bytes, timeout: float) -> tuple[bool, list[str], dict[str, Any]]:
    start = time.monotonic()
    time.sleep(0.3)  # let every source report at least once after we started
    while True:
        st = fetch_status(replica, secret)
        why = pending(st, time.monotonic() - start)
        if not why:
            return True, [], st
        if time.monotonic() - start > timeout:
            return False, why, st
        time.sleep(0.1)


def wait_main(args: argparse.Namespace) -> int:
    ok, why, st = wait_for(args.replica, token(args), args.timeout)
    if ok:
        if not args.quiet:
            print(f"replica caught up: gseq {st['gseq']}, {st['applied_events']} events applied")
        return 0
    print(f"clusterrep wait: timed out after {args.timeout:g} s; pending:", file=sys.stderr)
    for line in why:
        print(f"  {line}", file=sys.stderr)
    return 1
