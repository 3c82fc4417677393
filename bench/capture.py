#!/usr/bin/env python3
"""Benchmark: the cost of capture, measured with fio against real peers in the same run.

For 4 KiB random writes (IOPS) and 1 MiB sequential writes (MB/s), on:

  (a) the raw volume directory,
  (b) bindfs over it (a native FUSE pass-through; ``-o big_writes`` where supported),
  (c) a clusterrep node mount (capture on: every write recorded and spooled),
  (d) end to end: the same job on a clusterrep mount, timed until ``wait`` says the replica
      has applied everything.

Every configuration runs ``--repeat`` times, interleaved, and the best figure of each counts.
Prints each figure and the ratios c/b, c/a and d/c. The last line is machine-readable:
``rand_vs_bindfs=<f> seq_vs_bindfs=<f> e2e_vs_capture=<f>``.
Needs root, FUSE 3, fio and bindfs (``apt-get install fuse3 libfuse3-dev fio bindfs``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clusterrep.localcluster import LocalCluster

JOBS = {
    "rand": ["--rw=randwrite", "--bs=4k"],
    "seq": ["--rw=write", "--bs=1m"],
}


def fio(job: str, directory: Path, size_mib: int, runtime: float) -> dict[str, float]:
    """Run one fio job in ``directory``; return iops, MB/s, bytes and seconds."""
    args = ["fio", f"--name={job}", f"--directory={directory}", "--ioengine=psync", "--direct=0",
            f"--size={size_mib}m", "--numjobs=1", "--end_fsync=1", "--output-format=json",
            "--randrepeat=0", *JOBS[job]]
    if runtime:
        args += [f"--runtime={runtime}", "--time_based"]
    # every job starts with no dirty pages: writeback left by the previous job would otherwise
    # land on whichever configuration runs next (it cost one run 40 % of its throughput)
    os.sync()
    time.sleep(1.0)
    start = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - start
    w = json.loads(out.stdout)["jobs"][0]["write"]
    return {"iops": w["iops"], "mbps": w["bw_bytes"] / 1e6, "bytes": w["io_bytes"],
            "ios": w["total_ios"], "seconds": elapsed}


def bindfs_mount(src: Path, mnt: Path) -> list[str]:
    mnt.mkdir(parents=True, exist_ok=True)
    for opts in (["-o", "big_writes"], []):
        r = subprocess.run(["bindfs", *opts, str(src), str(mnt)], capture_output=True, text=True)
        if r.returncode == 0:
            return opts
    raise SystemExit(f"bindfs failed: {r.stderr}")


def unmount(mnt: Path) -> None:
    for cmd in (["fusermount3", "-u", str(mnt)], ["fusermount", "-u", str(mnt)], ["umount", str(mnt)]):
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return


def best(results: dict[str, dict[str, dict[str, float]]], config: str, job: str,
         r: dict[str, float]) -> None:
    """Keep the better of ``r`` and what ``results`` holds for (config, job)."""
    key = "iops" if job == "rand" else "mbps"
    have = results.setdefault(config, {}).get(job)
    if have is None or r[key] > have[key]:
        results[config][job] = r


def one_round(work: Path, args: argparse.Namespace,
              results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Every configuration once, keeping the best figures in ``results``; returns the bindfs
    options used."""
    work.mkdir(parents=True)

    def run(job: str, directory: Path) -> dict[str, float]:
        return fio(job, directory, args.size_mib, args.runtime if job == "rand" else 0)

    raw = work / "raw"
    raw.mkdir()
    for job in JOBS:
        best(results, "a", job, run(job, raw))
    shutil.rmtree(raw)

    bsrc, bmnt = work / "bindfs-src", work / "bindfs-mnt"
    bsrc.mkdir()
    opts = bindfs_mount(bsrc, bmnt)
    try:
        for job in JOBS:
            best(results, "b", job, run(job, bmnt))
    finally:
        unmount(bmnt)
    shutil.rmtree(bsrc)

    for job in JOBS:
        with LocalCluster(work / f"cluster-{job}", ("h1",)).start() as cluster:
            mnt = cluster.mount("h1")
            (mnt / "c").mkdir()
            (mnt / "d").mkdir()
            best(results, "c", job, run(job, mnt / "c"))
            ok, why, _ = cluster.wait(timeout=600)
            assert ok, why
            start = time.monotonic()
            r = run(job, mnt / "d")
            ok, why, _ = cluster.wait(timeout=600)
            assert ok, why
            total = time.monotonic() - start
            best(results, "d", job, {"iops": r["ios"] / total, "mbps": r["bytes"] / total / 1e6,
                                     "bytes": r["bytes"], "ios": r["ios"], "seconds": total})
            diffs = cluster.verify()
            assert not diffs, diffs[:5]
    shutil.rmtree(work, ignore_errors=True)
    return opts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="fio file size (default 256)")
    ap.add_argument("--runtime", type=float, default=10, help="seconds per random-write job (default 10)")
    ap.add_argument("--dir", default=None, help="work directory on the disk to test (default: temp)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="run every configuration this many times, interleaved; the best counts "
                         "(default 2: single runs on a virtual disk swing by a factor of two)")
    args = ap.parse_args(argv)
    for tool in ("fio", "bindfs", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install fuse3 libfuse3-dev fio bindfs")

    work = Path(tempfile.mkdtemp(prefix="cr-capture-", dir=args.dir))
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for rep in range(args.repeat):
            opts = one_round(work / f"round-{rep}", args, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    names = {"a": "raw directory", "b": f"bindfs {' '.join(opts)}".strip(),
             "c": "clusterrep capture", "d": "clusterrep end-to-end"}
    print(f"fio psync, {args.size_mib} MiB file, random jobs {args.runtime:g} s, end_fsync=1, "
          f"best of {args.repeat}")
    print(f"{'':24} {'4 KiB rand IOPS':>16} {'1 MiB seq MB/s':>16}")
    for k in "abcd":
        print(f"({k}) {names[k]:20} {results[k]['rand']['iops']:>16,.0f} {results[k]['seq']['mbps']:>16,.1f}")
    r = {f"{x}{y}_{job}": results[x][job]["iops" if job == "rand" else "mbps"] /
         results[y][job]["iops" if job == "rand" else "mbps"]
         for x, y in (("c", "b"), ("c", "a"), ("d", "c")) for job in JOBS}
    print(f"c/b: rand {r['cb_rand']:.2f}  seq {r['cb_seq']:.2f}   (goal >= 2.0 and >= 1.0)")
    print(f"c/a: rand {r['ca_rand']:.2f}  seq {r['ca_seq']:.2f}")
    print(f"d/c: rand {r['dc_rand']:.2f}  seq {r['dc_seq']:.2f}   (goal >= 0.5)")
    print(f"rand_vs_bindfs={r['cb_rand']:.3f} seq_vs_bindfs={r['cb_seq']:.3f} "
          f"e2e_vs_capture={min(r['dc_rand'], r['dc_seq']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
