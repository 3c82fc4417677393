"""`clusterrep verify`: compare the volume with the replica, byte for byte and attribute by attribute."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import ClusterrepError
from ..verify import compare_trees
from .common import add_auth, auth, peer_address, positive_seconds
from .sync import follow


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("verify", help="compare the volume with the replica (exit 1 if they differ)",
                       description="Compare what 'rsync -aHAX --numeric-ids' keeps: names, types "
                                   "(fifo, socket and device included), sizes, contents, symlink "
                                   "targets, modes, numeric owners, modification times to the "
                                   "nanosecond, extended attributes and POSIX ACLs, device numbers "
                                   "and hard links, of every entry and of the root itself (shown "
                                   "as '.'). Exit 0 if identical, 1 otherwise. Run it after "
                                   "'clusterrep wait' while writers are quiet.")
    p.add_argument("--volume", metavar="DIR", help="the volume (offline comparison)")
    p.add_argument("--target", metavar="DIR", help="the replica's target directory (offline)")
    p.add_argument("--online", action="store_true",
                   help="compare the live volume with the live replica while hosts keep "
                        "writing, through the coordinator (--coordinator): every file's blocks "
                        "are compared at an exact point of the replication order (under the "
                        "file's write token), so a write in flight is never taken for a "
                        "difference and a file being written is compared too. Exit 0: "
                        "identical; 1: differences found (and, with --repair, not all put "
                        "right); 3: something could not be compared (named)")
    p.add_argument("--coordinator", type=peer_address, metavar="HOST:PORT",
                   help="the coordinator (with --online)")
    p.add_argument("--repair", action="store_true",
                   help="with --online: put every difference right, moving only what differs, "
                        "through the replica's apply order; exit 0 once all are repaired")
    p.add_argument("--timeout", type=positive_seconds, default=24 * 3600.0, metavar="SECONDS",
                   help="with --online: give up waiting after this long (default: a day)")
    add_auth(p, required=False)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--limit", type=int, default=50, help="list at most this many differences")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.online:
        return online(args)
    if args.repair or args.coordinator:
        raise ClusterrepError("--repair and --coordinator go with --online",
                              hint="clusterrep verify --online --coordinator HOST:PORT --token-file FILE")
    if not args.volume or not args.target:
        raise ClusterrepError("an offline verify needs --volume and --target",
                              hint="or compare the live cluster: clusterrep verify --online "
                                   "--coordinator HOST:PORT --token-file FILE")
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


def online(args: argparse.Namespace) -> int:
    if not args.coordinator or not args.token_file:
        raise ClusterrepError("--online needs --coordinator HOST:PORT and --token-file FILE")
    if args.volume or args.target:
        raise ClusterrepError("--online compares the live cluster through the coordinator: "
                              "--volume and --target are for an offline comparison")
    mode = "repair" if args.repair else "verify"
    sync_id, report = follow(args.coordinator, auth(args), mode, args.timeout, show=not args.json)
    last = (report.get("replica") or {}).get("last_sync") or {}
    done = report["state"] == "recorded" and last.get("phase") == "done" and \
        last.get("sync_id") == sync_id
    found, not_compared = int(last.get("differences", 0)), int(last.get("not_compared", 0))
    listed = last.get("listed") or []
    if args.json:
        print(json.dumps({"sync_id": sync_id, "mode": mode, "finished": done,
                          "differences": found, "not_compared": not_compared,
                          "listed": listed, "report": report}, indent=2))
    else:
        verb = "repaired" if args.repair else "found"
        if not done:
            print(f"{mode} {sync_id} did not finish ({report['state']}"
                  f"{', timed out' if report.get('timed_out') else ''})")
        elif not found and not not_compared:
            print(f"identical: the replica matches the volume (online {mode} {sync_id}, "
                  f"{last.get('files_done', 0)} files compared)")
        else:
            print(f"{found} difference(s) {verb}, {not_compared} file(s) not compared "
                  f"(online {mode} {sync_id}):")
            for d in listed[:args.limit]:
                line = f"  {d['what']:12} {d['path']}: {d['detail']}"
                print(os.fsencode(line).decode("utf-8", "backslashreplace"))
            if len(listed) > args.limit:
                print(f"  ... and {len(listed) - args.limit} more")
    if not done or not_compared:
        return 3
    return 0 if not found or args.repair else 1
