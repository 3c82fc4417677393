#!/usr/bin/env python3
"""Benchmark: clusterrep's synchronisation against rsync, both over loopback TCP, in the same run.

Data set (seeded, so every run builds the same one): ``--total-mib`` (default 2048) in 200
files: 6 "images" of ``total/8`` each and 194 small and medium files of random, unaligned,
log-uniform sizes filling the rest; all random data (AES-CTR keystream keyed by the seed), so
neither tool can compress it. One source tree serves both tools: the cluster's volume.

1. Full copy into an empty directory.
   rsync: ``rsync -a --stats`` to an rsync daemon on 127.0.0.1 (started here, module on a fresh
   directory), then ``sync``. clusterrep: a fresh `LocalCluster` (no nodes) whose volume holds
   the data set, timed from ``start()`` (so including the replica's and coordinator's process
   start) until ``wait()`` says the first synchronisation is applied, then ``sync`` too
   (``wait`` means applied, not necessarily written back; both pay the same flush).
2. Re-sync after a 1 % change, made with the coordinator stopped, directly on the volume: 1 % of
   the data set's 64 KiB blocks (distinct, chosen at random over all files) each get a 4 KiB
   write at a random 4 KiB-aligned offset inside it, plus 10 % as many unaligned 100-byte
   writes anywhere. rsync: ``rsync -a --inplace --no-whole-file --stats`` into the copy of
   step 1, then ``sync``. clusterrep: the coordinator is started again (not timed), then
   ``python -m clusterrep sync`` is timed from its start to its exit 0, then ``sync``.
3. Bytes on the wire, two ways: each tool's own count (rsync's ``--stats`` "Total bytes sent" +
   "received", protocol included; clusterrep's coordinator log ``bytes_sent``: block payload
   only, no protocol), and the same way for both: the loopback interface's counters
   (/proc/net/dev) over the timed step, minus 66 bytes of Ethernet/IPv4/TCP-with-timestamps
   headers per packet, which estimates the TCP payload of both directions. That counter is
   only clean when nothing else uses loopback, so when run as root the benchmark re-runs
   itself in a network namespace of its own (``unshare --net``; ``--no-netns`` to not).

Before every timed step: ``sync; echo 3 > /proc/sys/vm/drop_caches`` (skipped, and said, where
that is not allowed). Afterwards both copies are compared with the volume (not timed).
Prints a table and the ratios clusterrep / rsync; the last line is machine-readable:
``resync_time_ratio=<f> resync_bytes_ratio=<f> fullcopy_time_ratio=<f>`` (the bytes ratio from
the loopback payload estimate). Needs rsync (``apt-get install rsync``).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import fcntl
import hashlib
import math
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from clusterrep.localcluster import LocalCluster, free_port
from clusterrep.verify import compare_trees

MiB = 1 << 20
BLOCK = 64 * 1024  # clusterrep's block size: the unit of the 1 % change
PAGE = 4096
IMAGES = 6
OTHERS = 194
HEADER = 14 + 20 + 20 + 12  # Ethernet, IPv4, TCP, TCP timestamps option: per packet on lo


# -- data set ---------------------------------------------------------------------------------


def keystream(seed: int, name: str) -> Any:
    """A deterministic random byte source for one file: AES-CTR keyed by the seed and name."""
    key = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


def plan_files(total: int, rng: random.Random) -> list[tuple[str, int]]:
    """(relative path, size) of every file: the images, then the others filling the rest."""
    image = max(MiB, total // 8 // MiB * MiB)
    files = [(f"images/vm{i}.img", image) for i in range(IMAGES)]
    rest = max(total - IMAGES * image, OTHERS)
    raw = [math.exp(rng.uniform(math.log(1024), math.log(32 * MiB))) for _ in range(OTHERS)]
    scale = rest / sum(raw)
    sizes = [max(1, int(r * scale)) for r in raw]
    sizes[0] += rest - sum(sizes)  # exactly the total
    files += [(f"data/d{i % 8}/f{i:03d}.bin", s) for i, s in enumerate(sizes)]
    return files


def make_data(root: Path, files: list[tuple[str, int]], seed: int) -> None:
    for rel, size in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = keystream(seed, rel)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MiB)
                f.write(stream.update(bytes(n)))
                left -= n


def change(root: Path, files: list[tuple[str, int]], rng: random.Random) -> dict[str, int]:
    """Write the 1 % change into ``root`` in place; returns counts of what was written."""
    counts = [math.ceil(size / BLOCK) for _, size in files]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    nblocks = starts[-1]

    def locate(g: int) -> tuple[int, int]:
        i = bisect.bisect_right(starts, g) - 1
        return i, g - starts[i]

    aligned = max(1, round(nblocks / 100))
    unaligned = max(1, round(aligned / 10))
    writes: list[tuple[int, int, int]] = []  # (file index, offset, length)
    for g in rng.sample(range(nblocks), aligned):
        i, b = locate(g)
        size = files[i][1]
        start = b * BLOCK
        length = min(BLOCK, size - start)
        off = start + rng.randrange(math.ceil(length / PAGE)) * PAGE
        writes.append((i, off, min(PAGE, size - off)))
    for _ in range(unaligned):
        i, b = locate(rng.randrange(nblocks))
        size = files[i][1]
        n = min(100, size)
        off = min(b * BLOCK + rng.randrange(BLOCK), size - n)
        if off % PAGE == 0 and off + n < size:
            off += 1
        writes.append((i, off, n))
    for i, off, n in writes:
        fd = os.open(root / files[i][0], os.O_WRONLY)
        try:
            os.pwrite(fd, rng.randbytes(n), off)
        finally:
            os.close(fd)
    touched = {(i, b) for i, off, n in writes for b in {off // BLOCK, (off + n - 1) // BLOCK}}
    return {"blocks": nblocks, "aligned": aligned, "unaligned": unaligned,
            "bytes": sum(n for _, _, n in writes), "files": len({i for i, _, _ in writes}),
            "blocks_touched": len(touched)}


# -- measuring --------------------------------------------------------------------------------


def lo_counters() -> tuple[int, int]:
    """(bytes, packets) received on the loopback interface: every packet on lo, once."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            f = rest.split()
            return int(f[0]), int(f[1])
    return 0, 0


