"""`clusterrep sync`: synchronise the replica with the volume now, and follow it to the end."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from .. import wire
from ..errors import ClusterrepError
from ..timing import pause
from .common import add_auth, auth, peer_address, positive_seconds


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "sync", help="synchronise the replica with the volume now, showing progress",
        description="Ask the coordinator for a synchronisation now: it records a mark, the "
                    "replica compares its target with the volume's structure at that mark, and "
                    "every file whose size or time differs is compared block by block; only the "
                    "blocks that differ move. Nodes keep writing meanwhile. Exits 0 once the "
                    "replica has applied everything up to the sync's end mark, 1 if the sync "
                    "was replaced by another or the time ran out, 2 on bad usage, 3 if some "
                    "file could not be read on the volume.")
    p.add_argument("--coordinator", required=True, type=peer_address, metavar="HOST:PORT",
                   help="the coordinator")
    add_auth(p)
    p.add_argument("--timeout", type=positive_seconds, default=24 * 3600.0, metavar="SECONDS",
                   help="give up waiting after this long (default: a day); the sync goes on")
    p.add_argument("--json", action="store_true",
                   help="print the final report as JSON instead of a progress display")
    p.set_defaults(func=main)


class _Coordinator:
    def __init__(self, addr: str, creds: wire.Auth) -> None:
        self.conn = wire.connect(addr, creds, name=f"cli-{os.getpid()}", role="client")

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.conn.send(msg)
        reply = self.conn.recv(timeout=60)
        if not isinstance(reply, dict) or reply.get("t") != msg["t"]:
            raise ClusterrepError(f"unexpected answer from the coordinator: {reply!r:.200}")
        return reply


def _view(report: dict[str, Any]) -> tuple[str, int, int, int, int, bool]:
    """(phase, files done, files, bytes compared, bytes to compare, finished) from a report."""
    replica = report.get("replica") or {}
    progress = report.get("progress") or {}
    sync = replica.get("sync") or {}
    last = replica.get("last_sync") or {}
    finished = report["state"] in ("recorded", "aborted") and not sync and \
        last.get("sync_id") == progress.get("sync_id")
    phase = sync.get("phase") or sync.get("state") or report["state"]
    total = int(sync.get("volume_bytes", last.get("volume_bytes", 0)) or 0)
    return (phase, int(sync.get("files_done", last.get("files_done", 0)) or 0),
            int(sync.get("files", last.get("files", 0)) or 0), int(progress.get("bytes_read", 0)),
            total, finished)


def follow(addr: str, creds: wire.Auth, mode: str, timeout: float, *,
           show: bool) -> tuple[str, dict[str, Any]]:
    """Ask the coordinator for a sync (``mode``: sync, verify or repair) and follow it until the
    replica has applied its end mark, or ``timeout`` seconds; returns its id and last report.
    ``show``: a progress bar on a terminal, a line every 5 s otherwise."""
    coordinator = _Coordinator(addr, creds)
    sync_id = coordinator.ask({"t": "sync", "mode": mode})["sync_id"]
    deadline = time.monotonic() + timeout
    interactive = show and sys.stderr.isatty()
    report: dict[str, Any] = {}
    progress_bar = None
    if interactive:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        progress_bar = Progress(TextColumn(f"{mode} {{task.fields[phase]}} {{task.fields[files]}}"),
                                BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), transient=False)
        progress_bar.start()
        task = progress_bar.add_task(mode, total=None, phase="starting", files="")
    elif show:
        print(f"{mode} {sync_id} asked for", file=sys.stderr)
    last_line = 0.0
    try:
        while time.monotonic() < deadline:
            report = coordinator.ask({"t": "sync-status", "sync_id": sync_id})
            phase, done, files, read, total, finished = _view(report)
            if progress_bar is not None:
                progress_bar.update(task, completed=read, total=total or None, phase=phase,
                                    files=f"{done}/{files} files")
            elif show and time.monotonic() - last_line > 5:
                print(f"{mode} {sync_id}: {phase}, {done}/{files} files compared, "
                      f"{read / 2**20:.1f} of {total / 2**20:.1f} MiB read", file=sys.stderr)
                last_line = time.monotonic()
            if finished or report["state"] == "unknown":
                return sync_id, report
            pause(0.5)
    finally:
        if progress_bar is not None:
            progress_bar.stop()
    report["timed_out"] = True
    return sync_id, report


def main(args: argparse.Namespace) -> int:
    sync_id, report = follow(args.coordinator, auth(args), "sync", args.timeout, show=not args.json)
    if report.get("timed_out"):
        print(f"clusterrep sync: not finished after {args.timeout:g} s (it goes on: see clusterrep "
              "status)", file=sys.stderr)
        return 1
    last = (report.get("replica") or {}).get("last_sync") or {}
    if args.json:
        print(json.dumps({"sync_id": sync_id, **report}, indent=2))
    if report["state"] == "recorded" and last.get("phase") == "done" and last.get("not_compared"):
        print(f"clusterrep sync: {last['not_compared']} file(s) could not be read on the volume and "
              "were not synchronised (see the coordinator's log)", file=sys.stderr)
        return 3
    if report["state"] == "recorded" and last.get("phase") == "done":
        if not args.json:
            print(f"synchronisation {sync_id} done: {last.get('files_done', 0)} files compared, "
                  f"{last.get('bytes', 0) / 2**20:.1f} MiB moved in {last.get('seconds', 0):.1f} s; "
                  "the replica holds the volume as of its end mark", file=sys.stderr)
        return 0
    print(f"clusterrep sync: synchronisation {sync_id} {report['state']} "
          "(a newer one replaced it, or the coordinator restarted without it)", file=sys.stderr)
    return 1
