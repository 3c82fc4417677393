#!/usr/bin/env python3
"""Benchmark: metadata operations through a node mount, against real peers in the same run.

One round per file: create and write 4 KiB, chmod, chown, set an extended attribute, rename,
hard-link, truncate, unlink both names. Run on (a) the raw volume directory, (b) bindfs over it
(a native FUSE pass-through), (c) a clusterrep node mount (every operation decided by the
coordinator and replicated), and for (c) also timed until ``wait`` says the replica holds it
all. Prints operations per second and the ratios c/b and c/a; the last line is
machine-readable: ``meta_vs_bindfs=<f> meta_vs_raw=<f> e2e_ops_per_s=<f>``.
Needs root, FUSE 3 and bindfs (``apt-get install fuse3 bindfs``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from clusterrep.localcluster import LocalCluster

OPS_PER_FILE = 9


def mix(directory: Path, files: int) -> float:
    """Run the mix in ``directory``; return seconds."""
    start = time.monotonic()
    for i in range(files):
        p = directory / f"f{i}"
        with open(p, "wb") as f:
            f.write(b"x" * 4096)
        os.chmod(p, 0o640)
        os.chown(p, 4242, 4242)
        os.setxattr(p, "user.bench", b"v")
        os.rename(p, directory / f"g{i}")
        os.link(directory / f"g{i}", directory / f"h{i}")
        os.truncate(directory / f"h{i}", 100)
        os.unlink(directory / f"g{i}")
        os.unlink(directory / f"h{i}")
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=300, help="files per run (default 300)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, best counts (default 2)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-meta-"))
    best: dict[str, float] = {}
    try:
        raw = work / "raw"
        raw.mkdir()
        mnt = work / "bindfs"
        mnt.mkdir()
        subprocess.run(["bindfs", str(raw), str(mnt)], check=True)
        try:
            with LocalCluster(work / "cluster", nodes=("h1",)).start() as c:
                for r in range(args.repeat):
                    for name, where in (("raw", raw), ("bindfs", mnt), ("clusterrep", c.mount("h1"))):
                        d = Path(where) / f"run{r}"
                        d.mkdir()
                        start = time.monotonic()
                        seconds = mix(d, args.files)
                        if name == "clusterrep":  # and until the replica holds it all
                            ok, why, _ = c.wait(300)
                            assert ok, why
                            best["e2e"] = min(best.get("e2e", 1e9), time.monotonic() - start)
                        best[name] = min(best.get(name, 1e9), seconds)
                        shutil.rmtree(d)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ops = args.files * OPS_PER_FILE
    rate = {k: ops / v for k, v in best.items()}
    for k in ("raw", "bindfs", "clusterrep"):
        print(f"{k:11} {rate[k]:9.0f} operations/s")
    print(f"clusterrep/bindfs {rate['clusterrep'] / rate['bindfs']:.3f}  "
          f"clusterrep/raw {rate['clusterrep'] / rate['raw']:.4f}")
    print(f"meta_vs_bindfs={rate['clusterrep'] / rate['bindfs']:.3f} "
          f"meta_vs_raw={rate['clusterrep'] / rate['raw']:.4f} e2e_ops_per_s={rate['e2e']:.0f}")


if __name__ == "__main__":
    main()