def bring_lo_up() -> None:
    """A new network namespace's loopback starts down; `ip` may not be installed."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, ifr))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


_drop_ok: bool | None = None


def settle() -> None:
    """Write back, then drop the page cache if allowed (said once if not)."""
    global _drop_ok
    os.sync()
    if _drop_ok is not False:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            _drop_ok = True
        except OSError as exc:
            _drop_ok = False
            print(f"note: cannot drop the page cache ({exc}); timed steps start with a warm cache",
                  file=sys.stderr)
    time.sleep(1.0)


@dataclass
class Step:
    seconds: float = 0.0
    own_bytes: int = 0  # the tool's own count
    lo_bytes: int = 0
    lo_packets: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lo_payload(self) -> int:
        return self.lo_bytes - HEADER * self.lo_packets


class Timed:
    """Times a step and reads the loopback counters around it (the final ``sync`` included)."""

    def __init__(self, step: Step) -> None:
        self.step = step

    def __enter__(self) -> Timed:
        self.lo = lo_counters()
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        os.sync()
        self.step.seconds = time.monotonic() - self.start
        b, p = lo_counters()
        self.step.lo_bytes, self.step.lo_packets = b - self.lo[0], p - self.lo[1]


# -- rsync ------------------------------------------------------------------------------------


def start_rsyncd(work: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    dst = work / "rsync-dst"
    dst.mkdir()
    conf = work / "rsyncd.conf"
    who = "uid = root\ngid = root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"use chroot = no\nlog file = {work / 'rsyncd.log'}\n"
                    f"[dst]\npath = {dst}\nread only = no\n{who}")
    port = free_port()
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                             "--address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port, dst
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"the rsync daemon did not start; see {work / 'rsyncd.log'}") from None
            time.sleep(0.05)


def rsync(src: Path, port: int, opts: list[str], step: Step) -> None:
    cmd = ["rsync", "-a", "--stats", *opts, f"{src}/", f"rsync://127.0.0.1:{port}/dst/"]
    with Timed(step):
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")

    def stat(label: str) -> int:
        m = re.search(rf"^{label}: ([\d,.]+)", out.stdout, re.M)
        return int(m.group(1).replace(",", "").replace(".", "")) if m else 0

    step.own_bytes = stat("Total bytes sent") + stat("Total bytes received")
    step.extra = {"literal": stat("Literal data"), "matched": stat("Matched data")}


# -- clusterrep -------------------------------------------------------------------------------

SYNC_DONE = re.compile(r"synchronisation (\w+) done: \{.*'bytes_sent': (\d+)")


def sync_bytes(cluster: LocalCluster, sync_id: str | None) -> int:
    """The coordinator's ``bytes_sent`` for sync ``sync_id`` (None: the first one logged)."""
    deadline = time.monotonic() + 10
    while True:
        text = (cluster.logs / "coordinator.log").read_text(errors="replace")
        for m in SYNC_DONE.finditer(text):
            if sync_id is None or m.group(1) == sync_id:
                return int(m.group(2))
        if time.monotonic() > deadline:
            return -1
        time.sleep(0.2)


