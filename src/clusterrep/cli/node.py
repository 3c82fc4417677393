"""`clusterrep node`: run a node agent (FUSE capture over the volume)."""

from __future__ import annotations

import argparse
import logging
import os

from ..errors import ClusterrepError
from .common import (
    add_auth,
    add_verbose,
    auth,
    parse_size,
    peer_address,
    positive_seconds,
    setup_logging,
    state_dir,
)

log = logging.getLogger("clusterrep.node")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "node", help="run a node agent: mount the capture file system over the volume",
        description="Mount a FUSE pass-through of --volume at --mount. Applications (VMs) use "
                    "--mount; every write goes straight to the volume and is recorded, metadata "
                    "operations go through the coordinator. Events are spooled in --state and "
                    "shipped to the replica. Stop with Ctrl-C or SIGTERM (unmounts).")
    p.add_argument("--id", required=True, metavar="NAME",
                   help="this node's name, unique in the cluster (letters, digits, . _ -)")
    p.add_argument("--volume", required=True, metavar="DIR", help="the shared volume directory")
    p.add_argument("--mount", required=True, metavar="DIR",
                   help="where applications see the volume (created if missing)")
    p.add_argument("--coordinator", required=True, type=peer_address, metavar="HOST:PORT",
                   help="the coordinator")
    p.add_argument("--replica", required=True, type=peer_address, metavar="HOST:PORT",
                   help="the replica server")
    p.add_argument("--state", required=True, type=state_dir, metavar="DIR",
                   help="spool directory (created if missing)")
    p.add_argument("--ack", choices=("async", "local", "received", "replicated"), default="async",
                   help="when an application's write returns: async (event in the spool; "
                        "default), local (spool fsync'd), received (in the replica's memory), "
                        "replicated (fsync'd on the replica: no loss if this node dies). See "
                        "docs/operations.md")
    p.add_argument("--ack-timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                   help="with received/replicated: after this long without the replica, writes "
                        "return once fsync'd locally (logged; default 30)")
    p.add_argument("--spool-limit", type=parse_size, default=8 << 30, metavar="SIZE",
                   help="largest size of the spool while the replica is away (e.g. 512M, 8G; "
                        "default 8G); then writes wait or fail, see --on-spool-full")
    p.add_argument("--on-spool-full", choices=("block", "fail"), default="block",
                   help="when the spool is full: block writes until the replica catches up "
                        "(default), or fail them with ENOSPC")
    p.add_argument("--coordinator-timeout", type=positive_seconds, default=120.0, metavar="SECONDS",
                   help="while the coordinator is unreachable (restarting, moving, link down), "
                        "metadata operations and writes that need it wait this long, as on an "
                        "NFS hard mount, then fail with EIO (default 120; the wait is logged when "
                        "it starts and when it ends)")
    p.add_argument("--allow-other", action="store_true",
                   help="let users other than the one running the node use the mount (VMs run "
                        "as libvirt-qemu, databases as postgres); the kernel checks their "
                        "permissions against modes, owners and ACLs, as on a local file system. "
                        "Needs root, or 'user_allow_other' in /etc/fuse.conf")
    add_auth(p)
    add_verbose(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    creds = auth(args)
    from ..capture.check import check_allow_other, check_fuse, check_mountpoint, clear_dead_mount
    from ..events import _SOURCE_RE

    if not _SOURCE_RE.match(args.id) or args.id == "coordinator":
        raise ClusterrepError(f"--id {args.id!r} is not a valid node name",
                              hint="use 1-64 letters, digits, '.', '_', '-', not 'coordinator'")
    if not os.path.isdir(args.volume):
        raise ClusterrepError(f"volume {args.volume} is not a directory",
                              hint="pass the directory all hosts share with --volume")
    check_fuse()
    if args.allow_other:
        check_allow_other()
    if clear_dead_mount(args.mount):
        log.warning("%s was the dead mount of a node agent that did not stop cleanly; it has "
                    "been unmounted", args.mount)
    os.makedirs(args.mount, exist_ok=True)
    check_mountpoint(args.mount, args.volume)

    from ..capture.fs import CaptureFS, mount
    from ..node.agent import NodeAgent, NodeOptions

    options = NodeOptions(volume=args.volume, ack=args.ack, ack_timeout=args.ack_timeout,
                          spool_limit=args.spool_limit, on_spool_full=args.on_spool_full,
                          coordinator_timeout=args.coordinator_timeout)
    agent = NodeAgent(args.id, args.coordinator, args.replica, args.state, creds, options)
    try:
        agent.start()
    except (OSError, ClusterrepError) as exc:
        agent.stop(drain_timeout=0, leave=False)
        raise ClusterrepError(f"node {args.id} could not join the cluster: {exc}",
                              hint="is the coordinator running, and is the token the same?") from None
    log.info("node %s joined; mounting %s over %s", args.id, args.mount, args.volume)
    try:
        mount(CaptureFS(args.volume, agent), args.mount, allow_other=args.allow_other)
    finally:
        log.info("node %s unmounted; flushing", args.id)
        agent.stop()
    return 0
