"""`clusterrep replica`: run the replica server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..durable import atomic_write
from ..errors import ClusterrepError, ConfigError
from ..history.client import HistoryClient
from ..history.failback import report_lines, save_unreplicated
from ..replica.server import ReplicaServer
from ..replica.service import HistoryOptions, ReplicaService
from .common import (
    add_auth,
    add_verbose,
    auth,
    gseq,
    parse_duration,
    parse_size,
    peer_address,
    serve_until_signalled,
    setup_logging,
    state_dir,
)

log = logging.getLogger("clusterrep.replica")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "replica", help="run the replica server (receives, journals, merges, applies)",
        description="Receive every node's and the coordinator's event stream over authenticated "
                    "TCP, journal each batch durably before acknowledging it, merge the streams "
                    "by time marks and apply them to --target. Restarts resume from --state.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on")
    p.add_argument("--target", required=True, metavar="DIR",
                   help="directory that holds the replica (created mode 0700 if missing; it "
                        "takes the volume root's mode, owner and times as they arrive, so keep "
                        "it inside a directory only root may enter, on a file system mounted "
                        "nodev,nosuid: the volume's device nodes and set-user-ID files land "
                        "there)")
    p.add_argument("--state", required=True, type=state_dir, metavar="DIR",
                   help="journal and checkpoint directory (created if missing; keep it apart "
                        "from --target)")
    p.add_argument("--adopt-target", action="store_true",
                   help="this replica has no state yet but --target already holds files (an "
                        "older copy of the volume): keep them, and let the first "
                        "synchronisation compare them with the volume, so that only what differs "
                        "moves; every file it deletes is logged. Without it a replica without "
                        "state refuses a target that is not empty")
    p.add_argument("--retain", type=parse_duration, metavar="DURATION",
                   help="keep history: every mark of the last DURATION (90s, 15m, 24h, 30d) can be "
                        "restored (`clusterrep marks`, `clusterrep restore`); the history lives in "
                        "--state/history, and files removed from the volume are kept there by a "
                        "hard link while needed, so keep --state on --target's file system")
    p.add_argument("--retain-size", type=parse_size, metavar="SIZE",
                   help="the history never takes more than SIZE (512M, 20G) on disk: the oldest "
                        "restore points go first, pinned ones too (with an alarm in the status). "
                        "Alone, it keeps as many restore points as fit")
    f = p.add_argument_group(
        "failback (docs/operations.md, \"Failover and failback\")",
        "The old site's volume comes back after a failover: adopt it as this replica's target "
        "(--adopt-target) so that only what differs from the new volume moves. Before anything "
        "in it is overwritten, what it wrote after the failover mark that never reached the "
        "old replica is found (compared with that mark on the old replica) and saved aside.")
    f.add_argument("--failback-from", type=peer_address, metavar="HOST:PORT",
                   help="the old replica (the one the failover restored from), still keeping history")
    f.add_argument("--failback-mark", type=gseq, metavar="GSEQ",
                   help="the mark the failover restored (what the new volume started from)")
    f.add_argument("--save-aside", metavar="DIR",
                   help="where to keep what the old site wrote after the mark (default: "
                        "--state/failback-saved); listed in DIR/failback.json and the log")
    f.add_argument("--discard-old-changes", action="store_true",
                   help="do not keep them (they are still listed): the failback overwrites them")
    add_auth(p)
    add_verbose(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    creds = auth(args)
    target, state = Path(args.target), Path(args.state)
    if not target.exists():
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.mkdir(mode=0o700)
        os.chmod(target, 0o700)  # (whatever the umask)
    warn_if_exposed(target)
    if args.failback_from is not None or args.failback_mark is not None:
        _failback(args, creds, target, state)
    history = None
    if args.retain is not None or args.retain_size is not None:
        history = HistoryOptions(retain=args.retain, retain_size=args.retain_size)
        log.info("keeping history: %s of restore points%s", _duration(args.retain),
                 "" if args.retain_size is None else f", at most {args.retain_size / 2**20:.0f} MiB")
    service = ReplicaService(target, state, adopt_target=args.adopt_target, history=history)
    server = ReplicaServer(service, args.listen, creds)
    return serve_until_signalled(server.start, server.stop, f"replica on {args.listen}")


def warn_if_exposed(target: Path) -> None:
    """The replica holds the volume's set-user-ID files and device nodes with their modes and
    owners: other users of this host must not reach them. Warn if the target's parent lets
    them in."""
    parent = target.resolve().parent
    try:
        st = os.stat(parent)
    except OSError:
        return
    if stat.S_IMODE(st.st_mode) & 0o011:
        log.warning("%s is reachable by other users of this host (its directory %s is mode %o): "
                    "the replica's set-user-ID files and device nodes could be used by them; "
                    "keep the target inside a directory of mode 0700 on a file system mounted "
                    "nodev,nosuid (docs/operations.md)", target, parent, stat.S_IMODE(st.st_mode))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "as much as --retain-size allows"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:g}s"


def _failback(args: argparse.Namespace, creds: Any, target: Path, state: Path) -> None:
    """Keep what the old site wrote after the failover mark, once, before the replica starts."""
    if not args.adopt_target or args.failback_from is None or args.failback_mark is None:
        raise ConfigError("--failback-from and --failback-mark go together, with --adopt-target",
                          hint="see docs/operations.md, \"Failover and failback\"")
    done = state / "failback.json"
    if done.exists():
        log.info("failback: what the old site wrote after the mark was kept before (%s)", done)
        return
    save_to = None if args.discard_old_changes else Path(args.save_aside or state / "failback-saved")
    if save_to is not None and save_to.exists() and any(save_to.iterdir()):
        raise ConfigError(f"{save_to} is not empty", hint="pick an empty --save-aside directory")
    try:
        with HistoryClient(args.failback_from, creds) as client:
            report = save_unreplicated(target, client, args.failback_mark, save_to)
    except ClusterrepError as exc:
        raise ClusterrepError(f"failback: cannot compare {target} with mark g{args.failback_mark} on "
                              f"{args.failback_from}: {exc}",
                              hint="the old replica must be running (with its history); or pass "
                                   "--discard-old-changes to overwrite what the old site wrote after "
                                   "the mark without keeping it") from None
    for line in report_lines(report):
        log.warning("failback: %s", line)
    where = f"kept in {save_to}" if save_to is not None else "NOT kept (--discard-old-changes)"
    log.warning("failback: the old site holds %s; %s", report.summary(), where)
    state.mkdir(parents=True, exist_ok=True)
    atomic_write(done, json.dumps(asdict(report), indent=1).encode())
