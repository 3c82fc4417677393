#!/usr/bin/env python3
"""fio benchmark: raw dir vs bindfs vs the mfusepy pass-through (with/without capture).

Usage:
    python3 run_bench.py [--base /var/tmp/fuse_probe_bench] [--runtime 10] [--size 256M]
                         [--configs raw,bindfs,...] [--out results.json]

Needs: fio, bindfs, fuse3 (fusermount3), mfusepy. Run as root (or with /dev/fuse access).
Each (config, workload, numjobs) gets a fresh mount and fresh files; prints a table and
writes all raw numbers (fio JSON summary + pass-through request-size stats) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PT = os.path.join(HERE, "passthrough.py")
PT3 = os.path.join(HERE, "pyfuse3_passthrough.py")
TCK = os.sysconf("SC_CLK_TCK")

# name -> (kind, extra args)
CONFIGS = {
    "raw": ("raw", []),
    "bindfs": ("bindfs", ["-o", "big_writes"]),
    "bindfs-mt": ("bindfs", ["--multithreaded", "-o", "big_writes"]),
    "py": ("py", ["--capture", "none"]),
    "py-meta": ("py", ["--capture", "meta"]),
    "py-data": ("py", ["--capture", "data"]),
    "py-spool": ("py", ["--capture", "spool"]),
    "py-shared": ("py", ["--capture", "none", "-o", "attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-shared-data": ("py", ["--capture", "data", "-o", "attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-dio": ("py", ["--capture", "none", "-o", "direct_io,attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-dio-data": ("py", ["--capture", "data", "-o", "direct_io,attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-1thread": ("py", ["--capture", "none", "--nothreads"]),
    "py-1thread-meta": ("py", ["--capture", "meta", "--nothreads"]),
    "py-1thread-data": ("py", ["--capture", "data", "--nothreads"]),
    "py-1thread-spool": ("py", ["--capture", "spool", "--nothreads"]),
    "py-1thread-shared": ("py", ["--capture", "none", "--nothreads", "-o", "attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-1thread-shared-data": ("py", ["--capture", "data", "--nothreads", "-o", "attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-1thread-dio-data": ("py", ["--capture", "data", "--nothreads", "-o", "direct_io,attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-1thread-shared-zc-meta": ("py", ["--capture", "meta", "--nothreads", "--zerocopy", "-o", "attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-1thread-shared-zc-data": ("py", ["--capture", "data", "--nothreads", "--zerocopy", "-o", "attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-1thread-shared-zc": ("py", ["--capture", "none", "--nothreads", "--zerocopy", "-o", "attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "py-1thread-shared-dio-zc-data": ("py", ["--capture", "data", "--nothreads", "--zerocopy", "-o", "direct_io,attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove"]),
    "pyfuse3": ("pyfuse3", ["--timeout", "0"]),
    "pyfuse3-data": ("pyfuse3", ["--timeout", "0", "--capture", "data"]),
    "py-mt1": ("py", ["--capture", "none", "-o", "max_idle_threads=1"]),
    "py-mt1-data": ("py", ["--capture", "data", "-o", "max_idle_threads=1"]),
}

WORKLOADS = {
    "rand4k": ["--rw=randwrite", "--bs=4k"],
    "seq1m": ["--rw=write", "--bs=1M"],
}


def fio_cmd(directory: str, wl: str, numjobs: int, runtime: int, size: str) -> list[str]:
    return [
        "fio", f"--name={wl}", f"--directory={directory}", *WORKLOADS[wl],
        f"--size={size}", f"--numjobs={numjobs}", "--ioengine=psync", "--direct=0",
        "--end_fsync=1", "--time_based", f"--runtime={runtime}", "--fallocate=none",
        "--group_reporting", "--output-format=json",
    ]


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def wait_mounted(path: str, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if is_mounted(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"mount process exited rc={proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} not mounted after {timeout}s")


def unmount(path: str, prog: str, proc: subprocess.Popen | None) -> None:
    for _ in range(50):
        if not is_mounted(path):
            break
        r = subprocess.run([prog, "-u", path], capture_output=True, text=True)
        if r.returncode == 0:
            break
        time.sleep(0.2)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()  # only our own child
            proc.wait(timeout=5)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def cpu_busy_fraction(interval: float = 1.0) -> float:
    def snap():
        with open("/proc/stat") as f:
            v = list(map(int, f.readline().split()[1:]))
        idle = v[3] + v[4]
        return sum(v), idle
    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def foreign_procs(base: str) -> list[str]:
    """Other benchmark-ish processes on this (shared, 2-core) machine."""
    me = os.getpid()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cmd.startswith("fio ") and base not in cmd) or "clusterrep" in cmd:
            out.append(f"{pid}:{cmd[:80]}")
    return out


def wait_quiet(base: str, max_wait: float = 600.0) -> float:
    t0 = time.time()
    quiet = 0
    while time.time() - t0 < max_wait:
        if not foreign_procs(base) and cpu_busy_fraction(1.0) < 0.10:
            quiet += 1
            if quiet >= 2:
                break
        else:
            quiet = 0
    return time.time() - t0


class Watcher:
    def __init__(self, base: str) -> None:
        import threading
        self.base = base
        self.seen: set = set()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.seen.update(foreign_procs(self.base))

    def done(self) -> list[str]:
        self.stop.set()
        self.t.join()
        return sorted(self.seen)


def run_one(base: str, cfg: str, wl: str, numjobs: int, runtime: int, size: str) -> dict:
    kind, extra = CONFIGS[cfg]
    back = os.path.join(base, "back")
    mnt = os.path.join(base, "mnt")
    for d in (back, mnt):
        if is_mounted(d):
            subprocess.run(["fusermount3", "-u", d])
            subprocess.run(["fusermount", "-u", d])
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    subprocess.run(["sync"])
    stats_path = os.path.join(base, "stats.json")
    if os.path.exists(stats_path):
        os.unlink(stats_path)
    proc = None
    target = back
    umount_prog = "fusermount3"
    log = open(os.path.join(base, f"mount-{cfg}.log"), "a")
    if kind == "bindfs":
        # bindfs forks into the background unless -f; keep -f so we own the pid
        proc = subprocess.Popen(["bindfs", "-f", "--no-allow-other", *extra, back, mnt],
                                stdout=log, stderr=log)
        umount_prog = "fusermount"  # libfuse2 (fusermount3 also works for unmount)
        target = mnt
    elif kind in ("py", "pyfuse3"):
        proc = subprocess.Popen([sys.executable, PT if kind == "py" else PT3, back, mnt,
                                 "--stats", stats_path, *extra], stdout=log, stderr=log)
        target = mnt
    if proc is not None:
        wait_mounted(mnt, proc)
    waited = wait_quiet(base)
    cpu0 = cpu_seconds(proc.pid) if proc else 0.0
    cmd = fio_cmd(target, wl, numjobs, runtime, size)
    watcher = Watcher(base)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    foreign = watcher.done()
    cpu1 = cpu_seconds(proc.pid) if proc else 0.0
    res: dict = {"config": cfg, "workload": wl, "numjobs": numjobs, "cmd": " ".join(cmd),
                 "wall_s": round(wall, 2), "daemon_cpu_s": round(cpu1 - cpu0, 2),
                 "waited_for_quiet_s": round(waited, 1), "contended": foreign}
    if r.returncode != 0:
        res["error"] = r.stderr[-2000:]
    else:
        j = json.loads(r.stdout[r.stdout.index("{"):])
        w = j["jobs"][0]["write"]
        res.update(iops=round(w["iops"]), bw_MBps=round(w["bw_bytes"] / 1e6, 1),
                   io_MB=round(w["io_bytes"] / 1e6), runtime_ms=w["runtime"],
                   clat_mean_us=round(w["clat_ns"]["mean"] / 1000, 1),
                   clat_p99_us=round(w["clat_ns"]["percentile"].get("99.000000", 0) / 1000, 1))
        sync = j["jobs"][0].get("sync", {})
        if sync.get("total_ios"):
            res["fsync_lat_ms"] = round(sync["lat_ns"]["mean"] / 1e6, 1)
    if proc is not None:
        unmount(mnt, umount_prog, proc)
        if kind in ("py", "pyfuse3") and os.path.exists(stats_path):
            st = json.load(open(stats_path))
            hist = st["hist"]
            top = sorted(hist.items(), key=lambda kv: -kv[1])[:4]
            res.update(req_max=st["max_req"], req_min=st.get("min_req"), req_n=st["n_writes"],
                       req_top={k: v for k, v in top}, ops=st.get("ops"))
    shutil.rmtree(back, ignore_errors=True)
    return res


def summarize(results: list[dict]) -> None:
    import statistics
    groups: dict = {}
    for r in results:
        groups.setdefault((r["config"], r["workload"], r["numjobs"]), []).append(r)
    print(f"\n{'config':30} {'workload':8} {'nj':>2} {'IOPS median [min-max]':>26} "
          f"{'MB/s median':>11} {'cpu_s':>6} {'req_max':>8}")
    for (cfg, wl, nj), rs in groups.items():
        rs = [r for r in rs if not r.get("contended")] or rs
        iops = sorted(r.get("iops", 0) for r in rs)
        bw = statistics.median(r.get("bw_MBps", 0) for r in rs)
        cpu = statistics.median(r["daemon_cpu_s"] for r in rs)
        rm = max((r.get("req_max", 0) for r in rs), default=0) or ""
        print(f"{cfg:30} {wl:8} {nj:>2} {statistics.median(iops):>9.0f} [{iops[0]}-{iops[-1]}]".ljust(71)
              + f" {bw:>11.1f} {cpu:>6.2f} {rm:>8}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="/var/tmp/fuse_probe_bench")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--configs", default="raw,bindfs,bindfs-mt,py,py-meta,py-data,py-spool,py-shared,py-dio")
    ap.add_argument("--workloads", default="rand4k,seq1m")
    ap.add_argument("--numjobs", default="1,2")
    ap.add_argument("--out", default="/tmp/fuse_probe_results.json")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, interleaved over configs")
    a = ap.parse_args()
    os.makedirs(a.base, exist_ok=True)
    results = []
    for rep in range(a.reps):
        for cfg in a.configs.split(","):
            for wl in a.workloads.split(","):
                for nj in map(int, a.numjobs.split(",")):
                    res = run_one(a.base, cfg, wl, nj, a.runtime, a.size)
                    for _retry in range(3):
                        if not res["contended"]:
                            break
                        print("# contended, re-running:", res["contended"][:2], flush=True)
                        res = run_one(a.base, cfg, wl, nj, a.runtime, a.size)
                    res["rep"] = rep
                    results.append(res)
                    print(json.dumps(res), flush=True)
                    json.dump(results, open(a.out, "w"), indent=1)
    if a.reps > 1:
        summarize(results)
        return
    print()
    print(f"{'config':16} {'workload':8} {'nj':>2} {'IOPS':>8} {'MB/s':>8} {'clat_us':>8} "
          f"{'p99_us':>8} {'cpu_s':>6} {'req_max':>8}")
    for r in results:
        print(f"{r['config']:16} {r['workload']:8} {r['numjobs']:>2} {r.get('iops', 'ERR'):>8} "
              f"{r.get('bw_MBps', ''):>8} {r.get('clat_mean_us', ''):>8} {r.get('clat_p99_us', ''):>8} "
              f"{r['daemon_cpu_s']:>6} {r.get('req_max', ''):>8}")


if __name__ == "__main__":
    main()
