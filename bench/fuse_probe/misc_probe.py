#!/usr/bin/env python3
"""Small API/behaviour probes for mfusepy on this machine. Prints one JSON object.

 * which libfuse mfusepy picks with/without FUSE_LIBRARY_PATH / FUSE_LIBRARY_NAME
 * -o big_writes and -o max_write=131072 on libfuse 3
 * renameat2(RENAME_EXCHANGE / RENAME_NOREPLACE) through the mount, with and without
   --fuse3-fixes
 * ftruncate() on an unlinked-but-open file (hard_remove): what truncate() receives
 * mmap(MAP_SHARED) writes: when do they reach the write handler, with what sizes
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PT = os.path.join(HERE, "passthrough.py")
BASE = "/var/tmp/fuse_probe_misc"
sys.path.insert(0, HERE)


def mounted(p: str) -> bool:
    return any(line.split()[1] == p for line in open("/proc/self/mounts"))


def mount(extra: list[str], name: str):
    back, mnt = f"{BASE}/back", f"{BASE}/mnt"
    shutil.rmtree(back, ignore_errors=True)
    os.makedirs(back)
    os.makedirs(mnt, exist_ok=True)
    log = open(f"{BASE}/{name}.log", "w")
    p = subprocess.Popen([sys.executable, PT, back, mnt, "--stats", f"{BASE}/stats.json",
                          "--log-writes", f"{BASE}/{name}.writes", *extra], stdout=log, stderr=log)
    t0 = time.time()
    while not mounted(mnt):
        if p.poll() is not None:
            return None, back, mnt, open(f"{BASE}/{name}.log").read()[-400:]
        if time.time() - t0 > 10:
            break
        time.sleep(0.05)
    return p, back, mnt, ""


def umount(p, mnt):
    subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
    if p is not None:
        p.wait(timeout=10)


def stats():
    time.sleep(0.6)
    return json.load(open(f"{BASE}/stats.json"))


def main() -> None:
    os.makedirs(BASE, exist_ok=True)
    out: dict = {}
    probe = "import mfusepy as m; print(m._libfuse_path, m.fuse_version_major, m.fuse_version_minor)"
    for label, env in [("no env", {}), ("FUSE_LIBRARY_NAME=fuse3", {"FUSE_LIBRARY_NAME": "fuse3"}),
                       ("FUSE_LIBRARY_PATH=libfuse3.so.3", {"FUSE_LIBRARY_PATH": "libfuse3.so.3"})]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("FUSE_LIBRARY")}
        e.update(env)
        r = subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True)
        out[f"lib[{label}]"] = (r.stdout or r.stderr).strip()[-200:]

    # big_writes on libfuse3
    p, back, mnt, err = mount(["-o", "big_writes"], "bigw")
    out["fuse3 -o big_writes"] = ("mounted" if p and mounted(mnt)
                                  else f"FAILED: {open(f'{BASE}/bigw.log').readline().strip()}")
    umount(p, mnt)

    # max_write=131072
    p, back, mnt, err = mount(["-o", "max_write=131072"], "mw")
    if not p:
        out["fuse3 -o max_write=131072"] = f"FAILED: {open(f'{BASE}/mw.log').readline().strip()}"
    else:
        with open(f"{mnt}/f", "wb") as f:
            f.write(b"x" * (4 << 20))
        st = stats()
        out["fuse3 -o max_write=131072: conn.max_write, max req"] = [st["init"]["max_write"], st["max_req"]]
    umount(p, mnt)

    # renameat2
    from fuse3_fixes import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
    for extra in ([], ["--fuse3-fixes"]):
        p, back, mnt, err = mount(extra, "ren")
        for n, d in (("a", b"AAAA"), ("b", b"BBBB")):
            with open(f"{mnt}/{n}", "wb") as f:
                f.write(d)
        res = {}
        try:
            renameat2(-100, f"{mnt}/a", -100, f"{mnt}/b", RENAME_EXCHANGE)
            res["EXCHANGE rc"] = 0
        except OSError as e:
            res["EXCHANGE rc"] = e.strerror
        res["after EXCHANGE"] = {n: open(f"{back}/{n}", "rb").read().decode() if os.path.exists(f"{back}/{n}")
                                 else None for n in ("a", "b")}
        with open(f"{mnt}/c", "wb") as f:
            f.write(b"CCCC")
        try:
            renameat2(-100, f"{mnt}/c", -100, f"{mnt}/b", RENAME_NOREPLACE)
            res["NOREPLACE onto existing"] = "succeeded (clobbered!)"
        except OSError as e:
            res["NOREPLACE onto existing"] = e.strerror
        out[f"renameat2 {'with --fuse3-fixes' if extra else 'plain mfusepy'}"] = res
        umount(p, mnt)

    # ftruncate of an unlinked, open file (hard_remove -> path None)
    for extra in ([], ["--fuse3-fixes"]):
        p, back, mnt, err = mount(["-o", "hard_remove", *extra], "trunc")
        fd = os.open(f"{mnt}/t", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"x" * 100)
        os.unlink(f"{mnt}/t")
        try:
            os.ftruncate(fd, 10)
            r = f"ok, fstat size={os.fstat(fd).st_size}"
        except OSError as e:
            r = f"error {e.strerror}"
        os.close(fd)
        out[f"ftruncate unlinked open file {'with fixes' if extra else 'plain'}"] = r
        # ftruncate on a normal open file: does the handler get fh?
        umount(p, mnt)

    # mmap shared writes
    p, back, mnt, err = mount([], "mmap")
    fd = os.open(f"{mnt}/m", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 1 << 20)
    mm = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mm[0:5] = b"hello"
    mm[500000:500005] = b"world"
    n0 = stats()["n_writes"]
    mm.flush()  # msync
    n1 = stats()
    mm.close()
    os.close(fd)
    out["mmap MAP_SHARED"] = {"writes before msync": n0, "writes after msync": n1["n_writes"],
                              "hist": n1["hist"],
                              "backing has data": open(f"{back}/m", "rb").read(5) == b"hello"}
    umount(p, mnt)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
