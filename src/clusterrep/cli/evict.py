"""`clusterrep evict`: remove a host that never comes back from the cluster."""

from __future__ import annotations

import argparse
import os
import sys

from .. import wire
from ..errors import ClusterrepError
from .common import add_auth, auth, peer_address


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "evict", help="remove a host that never comes back (the replica stops waiting for it)",
        description="A node that died for good holds every other node's events pending on the "
                    "replica (the merge waits for its stream). Evicting it: the coordinator waits "
                    "until its lease has run out (until then it may still be writing), takes its "
                    "write tokens and locks, and records the eviction as a mark; the replica stops "
                    "waiting for its stream there, and the files it was writing are compared with "
                    "the volume and put right, so writes it made but never shipped are not lost "
                    "from the replica. The evicted node is refused from then on: to bring the host "
                    "back, remove its state directory and start it with a new --id.")
    p.add_argument("--coordinator", required=True, type=peer_address, metavar="HOST:PORT")
    add_auth(p)
    p.add_argument("--node", required=True, metavar="NAME", help="the node's --id")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    conn = wire.connect(args.coordinator, auth(args), name=f"cli-{os.getpid()}", role="client")
    try:
        conn.send({"t": "evict", "node": args.node})
        reply = conn.recv(timeout=600)
    finally:
        conn.close()
    if not isinstance(reply, dict) or reply.get("t") != "evict":
        raise ClusterrepError(f"unexpected answer from the coordinator: {reply!r:.200}")
    if reply.get("error"):
        raise ClusterrepError(f"cannot evict {args.node}: {reply['error']}")
    line = f"node {args.node} evicted at gseq {reply['gseq']}"
    if reply.get("sync_id"):
        line += (f"; the {reply['files']} file(s) it was writing are being compared with the volume "
                 f"(synchronisation {reply['sync_id']}: see clusterrep status)")
    print(line, file=sys.stderr)
    return 0
