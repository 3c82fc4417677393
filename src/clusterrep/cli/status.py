"""`clusterrep status` and `clusterrep wait`: what the replica has, and waiting until it has all."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..client import fetch_status, wait_for
from .common import add_auth, auth


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="show what the replica received and applied, per source",
                       description="Per source (each node and the coordinator): events captured, "
                                   "received, applied, and the lag in events, bytes and seconds; "
                                   "what the merge is waiting for; errors.")
    p.add_argument("--replica", required=True, metavar="HOST:PORT")
    add_auth(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=status_main)

    w = sub.add_parser("wait", help="wait until the replica has applied everything captured",
                       description="Exit 0 once every source has shipped all it captured and the "
                                   "replica has applied it; exit 1 on timeout, saying what is "
                                   "pending.")
    w.add_argument("--replica", required=True, metavar="HOST:PORT")
    add_auth(w)
    w.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up after this long (default 60)")
    w.add_argument("--quiet", action="store_true", help="print nothing on success")
    w.set_defaults(func=wait_main)


def format_status(st: dict[str, Any]) -> str:
    lines = [f"replica: gseq {st['gseq']}, members {', '.join(st['members']) or '-'}, "
             f"{st['applied_events']} events applied, {st['pending_events']} pending, "
             f"journal {st['journal_bytes'] / 2**20:.1f} MiB"]
    if st.get("error"):
        lines.append(f"ERROR: applying stopped: {st['error']}")
    if st.get("stalled"):
        lines.append(f"PAUSED: applying waits (it resumes by itself): {st['stalled']}")
    head = f"{'source':14} {'link':5} {'captured':>9} {'received':>9} {'applied':>9} " \
           f"{'lag ev':>7} {'lag s':>6} {'MiB in':>8}"
    lines.append(head)
    for name, s in st["sources"].items():
        link = ("tls" if s.get("tls") else "up") if s["connected"] else "down"
        lines.append(f"{name:14} {link:5} {s['captured']:>9} "
                     f"{s['received']:>9} {s['applied']:>9} {s['lag_events']:>7} "
                     f"{s['lag_seconds']:>6.1f} {s['bytes_received'] / 2**20:>8.1f}")
    for name, s in st["sources"].items():
        if s.get("unsettled"):
            lines.append(f"{name}: {s['unsettled']} file(s) being written; their modification "
                         "times are recorded once their writers are quiet")
    for reason in st.get("waiting_for") or []:
        lines.append(f"waiting for: {reason}")
    lines.extend(_sync_lines(st))
    lines.extend(_history_lines(st.get("history")))
    return "\n".join(lines)


def _history_lines(h: dict[str, Any] | None) -> list[str]:
    if not h:
        return []
    keep = " / ".join(x for x in (
        None if h.get("retain_s") is None else f"{h['retain_s'] / 3600:g} h",
        None if h.get("retain_size") is None else f"at most {h['retain_size'] / 2**30:g} GiB") if x)
    if not h.get("recording"):
        why = ("a synchronisation this replica needed is running" if h.get("syncing")
               else "it starts at the next mark")
        lines = [f"HISTORY: no restore points yet ({why}); keeping {keep}"]
    elif h.get("oldest") is None:
        lines = [f"HISTORY: recording since g{h.get('base')}, no restore point durable yet; keeping {keep}"]
    else:
        lines = [f"HISTORY: {h['restore_points']} restore points, g{h['oldest']} ({_iso(h['oldest_at'])}) "
                 f".. g{h['newest']} ({_iso(h['newest_at'])}), {h.get('bytes', 0) / 2**20:.1f} MiB; "
                 f"keeping {keep}"]
    if h.get("alarm"):
        lines.append(f"ALARM (history): {h['alarm']}")
    for gap in (h.get("gaps") or [])[-3:]:
        lines.append(f"history gap at g{gap.get('at')}: {gap.get('why')}")
    return lines


def _iso(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _sync_lines(st: dict[str, Any]) -> list[str]:
    sync, last = st.get("sync"), st.get("last_sync")
    if sync and sync.get("state") == "awaiting":
        return [f"SYNC: waiting for a synchronisation to start: {sync.get('reason')}"]
    if sync:
        total = sync.get("volume_bytes") or 0
        seconds = sync.get("seconds", 0)
        rate = sync.get("bytes", 0) / max(seconds, 1e-3)
        done, files = sync.get("files_done", 0), sync.get("files", 0)
        left = f", about {seconds * (files - done) / done:.0f} s left" if done and files > done else ""
        return [f"SYNC {sync.get('sync_id')} from mark g{sync.get('gseq')}: {sync.get('phase')}, "
                f"{done} of {files} files compared ({total / 2**20:.1f} MiB), "
                f"{sync.get('bytes', 0) / 2**20:.1f} MiB moved at {rate / 2**20:.1f} MiB/s, "
                f"{seconds:.0f} s so far{left}; why: {sync.get('reason')}"]
    if last:
        return [f"last sync {last.get('sync_id')}: {last.get('phase')} at mark g{last.get('end_gseq')}, "
                f"{last.get('files_done', 0)} files compared, {last.get('bytes', 0) / 2**20:.1f} MiB "
                f"moved in {last.get('seconds', 0):.1f} s ({last.get('reason')})"]
    return []


def status_main(args: argparse.Namespace) -> int:
    st = fetch_status(args.replica, auth(args))
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0 if not st.get("error") else 1


def wait_main(args: argparse.Namespace) -> int:
    ok, why, st = wait_for(args.replica, auth(args), args.timeout)
    if ok:
        if not args.quiet:
            print(f"replica caught up: gseq {st['gseq']}, {st['applied_events']} events applied")
        return 0
    print(f"clusterrep wait: timed out after {args.timeout:g} s; pending:", file=sys.stderr)
    for line in why:
        print(f"  {line}", file=sys.stderr)
    return 1
