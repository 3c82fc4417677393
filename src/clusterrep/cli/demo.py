"""`clusterrep demo`: a real two-node cluster on this machine, a VM migrating between nodes."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..capture.check import INSTALL, FuseUnavailable, check_fuse
from ..errors import ClusterrepError
from ..localcluster import LocalCluster

INTRO = """\
clusterrep demo: a replica server, a coordinator and two node agents, as real processes on this
machine. Each node mounts the capture file system over one shared volume directory (as two hosts
would mount a cluster shared volume). A VM-like workload writes a disk image through node h1,
then the VM live-migrates to node h2 (close on h1, open on h2) and keeps writing. {clock}
The replica must end byte-identical to the volume.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run a real two-node cluster with a live-migrating VM",
                       description=INTRO.format(clock="Node h2's clock runs 3 hours ahead of h1's."),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-mib", type=int, default=64, help="disk image size (default 64 MiB)")
    p.add_argument("--writes", type=int, default=4000,
                   help="random 4 KiB writes before and after the migration (default 4000)")
    p.add_argument("--tls", action="store_true",
                   help="run every connection over TLS with client certificates (a CA and one "
                        "certificate per member are made in the work directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    p.add_argument("--workdir", help="work directory (default: a new temp directory)")
    p.add_argument("--no-install", action="store_true",
                   help="do not try to install missing packages (fuse3, faketime)")
    p.set_defaults(func=main)


def _ensure_packages(allow: bool) -> bool:
    """Install FUSE and faketime when missing, if we may. Return whether faketime is there."""
    missing = [pkg for pkg, cmd in (("fuse3", "fusermount3"), ("faketime", "faketime"))
               if shutil.which(cmd) is None]
    if missing and allow and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing, "libfuse3-dev"], check=False,
                       stdout=subprocess.DEVNULL)
    try:
        check_fuse()
    except FuseUnavailable as exc:
        raise FuseUnavailable(f"{exc}; the demo needs FUSE", hint=f"as root: {INSTALL}") from None
    return shutil.which("faketime") is not None


def _workload(cluster: LocalCluster, image_mib: int, writes: int) -> dict[str, float]:
    rng = random.Random(7)
    blocks = image_mib * 256
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    (m1 / "vms").mkdir()
    t0 = time.monotonic()
    fd = os.open(m1 / "vms" / "vm1.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, image_mib << 20)
    for _ in range(writes):
        os.pwrite(fd, rng.randbytes(4096), rng.randrange(blocks) * 4096)
    # a small tree of ordinary files next to the image
    etc = m1 / "vms" / "vm1.conf.d"
    etc.mkdir()
    for i in range(20):
        (etc / f"part{i:02}.conf").write_text(f"setting{i} = {rng.random()}\n" * (i + 1))
    (etc / "part03.conf").rename(etc / "renamed.conf")
    (etc / "part04.conf").unlink()
    (etc / "part05.conf").chmod(0o600)
    os.symlink("part06.conf", etc / "current")
    os.fsync(fd)
    os.close(fd)  # live migration: the VM stops on h1 ...
    fd = os.open(m2 / "vms" / "vm1.img", os.O_RDWR)  # ... and resumes on h2
    for _ in range(writes):
        os.pwrite(fd, rng.randbytes(4096), rng.randrange(blocks) * 4096)
    os.close(fd)
    return {"write_seconds": time.monotonic() - t0, "bytes_written": 2 * writes * 4096}


def main(args: argparse.Namespace) -> int:
    has_faketime = _ensure_packages(not args.no_install)
    offset = "+3h" if has_faketime else ""
    print(INTRO.format(clock="Node h2's clock runs 3 hours ahead of h1's (faketime)." if offset
                       else "(Install faketime to run node h2 with a clock 3 hours ahead.)"))
    if args.workdir and os.path.exists(args.workdir) and (
            not os.path.isdir(args.workdir) or os.listdir(args.workdir)):
        raise ClusterrepError(f"--workdir {args.workdir} exists and is not an empty directory",
                              hint="give a new or empty directory: the demo cleans up after itself")
    created = not (args.workdir and os.path.exists(args.workdir))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clusterrep-demo-"))
    cluster = LocalCluster(workdir, ("h1", "h2"), clock_offsets={"h2": offset} if offset else {},
                           tls=args.tls)
    ok = False
    try:
        print(f"starting replica {cluster.replica_addr}, coordinator {cluster.coordinator_addr}, "
              f"nodes h1 and h2 (work directory {workdir}){' over TLS' if args.tls else ''} ...",
              flush=True)
        cluster.start()
        print(f"writing {args.writes} x 4 KiB through h1, migrating, {args.writes} more through "
              "h2 ...", flush=True)
        stats = _workload(cluster, args.image_mib, args.writes)
        t0 = time.monotonic()
        caught_up, why, st = cluster.wait(timeout=120)
        lag = time.monotonic() - t0
        diffs = cluster.verify()
        ok = caught_up and not diffs
        _summary(st, stats, lag, caught_up, why, diffs)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the cluster", file=sys.stderr)
    finally:
        cluster.stop()
        if args.keep or not ok:
            print(f"work directory kept: {workdir} (logs in {workdir / 'logs'})")
        elif created:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # the user's empty directory: leave it empty, as it was
            for child in workdir.iterdir():
                shutil.rmtree(child, ignore_errors=True)
    return 0 if ok else 1


def _summary(st: dict, stats: dict[str, float], lag: float, caught_up: bool, why: list[str],
             diffs: list) -> None:
    src = st["sources"]
    events = sum(s["events_received"] for s in src.values())
    shipped = sum(s["bytes_received"] for s in src.values())
    print()
    per_source = ", ".join(f"{name}: {s['received']}" for name, s in src.items())
    print(f"  events replicated   {events} ({per_source})")
    print(f"  metadata events     {st['gseq']} (numbered by the coordinator; the time marks)")
    print(f"  bytes written       {stats['bytes_written'] / 2**20:.1f} MiB in "
          f"{stats['write_seconds']:.1f} s through the mounts")
    print(f"  bytes shipped       {shipped / 2**20:.1f} MiB to the replica")
    print(f"  lag after writers   {lag:.2f} s until the replica had applied everything")
    if not caught_up:
        print("  NOT caught up:")
        for line in why:
            print(f"    {line}")
    if diffs:
        print(f"  verify              DIFFERENT: {len(diffs)} difference(s)")
        for d in diffs[:10]:
            print(f"    {d}")
    else:
        print("  verify              IDENTICAL: every byte, name, mode, owner, time, xattr and link matches")
