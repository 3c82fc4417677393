#!/usr/bin/env python3
"""Benchmark: going back in time -- restore against ``cp -a``, and what keeping history costs.

1. ``restore_vs_cp``: a volume of ``--volume-mib`` (default 1024) MiB of images is taken over
   by a real cluster (coordinator, two nodes with FUSE mounts, a replica with ``--retain``); a
   marker is created (the restore point), then 25 % of the volume's 64 KiB blocks are rewritten
   through a mount. ``clusterrep restore --mark`` of the marker's mark into an empty directory
   (a real process, over the authenticated connection) is timed against ``cp -a`` of the
   volume's tree, both followed by ``sync``. Ratio: cp time / restore time (goal >= 0.8).
2. ``history_apply_ratio``: the real merger and applier apply random 4 KiB overwrites of
   existing image data, with history on (`clusterrep.history`) and off, in the same run; ratio
   of throughputs on / off (goal >= 0.7). Printed too, not in the last line: the same with a
   metadata event (a mark) every 1000 writes.

3. ``failback_bytes_ratio``: a cluster replicated with history loses its site; the latest restore
   point becomes a new volume and cluster; 512 scattered 4 KiB blocks are rewritten there; the
   old site's volume is adopted by the new cluster's replica (``--failback-from``): bytes the
   failback moved against the distinct 4 KiB blocks changed since the failover (goal <= 1.1).

The last line is machine-readable:
``restore_vs_cp=<f> history_apply_ratio=<f> failback_bytes_ratio=<f>``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clusterrep.events import Create, Event, Join, Mkdir, Tick, Write
from clusterrep.history.recorder import Recorder
from clusterrep.history.store import Store
from clusterrep.localcluster import LocalCluster
from clusterrep.replica.applier import Applier
from clusterrep.replica.merger import Merger

MIB = 1 << 20
BLOCK = 4096


# -- 1. restore against cp -a ----------------------------------------------------------------


def _cli(c: LocalCluster, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "clusterrep", *args, "--replica", c.replica_addr,
                        "--token-file", str(c.token_file)], capture_output=True, text=True, check=True)
    return r.stdout


def _timed(cmd: list[str]) -> float:
    os.sync()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    os.sync()
    return time.perf_counter() - start


def bench_restore(work: Path, volume_mib: int, rounds: int) -> tuple[float, float]:
    c = LocalCluster(work / "cluster", replica_args=["--retain", "1h"])
    rng = random.Random(5)
    images = 4
    per = volume_mib // images
    (c.volume / "images").mkdir()
    for i in range(images):
        with open(c.volume / "images" / f"vm{i}.img", "wb") as f:
            for _ in range(per):
                f.write(rng.randbytes(MIB))
    (c.volume / "markers").mkdir()
    try:
        c.start()
        ok, why, _ = c.wait(600)
        assert ok, why
        (c.mount("h1") / "markers" / "m").write_text("")
        ok, why, _ = c.wait(600)
        assert ok, why
        marks = json.loads(_cli(c, "marks", "--json", "--path", "markers/m"))
        gseq = next(m["gseq"] for m in marks if m["kind"] == "create")
        ref = work / "ref"  # the volume at the mark, to check the restore against
        subprocess.run(["cp", "-a", f"{c.volume}/.", str(ref)], check=True)
        chunk = 64 * 1024
        for i in range(images):
            with open(c.mount("h2" if i % 2 else "h1") / "images" / f"vm{i}.img", "r+b") as f:
                for b in rng.sample(range(per * MIB // chunk), per * MIB // chunk // 4):
                    f.seek(b * chunk)
                    f.write(rng.randbytes(chunk))
        ok, why, _ = c.wait(600)
        assert ok, why
        t_restore, t_cp = [], []
        for r in range(rounds):
            out, copy = work / f"restored-{r}", work / f"copy-{r}"
            pair = [("restore", [sys.executable, "-m", "clusterrep", "restore", "--mark", str(gseq),
                                 "--to", str(out), "--quiet", "--replica", c.replica_addr,
                                 "--token-file", str(c.token_file)]),
                    ("cp", ["cp", "-a", str(ref), str(copy)])]
            for name, cmd in (pair if r % 2 == 0 else pair[::-1]):
                (t_restore if name == "restore" else t_cp).append(_timed(cmd))
            same = subprocess.run(["cmp", "-s", str(out / "images" / "vm0.img"),
                                   str(ref / "images" / "vm0.img")])
            assert same.returncode == 0, "the restore is not the volume at the mark"
            shutil.rmtree(out)
            shutil.rmtree(copy)
        return statistics.median(t_restore), statistics.median(t_cp)
    finally:
        c.stop()


# -- 2. the cost of history on the apply path ------------------------------------------------


def _streams(images: int, image_mib: int, writes: int, seed: int,
             mark_every: int = 0) -> tuple[list[Event], list[Event]]:
    """(fill: the images written once, sequentially; overwrite: random 4 KiB writes, with a
    metadata event (a mark) every ``mark_every`` writes if not 0)."""
    rng = random.Random(seed)
    meta: list[Event] = []
    g = 0

    def m(cls: type, **kw: object) -> None:
        nonlocal g
        g += 1
        meta.append(cls(source="coordinator", seq=g, gseq=g, op_id=f"op-{g}", origin="h1", **kw))

    m(Join)
    m(Mkdir, path="vms", mode=0o755)
    for i in range(images):
        m(Create, path=f"vms/{i}.img", mode=0o600)
    seq = 0
    fill: list[Event] = []
    for i in range(images):
        for off in range(0, image_mib * MIB, MIB):
            seq += 1
            fill.append(Write(source="h1", seq=seq, after=g, path=f"vms/{i}.img", offset=off,
                              data=rng.randbytes(MIB)))
    payloads = [rng.randbytes(BLOCK) for _ in range(64)]
    over: list[Event] = []
    for k in range(writes):
        if mark_every and k % mark_every == 0:
            g += 1
            over.append(Mkdir(source="coordinator", seq=g, gseq=g, op_id=f"op-{g}", origin="h1",
                              path=f"d{g}", mode=0o755))
        seq += 1
        over.append(Write(source="h1", seq=seq, after=g, path=f"vms/{rng.randrange(images)}.img",
                          offset=rng.randrange(image_mib * MIB // BLOCK) * BLOCK, data=payloads[k % 64]))
    seq += 1
    over.append(Tick(source="h1", seq=seq, after=g))
    return meta + fill, over


def _apply(work: Path, fill: list[Event], over: list[Event], history: bool, batch: int) -> float:
    target, state = work / "target", work / "state"
    shutil.rmtree(work, ignore_errors=True)
    target.mkdir(parents=True)
    applier = Applier(target, state)
    if history:
        applier.history = Recorder(Store(state / "history"), applier.target)
    merger = Merger()
    merger.add(fill)
    applier.apply(merger.drain())
    applier.checkpoint()
    os.sync()
    start = time.perf_counter()
    for i in range(0, len(over), batch):
        merger.add(over[i:i + batch])
        applier.apply(merger.drain())
    applier.close()
    took = time.perf_counter() - start
    if applier.history is not None:
        applier.history.store.close()
    return took


def bench_history(work: Path, writes: int, rounds: int, mark_every: int = 0) -> tuple[float, float]:
    fill, over = _streams(images=2, image_mib=128, writes=writes, seed=3, mark_every=mark_every)
    on, off = [], []
    for r in range(rounds):
        for hist in ((True, False) if r % 2 == 0 else (False, True)):
            (on if hist else off).append(_apply(work / "apply", fill, over, hist, 256))
    shutil.rmtree(work / "apply", ignore_errors=True)
    return statistics.median(on), statistics.median(off)


def bench_failback(work: Path) -> tuple[int, int, float]:
    """(bytes moved by the failback, bytes of the distinct 4 KiB blocks changed since the
    failover, seconds from site lost to the new cluster running)."""
    a = LocalCluster(work / "site-a", replica_args=["--retain", "1h"])
    (work / "site-b").mkdir()
    b = None
    try:
        a.start()
        (a.mount("h1") / "vm.img").write_bytes(random.Random(7).randbytes(64 * MIB))
        ok, why, _ = a.wait(600)
        assert ok, why
        lost = time.perf_counter()
        for name in ("h1", "h2", "coordinator"):
            a.stop_process(name)
        shutil.copy(a.token_file, work / "site-b" / "token")
        b = LocalCluster(work / "site-b")
        out = _cli(a, "restore", "--latest", "--quiet", "--to", str(b.volume))
        mark = int(out.split()[1].removeprefix("g"))
        b.target = a.volume
        b.replica_args = ["--adopt-target", "--failback-from", a.replica_addr, "--failback-mark", str(mark)]
        b.start_coordinator()
        for node in b.nodes:
            b.start_node(node)
        rto = time.perf_counter() - lost
        rng = random.Random(8)
        blocks = rng.sample(range(64 * MIB // BLOCK), 512)
        with open(b.mount("h1") / "vm.img", "r+b") as f:
            for blk in blocks:
                f.seek(blk * BLOCK)
                f.write(rng.randbytes(BLOCK))
        b.start_replica()
        ok, why, st = b.wait(600)
        assert ok, why
        return int(st["last_sync"]["bytes"]), len(blocks) * BLOCK, rto
    finally:
        if b is not None:
            b.stop()
        a.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume-mib", type=int, default=1024, help="volume size for the restore (1024)")
    ap.add_argument("--writes", type=int, default=100_000, help="4 KiB overwrites applied (100000)")
    ap.add_argument("--rounds", type=int, default=3, help="pairs timed; medians are kept (3)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cr-restore-", dir=args.dir))
    try:
        on, off = bench_history(work, args.writes, args.rounds)
        mib = args.writes * BLOCK / MIB
        print(f"apply, history on   {args.writes / on:10,.0f} writes/s  {mib / on:7.1f} MiB/s")
        print(f"apply, history off  {args.writes / off:10,.0f} writes/s  {mib / off:7.1f} MiB/s")
        on_m, off_m = bench_history(work, args.writes, args.rounds, mark_every=1000)
        print(f"same with a mark every 1000 writes: on {args.writes / on_m:,.0f}, off "
              f"{args.writes / off_m:,.0f} writes/s: ratio {off_m / on_m:.3f}")
        t_restore, t_cp = bench_restore(work, args.volume_mib, args.rounds)
        print(f"restore of {args.volume_mib} MiB at a mark before a 25% rewrite: {t_restore:.2f} s "
              f"({args.volume_mib / t_restore:.0f} MiB/s); cp -a: {t_cp:.2f} s "
              f"({args.volume_mib / t_cp:.0f} MiB/s)")
        moved, changed, rto = bench_failback(work)
        print(f"failback moved {moved} bytes for {changed} bytes of 4 KiB blocks changed since the "
              f"failover; site lost to new cluster running: {rto:.1f} s")
        print(f"restore_vs_cp={t_cp / t_restore:.3f} history_apply_ratio={off / on:.3f} "
              f"failback_bytes_ratio={moved / changed:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
