"""`clusterrep` entry point: builds the parser from the subcommand modules, maps errors to exit
codes (0 ok, 1 check failed, 2+ see `clusterrep.errors`, 130 interrupted)."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import ClusterrepError
from . import (
    certs,
    coordinator,
    demo,
    evict,
    marks,
    mountmark,
    node,
    replica,
    restore,
    sim,
    status,
    sync,
    verify,
)

COMMANDS = (replica, coordinator, node, status, sync, verify, evict, marks, restore, mountmark, demo, certs,
            sim)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterrep",
        description="Continuous, clock-independent replication of a cluster shared volume.",
    )
    parser.add_argument("--version", action="version", version=f"clusterrep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClusterrepError as exc:
        print(f"clusterrep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("clusterrep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
