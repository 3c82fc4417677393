#!/usr/bin/env python3
"""Benchmark: the latency of one 4 KiB write through a node mount at each acknowledgement level.

A single writer does N random 4 KiB ``pwrite`` calls on a node mount started with ``--ack LEVEL``
(async, local, received, replicated), on a cluster of real processes on this machine. Baselines
measured in the same run: the same writes on the raw volume directory, and the raw directory
plus ``fdatasync`` after each write (what a synchronous local disk write costs here).

Prints median and 99th percentile per level; last line: ``<level>_p50_us=<int> ...``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from clusterrep.localcluster import LocalCluster

LEVELS = ("async", "local", "received", "replicated")


def latencies(path: Path, n: int, sync: bool = False) -> list[float]:
    rng = random.Random(1)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 64 << 20)
    out = []
    data = rng.randbytes(4096)
    for _ in range(n):
        off = rng.randrange(16384) * 4096
        t = time.perf_counter()
        os.pwrite(fd, data, off)
        if sync:
            os.fdatasync(fd)
        out.append(time.perf_counter() - t)
    os.close(fd)
    return out


def summary(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1e6, xs[int(len(xs) * 0.99)] * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cr-ack-", dir=args.dir))
    rows: dict[str, tuple[float, float]] = {}
    raw = work / "raw"
    raw.mkdir()
    rows["raw disk"] = summary(latencies(raw / "f", args.writes))
    rows["raw disk + fdatasync"] = summary(latencies(raw / "g", args.writes, sync=True))
    for level in LEVELS:
        with LocalCluster(work / level, ("h1",), node_args=["--ack", level]).start() as c:
            rows[level] = summary(latencies(c.mount("h1") / "vm.img", args.writes))
            ok, why, _ = c.wait(120)
            assert ok, why
    print(f"{args.writes} random 4 KiB pwrite calls, one writer")
    print(f"{'':22} {'p50 us':>10} {'p99 us':>10}")
    for name, (p50, p99) in rows.items():
        print(f"{name:22} {p50:>10,.0f} {p99:>10,.0f}")
    print(" ".join(f"{lv}_p50_us={int(rows[lv][0])}" for lv in LEVELS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
