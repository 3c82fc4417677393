"""`clusterrep replica`: run the replica server."""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path

from ..replica.server import ReplicaServer
from ..replica.service import HistoryOptions, ReplicaService
from .common import (
    add_auth,
    add_verbose,
    auth,
    parse_duration,
    parse_size,
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