def cr_fullcopy(cluster: LocalCluster, timeout: float, step: Step) -> None:
    with Timed(step):
        cluster.start()
        ok, why, st = cluster.wait(timeout)
    if not ok:
        raise SystemExit(f"clusterrep: the first synchronisation did not finish: {why}")
    step.own_bytes = sync_bytes(cluster, None)
    step.extra = {"last_sync": st.get("last_sync") or {}}


def cr_resync(cluster: LocalCluster, timeout: float, step: Step) -> None:
    t0 = time.monotonic()
    cluster.start_coordinator()
    step.extra["coordinator_start"] = time.monotonic() - t0
    settle()
    cmd = [sys.executable, "-m", "clusterrep", "sync", "--coordinator", cluster.coordinator_addr,
           "--token-file", str(cluster.token_file), "--timeout", str(timeout)]
    with Timed(step):
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"clusterrep sync failed ({out.returncode}):\n{out.stderr[-2000:]}")
    m = re.search(r"\b(?:sync|synchronisation) ([0-9a-f]+)\b", out.stderr)  # "... <id> asked for"
    step.own_bytes = sync_bytes(cluster, m.group(1)) if m else -1
    step.extra["last_sync"] = cluster.status().get("last_sync") or {}


def log_problems(cluster: LocalCluster) -> list[str]:
    out = []
    for log in sorted(cluster.logs.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line):
                out.append(f"{log.name}: {line[:200]}")
    return out


