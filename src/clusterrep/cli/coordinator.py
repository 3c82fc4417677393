"""`clusterrep coordinator`: run the metadata coordinator."""

from __future__ import annotations

import argparse
import logging

from ..coordinator.server import CoordinatorServer
from ..coordinator.service import CoordinatorService
from .common import (
    add_auth,
    add_verbose,
    auth,
    byte_rate,
    peer_address,
    positive_seconds,
    serve_until_signalled,
    setup_logging,
    state_dir,
)

log = logging.getLogger("clusterrep.coordinator")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "coordinator", help="run the coordinator (executes and numbers metadata operations)",
        description="Execute every node's metadata operations on the volume in one serial "
                    "order, number them (gseq), hand out per-file write tokens, and stream the "
                    "numbered operations to the replica.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address nodes connect to")
    p.add_argument("--volume", required=True, metavar="DIR", help="the shared volume directory")
    p.add_argument("--replica", required=True, type=peer_address, metavar="HOST:PORT",
                   help="the replica server")
    p.add_argument("--state", required=True, type=state_dir, metavar="DIR",
                   help="the coordinator's stream journal and tables (created if missing)")
    p.add_argument("--allow-existing", action="store_true",
                   help="deprecated, does nothing: a volume that already holds files is "
                        "synchronised to the replica when the coordinator first starts on it")
    p.add_argument("--sync-rate", type=byte_rate, default=None, metavar="RATE",
                   help="at most this many bytes per second read from the volume by a "
                        "synchronisation (e.g. 200M), so that it does not starve running VMs "
                        "(default: no limit)")
    p.add_argument("--evict-after", type=positive_seconds, default=None, metavar="SECONDS",
                   help="evict a node silent for this long (never before its lease ran out; see "
                        "clusterrep evict). Default: never; a node that died stays a member and "
                        "the replica waits for it until an operator evicts it")
    p.add_argument("--lease", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="how long a node that stopped answering keeps its write tokens and file "
                        "locks (default 10). A node stops writing by itself before its lease "
                        "ends; only then are its files and locks given to other hosts (fencing)")
    p.add_argument("--lock-grace", type=positive_seconds, default=15.0, metavar="SECONDS",
                   help="after a restart, grant no new file lock for this long, or until every "
                        "node has reclaimed the locks it holds (default 15)")
    add_auth(p)
    add_verbose(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    creds = auth(args)
    if args.allow_existing:
        log.warning("--allow-existing is deprecated and does nothing: a volume that holds files "
                    "is synchronised to the replica automatically")
    service = CoordinatorService(args.volume, args.state, lock_grace=args.lock_grace,
                                 lease=args.lease)
    server = CoordinatorServer(service, args.listen, args.replica, creds, sync_rate=args.sync_rate,
                               evict_after=args.evict_after)
    return serve_until_signalled(server.start, server.stop, f"coordinator on {args.listen}")
