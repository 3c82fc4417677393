"""`clusterrep restore`: write the volume as it was at a restore point into a directory."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from ..errors import ClusterrepError
from ..history.client import PREFETCH_FROM, HistoryClient, prefetched
from ..history.restore import write_tree
from ..snapshot import Entry, Kind
from .common import add_auth, add_mark_choice, auth, mark_choice, peer_address


class RestoreRefused(ClusterrepError):
    """The restore cannot start (the destination is not an empty directory, ...)."""

    exit_code = 2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "restore", help="write the volume as it was at a restore point into a directory",
        description="Write the volume as it was right after a mark into --to (on this machine; "
                    "the data streams over the authenticated connection): the whole tree, or "
                    "only the paths given, with owners, modes, extended attributes, hard links, "
                    "symlinks, special files, holes and modification times. Every file is taken "
                    "at the same mark: a crash-consistent state of the whole volume. The replica "
                    "keeps applying meanwhile. --to must be empty or not exist.")
    p.add_argument("--replica", required=True, type=peer_address, metavar="HOST:PORT")
    add_auth(p)
    add_mark_choice(p)
    p.add_argument("--to", required=True, metavar="DIR", help="where to write (empty or missing)")
    p.add_argument("--path", action="append", metavar="P",
                   help="restore only P (a file, or a directory and everything under it, as it "
                        "was at the mark), kept at its path under --to; repeat for more")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=main)


def _check_dest(dest: Path) -> bool:
    """True if ``dest`` must be created; RestoreRefused unless it is an empty directory."""
    if not dest.exists() and not dest.is_symlink():
        if not dest.parent.is_dir():
            raise RestoreRefused(f"{dest.parent} does not exist", hint="create it, or pick another --to")
        return True
    if dest.is_symlink() or not dest.is_dir():
        raise RestoreRefused(f"{dest} is not a directory", hint="pick an empty or missing directory")
    if any(os.scandir(dest)):
        raise RestoreRefused(f"{dest} is not empty: a restore never writes over files",
                             hint="pick an empty or missing directory")
    return False


@contextlib.contextmanager
def _incomplete_on_failure(dest: Path) -> Iterator[None]:
    """A restore that fails half way says that what it left is incomplete."""
    try:
        yield
    except ClusterrepError as exc:
        raise ClusterrepError(f"{exc}; the restore into {dest} is INCOMPLETE",
                              hint="remove it and run the restore again") from None
    except OSError as exc:
        raise ClusterrepError(f"writing {dest} failed: {exc}; the restore is INCOMPLETE",
                              hint="remove it and run the restore again (free space?)") from None


def main(args: argparse.Namespace) -> int:
    dest = Path(args.to)
    create = _check_dest(dest)
    paths = None if not args.path else [p.strip("/") for p in args.path]
    how = mark_choice(args)
    started = time.monotonic()
    with HistoryClient(args.replica, auth(args)) as client:
        gseq, received_at = client.resolve(**how)
        entries = client.entries(gseq, paths)
        total = sum(e.size for e in entries if e.kind is Kind.FILE)
        if create:
            try:
                dest.mkdir(mode=0o700)
            except OSError as exc:
                raise RestoreRefused(f"cannot create {dest}: {exc.strerror}",
                                     hint="pick a directory you may create") from None
        progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn(), disable=args.quiet)
        with progress, _incomplete_on_failure(dest):
            task = progress.add_task(f"restoring g{gseq}", total=total)
            def blocks_of(e: Entry) -> Iterator[tuple[int, bytes]]:
                it = client.blocks(gseq, e.inode[1], e.size)
                return prefetched(it) if e.size >= PREFETCH_FROM else it

            stats = write_tree(dest, entries, blocks_of,
                               whole=paths is None,
                               progress=lambda n: progress.advance(task, n))
    took = time.monotonic() - started
    print(f"restored g{gseq} (received {received_at}) into {dest}: {len(entries)} entries, "
          f"{total / 2**20:.1f} MiB, {stats['bytes_written'] / 2**20:.1f} MiB of data, "
          f"in {took:.1f} s")
    return 0