# -- main -------------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> int:
    rng = random.Random(args.seed)
    cluster = LocalCluster(work / "cluster", nodes=())
    src = cluster.volume
    files = plan_files(args.total_mib * MiB, rng)
    t0 = time.monotonic()
    make_data(src, files, args.seed)
    total = sum(s for _, s in files)
    print(f"data set: {len(files)} files, {total / MiB:.0f} MiB ({IMAGES} images of "
          f"{files[0][1] / MiB:.0f} MiB), made in {time.monotonic() - t0:.1f} s", file=sys.stderr)

    steps = {k: Step() for k in ("rs_full", "cr_full", "rs_re", "cr_re")}
    daemon, port, dst = start_rsyncd(work)
    try:
        settle()
        rsync(src, port, [], steps["rs_full"])
        print(f"rsync full copy: {steps['rs_full'].seconds:.1f} s", file=sys.stderr)
        settle()
        cr_fullcopy(cluster, args.timeout, steps["cr_full"])
        print(f"clusterrep full copy: {steps['cr_full'].seconds:.1f} s", file=sys.stderr)

        cluster.stop_process("coordinator")
        what = change(src, files, rng)
        print(f"change: {what['aligned']} x 4 KiB aligned + {what['unaligned']} x 100 B unaligned "
              f"writes, {what['bytes'] / 1024:.0f} KiB in {what['files']} files, "
              f"{what['blocks_touched']} of {what['blocks']} 64 KiB blocks", file=sys.stderr)
        settle()
        rsync(src, port, ["--inplace", "--no-whole-file"], steps["rs_re"])
        print(f"rsync re-sync: {steps['rs_re'].seconds:.1f} s", file=sys.stderr)
        cr_resync(cluster, args.timeout, steps["cr_re"])
        print(f"clusterrep re-sync: {steps['cr_re'].seconds:.1f} s", file=sys.stderr)

        diffs_rs = list(compare_trees(src, dst))
        diffs_cr = cluster.verify()
        problems = log_problems(cluster)
    finally:
        cluster.stop()
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()

    for name, diffs in (("rsync copy", diffs_rs), ("clusterrep replica", diffs_cr)):
        print(f"verify {name}: " + ("identical to the volume" if not diffs else
                                    f"{len(diffs)} differences, e.g. {'; '.join(map(str, diffs[:3]))}"))
    if problems:
        print(f"clusterrep logs: {len(problems)} warning/error lines, e.g.:")
        for line in problems[:5]:
            print(f"  {line}")

    s = steps
    where = "own network namespace" if args.in_netns else "shared loopback: others' traffic counts too"
    print(f"\n{total / MiB:.0f} MiB in {len(files)} files; change: {what['blocks_touched']} blocks "
          f"({what['bytes'] / 1024:.0f} KiB) in {what['files']} files; page cache "
          f"{'dropped' if _drop_ok else 'NOT dropped'} before each step; lo: {where}")
    print(f"{'':34} {'rsync':>12} {'clusterrep':>12} {'cr/rsync':>9}")

    def row(label: str, a: float, b: float, fmt: str) -> None:
        ratio = f"{b / a:9.2f}" if a > 0 and b >= 0 else f"{'-':>9}"
        print(f"{label:34} {a:>12{fmt}} {b:>12{fmt}} {ratio}")

    for tag, label in (("full", "full copy"), ("re", "re-sync 1 %")):
        a, b = s[f"rs_{tag}"], s[f"cr_{tag}"]
        row(f"{label}: seconds, incl. sync", a.seconds, b.seconds, ".2f")
        row(f"{label}: MiB, tool's count", a.own_bytes / MiB, b.own_bytes / MiB, ".2f")
        row(f"{label}: MiB, lo payload est.", a.lo_payload / MiB, b.lo_payload / MiB, ".2f")
        row(f"{label}: lo packets", a.lo_packets, b.lo_packets, ",.0f")
    full_ls, re_ls = s["cr_full"].extra["last_sync"], s["cr_re"].extra["last_sync"]
    print(f"rsync literal/matched data: full {s['rs_full'].extra['literal'] / MiB:.2f}/"
          f"{s['rs_full'].extra['matched'] / MiB:.2f} MiB, re-sync {s['rs_re'].extra['literal'] / MiB:.2f}/"
          f"{s['rs_re'].extra['matched'] / MiB:.2f} MiB")
    print(f"clusterrep last_sync: full {full_ls.get('bytes', 0) / MiB:.2f} MiB in "
          f"{full_ls.get('seconds', 0):.2f} s; re-sync {re_ls.get('bytes', 0) / MiB:.2f} MiB in "
          f"{re_ls.get('seconds', 0):.2f} s, {re_ls.get('files_done', 0)} files compared; "
          f"coordinator restart (not timed) {s['cr_re'].extra['coordinator_start']:.2f} s")
    print(f"full copy throughput: rsync {total / s['rs_full'].seconds / 1e6:.0f} MB/s, "
          f"clusterrep {total / s['cr_full'].seconds / 1e6:.0f} MB/s")
    print(f"resync_time_ratio={s['cr_re'].seconds / s['rs_re'].seconds:.3f} "
          f"resync_bytes_ratio={s['cr_re'].lo_payload / max(s['rs_re'].lo_payload, 1):.3f} "
          f"fullcopy_time_ratio={s['cr_full'].seconds / s['rs_full'].seconds:.3f}")
    return 0 if not diffs_rs and not diffs_cr else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total-mib", type=int, default=2048, help="size of the data set (default 2048)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the data set and the change (default 1)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for a sync (default 3600)")
    ap.add_argument("--dir", default=None, help="where to make the work directory (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (it is printed)")
    ap.add_argument("--no-netns", dest="netns", action="store_false",
                    help="do not run in a network namespace of its own (lo counters then include "
                         "every other program's loopback traffic)")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is missing: apt-get install rsync")
    if args.in_netns:
        bring_lo_up()
    elif args.netns and os.geteuid() == 0 and shutil.which("unshare") and subprocess.run(
            ["unshare", "--net", "true"], capture_output=True).returncode == 0:
        return subprocess.run(["unshare", "--net", "--", sys.executable, os.path.abspath(__file__),
                               *argv, "--in-netns"]).returncode
    else:
        print("note: not in a network namespace of its own: loopback byte counts include other "
              "programs' traffic", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="cr-rsync-", dir=args.dir))
    try:
        return run(args, work)
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
