"""`clusterrep mount-mark`: show the volume as it was at a restore point, read-only, without
copying it (`clusterrep.history.mount`)."""

from __future__ import annotations

import argparse

from ..capture.check import check_fuse
from ..history.client import HistoryClient
from ..history.mount import ClientPool, MarkFS, check_mountpoint, serve
from .common import add_auth, add_mark_choice, add_verbose, auth, mark_choice, peer_address, setup_logging

DESCRIPTION = """\
Mount the volume as it was right after a mark at MOUNTPOINT (an empty directory),
read-only and without copying it: names, owners, modes, extended attributes, hard
links, symlinks, special files and modification times as they were; file data is
read from the replica as programs read it. Every file is as it was at the same mark
(a crash-consistent state of the whole volume), files deleted or rewritten since
included. The replica keeps applying meanwhile.

Copy what you need out of it:

  cp -a MOUNTPOINT/path/to/file /somewhere/
  rsync -aHAX MOUNTPOINT/some/dir/ /somewhere/dir/

Writing, creating, deleting or renaming in it fails with EROFS ("Read-only file
system"). Holes show (st_blocks, SEEK_DATA/SEEK_HOLE), so cp keeps a sparse image
sparse. Only the user who mounts can use the mount, and that user
can read every file in it.

It runs in the foreground until Ctrl-C (SIGINT) or SIGTERM, or until unmounted with
`fusermount3 -u MOUNTPOINT`; then it unmounts and exits 0. The mark must stay in the
replica's history window while mounted (else reads fail with EIO): for a long session
pin it first with `clusterrep marks --pin GSEQ --name NAME`.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "mount-mark", help="mount the volume as it was at a restore point, read-only, to browse it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION)
    p.add_argument("--replica", required=True, type=peer_address, metavar="HOST:PORT")
    add_auth(p)
    add_mark_choice(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount it at")
    add_verbose(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    check_fuse()
    check_mountpoint(args.mountpoint)
    how = mark_choice(args)
    creds = auth(args)
    setup_logging(args.verbose)
    first = HistoryClient(args.replica, creds)
    try:
        gseq, received_at = first.resolve(**how)
        entries = first.entries(gseq, None)
    except BaseException:
        first.close()
        raise
    pool = ClientPool(lambda: HistoryClient(args.replica, creds), gseq, first=first)
    try:
        fs = MarkFS(entries, pool.read, pool.extents)
        count = len(entries)
        del entries

        def announce() -> None:
            print(f"mounted g{gseq} (received {received_at}) read-only at {args.mountpoint}: "
                  f"{count} entries; stop with Ctrl-C or fusermount3 -u {args.mountpoint}",
                  flush=True)

        serve(fs, args.mountpoint, fsname=f"clusterrep-g{gseq}", announce=announce)
    finally:
        pool.close()
    print(f"unmounted {args.mountpoint}", flush=True)
    return 0
