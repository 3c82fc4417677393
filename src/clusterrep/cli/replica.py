"""`clusterrep replica`: run the replica server."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..replica.server import ReplicaServer
from ..replica.service import ReplicaService
from .common import add_auth, add_verbose, auth, serve_until_signalled, setup_logging, state_dir


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "replica", help="run the replica server (receives, journals, merges, applies)",
        description="Receive every node's and the coordinator's event stream over authenticated "
                    "TCP, journal each batch durably before acknowledging it, merge the streams "
                    "by time marks and apply them to --target. Restarts resume from --state.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on")
    p.add_argument("--target", required=True, metavar="DIR",
                   help="directory that holds the replica (created if missing)")
    p.add_argument("--state", required=True, type=state_dir, metavar="DIR",
                   help="journal and checkpoint directory (created if missing; keep it apart "
                        "from --target)")
    add_auth(p)
    add_verbose(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    creds = auth(args)
    target, state = Path(args.target), Path(args.state)
    target.mkdir(parents=True, exist_ok=True)
    service = ReplicaService(target, state)
    server = ReplicaServer(service, args.listen, creds)
    return serve_until_signalled(server.start, server.stop, f"replica on {args.listen}")
