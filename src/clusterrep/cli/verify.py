"""`clusterrep verify`: compare the volume with the replica, byte for byte and attribute by attribute."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import ClusterrepError
from ..verify import compare_trees


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("verify", help="compare the volume with the replica (exit 1 if they differ)",
                       description="Compare what 'rsync -aHAX --numeric-ids' keeps: names, types "
                                   "(fifo, socket and device included), sizes, contents, symlink "
                                   "targets, modes, numeric owners, modification times to the "
                                   "nanosecond, extended attributes and POSIX ACLs, device numbers "
                                   "and hard links, of every entry and of the root itself (shown "
                                   "as '.'). Exit 0 if identical, 1 otherwise. Run it after "
                                   "'clusterrep wait' while writers are quiet.")
    p.add_argument("--volume", required=True, metavar="DIR")
    p.add_argument("--target", required=True, metavar="DIR", help="the replica's target directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--limit", type=int, default=50, help="list at most this many differences")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    for d in (args.volume, args.target):
        if not os.path.isdir(d):
            raise ClusterrepError(f"{d} is not a directory")
    diffs = list(compare_trees(args.volume, args.target))
    if args.json:
        print(json.dumps({"identical": not diffs, "differences": [d.to_json() for d in diffs]}))
    elif not diffs:
        print(f"identical: {args.target} matches {args.volume}")
    else:
        print(f"{len(diffs)} difference(s) between {args.volume} and {args.target}:")
        for d in diffs[:args.limit]:
            # a name that is not UTF-8 is shown with its bytes escaped (\xff), never a traceback
            print("  " + os.fsencode(str(d)).decode("utf-8", "backslashreplace"))
        if len(diffs) > args.limit:
            print(f"  ... and {len(diffs) - args.limit} more")
    return 0 if not diffs else 1
