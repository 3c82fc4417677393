#!/usr/bin/env python3
"""Two mounts (A, B) of the same backing dir = two hosts on one shared volume.

For each option set, checks what mount B sees right after mount A changed something:
  c2o_read      : B read the file (page cache warm), A overwrites same size, B re-opens+reads
  open_fd_read  : same, but B keeps its fd open and re-reads (no close-to-open)
  size_stat     : B stat()s (attrs cached), A appends, B stat()s immediately
  rename_old    : B stat()s old name, A renames old->new, B stat()s old name (want ENOENT)
  rename_new    : ... B stat()s new name (want found; B looked it up as missing before)
  unlink        : B stat()s f, A unlinks f, B stat()s f (want ENOENT)
  create_neg    : B stat()s missing name (negative entry), A creates it, B stat()s (want found)
  hidden        : A holds f open, unlinks it: does a .fuse_hidden* file appear in backing?
  append_race   : A and B both open O_APPEND, alternate 8 writes of 100 bytes each:
                  file must be 1600 bytes with no lost record
Also: write-through check (a write(2) returns only after the daemon's write() ran),
non-OSError / BaseException behaviour, unmount with an open file, and daemon kill.

Usage: python3 consistency.py [--only NAME] [--skip-extra]
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PT = os.path.join(HERE, "passthrough.py")
BASE = "/var/tmp/fuse_probe_cons"

OPTION_SETS = {
    "default": "",
    "kernel_cache": "kernel_cache",
    "timeouts0": "attr_timeout=0,entry_timeout=0,negative_timeout=0",
    "timeouts0+hard_remove": "attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove",
    "direct_io+timeouts0+hard_remove": "direct_io,attr_timeout=0,entry_timeout=0,negative_timeout=0,hard_remove",
}


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


class Mount:
    def __init__(self, back: str, mnt: str, opts: str, extra: list[str] | None = None, name: str = "m"):
        os.makedirs(mnt, exist_ok=True)
        self.mnt = mnt
        self.stats = f"{mnt}.stats.json"
        args = [sys.executable, PT, back, mnt, "--stats", self.stats, *(extra or [])]
        if opts:
            args += ["-o", opts]
        self.log = open(f"{BASE}/{name}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)
        t0 = time.time()
        while not is_mounted(mnt):
            if self.proc.poll() is not None or time.time() - t0 > 10:
                raise RuntimeError(f"mount {mnt} failed, see {BASE}/{name}.log")
            time.sleep(0.05)

    def p(self, rel: str) -> str:
        return os.path.join(self.mnt, rel)

    def umount(self) -> None:
        for _ in range(20):
            if not is_mounted(self.mnt):
                break
            if subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wr(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def rd(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def exists(path: str) -> bool:
    try:
        os.stat(path)
        return True
    except FileNotFoundError:
        return False


def run_set(opts: str) -> dict:
    back = f"{BASE}/back"
    shutil.rmtree(back, ignore_errors=True)
    os.makedirs(back)
    A = Mount(back, f"{BASE}/mntA", opts, name="A")
    B = Mount(back, f"{BASE}/mntB", opts, name="B")
    res: dict = {}
    try:
        # c2o_read: same-size overwrite, B re-opens
        wr(A.p("f1"), b"a" * 4096)
        assert rd(B.p("f1")) == b"a" * 4096
        wr(A.p("f1"), b"b" * 4096, os.O_WRONLY)
        got = rd(B.p("f1"))
        res["c2o_read"] = "fresh" if got == b"b" * 4096 else "STALE"

        # open_fd_read: B keeps fd open
        wr(A.p("f2"), b"a" * 4096)
        fdb = os.open(B.p("f2"), os.O_RDONLY)
        assert os.pread(fdb, 4096, 0) == b"a" * 4096
        wr(A.p("f2"), b"b" * 4096, os.O_WRONLY)
        got = os.pread(fdb, 4096, 0)
        res["open_fd_read"] = "fresh" if got == b"b" * 4096 else "STALE"
        time.sleep(1.2)
        got = os.pread(fdb, 4096, 0)
        res["open_fd_read_after_1.2s"] = "fresh" if got == b"b" * 4096 else "STALE"
        os.close(fdb)

        # size_stat
        wr(A.p("f3"), b"x" * 1000)
        s0 = os.stat(B.p("f3")).st_size
        wr(A.p("f3"), b"y" * 1000, os.O_WRONLY | os.O_APPEND)
        s1 = os.stat(B.p("f3")).st_size
        res["size_stat"] = "fresh" if (s0, s1) == (1000, 2000) else f"STALE({s0}->{s1})"
        # read past cached EOF through an fd that was open before the extension
        fdb = os.open(B.p("f3"), os.O_RDONLY)
        os.stat(B.p("f3"))
        wr(A.p("f3"), b"z" * 1000, os.O_WRONLY | os.O_APPEND)
        got = os.pread(fdb, 10000, 0)
        res["read_past_cached_eof"] = "fresh" if len(got) == 3000 else f"STALE(len={len(got)})"
        os.close(fdb)

        # rename
        wr(A.p("old"), b"1")
        os.stat(B.p("old"))
        res_new_before = exists(B.p("new"))
        os.rename(A.p("old"), A.p("new"))
        res["rename_old"] = "fresh" if not exists(B.p("old")) else "STALE(old still visible)"
        res["rename_new"] = "fresh" if exists(B.p("new")) else "STALE(new missing)"
        assert not res_new_before

        # unlink
        wr(A.p("u"), b"1")
        os.stat(B.p("u"))
        os.unlink(A.p("u"))
        res["unlink"] = "fresh" if not exists(B.p("u")) else "STALE(still visible)"

        # negative entry
        exists(B.p("neg"))
        wr(A.p("neg"), b"1")
        res["create_neg"] = "fresh" if exists(B.p("neg")) else "STALE(negative cached)"

        # hidden files on unlink of an open file
        wr(A.p("h"), b"1")
        fda = os.open(A.p("h"), os.O_RDWR)
        os.unlink(A.p("h"))
        os.pwrite(fda, b"after-unlink", 0)
        hidden = [n for n in os.listdir(back) if n.startswith(".fuse_hidden")]
        res["hidden"] = f"YES {hidden}" if hidden else "no"
        os.close(fda)
        time.sleep(0.2)
        res["hidden_after_close"] = str([n for n in os.listdir(back) if n.startswith(".fuse_hidden")])

        # O_APPEND from two "hosts"
        wr(A.p("ap"), b"")
        fa = os.open(A.p("ap"), os.O_WRONLY | os.O_APPEND)
        fb = os.open(B.p("ap"), os.O_WRONLY | os.O_APPEND)
        for i in range(8):
            os.write(fa, (b"A%02d" % i).ljust(100, b"."))
            os.write(fb, (b"B%02d" % i).ljust(100, b"."))
        os.close(fa)
        os.close(fb)
        data = open(f"{back}/ap", "rb").read()
        recs = {data[i:i + 3] for i in range(0, len(data), 100)}
        ok = len(data) == 1600 and len(recs) == 16
        res["append_race"] = "ok" if ok else f"LOST(len={len(data)}, records={len(recs)})"
    finally:
        A.umount()
        B.umount()
    sa = json.load(open(A.stats))
    res["writeback_cache_wanted"] = sa["init"]["writeback_cache_wanted"]
    return res


def extra_checks() -> dict:
    out: dict = {}
    back = f"{BASE}/back"
    shutil.rmtree(back, ignore_errors=True)
    os.makedirs(back)

    # write-through: the daemon sleeps 0.3 s in write(); the syscall must take >= 0.3 s
    m = Mount(back, f"{BASE}/mntA", "", ["--slow-write", "0.3"], name="slow")
    try:
        fd = os.open(m.p("wt"), os.O_WRONLY | os.O_CREAT, 0o644)
        t0 = time.perf_counter()
        os.write(fd, b"x" * 4096)
        dt = time.perf_counter() - t0
        os.close(fd)
        out["write_syscall_s_with_0.3s_handler"] = round(dt, 3)
    finally:
        m.umount()

    # exceptions
    m = Mount(back, f"{BASE}/mntA", "", name="exc")
    try:
        try:
            wr(m.p("boom-exc1"), b"x")
            out["non_oserror_exception"] = "write returned OK?!"
        except OSError as e:
            out["non_oserror_exception"] = f"app gets {errno.errorcode[e.errno]}"
        wr(m.p("after-exc"), b"x")
        out["mount_alive_after_non_oserror"] = rd(m.p("after-exc")) == b"x"
        try:
            wr(m.p("boom-base1"), b"x")
            out["base_exception"] = "write returned OK?!"
        except OSError as e:
            out["base_exception"] = f"app gets {errno.errorcode[e.errno]}"
        time.sleep(1.0)
        out["daemon_exited_after_base_exception"] = m.proc.poll()
        out["still_in_mounts_after_base_exception"] = is_mounted(m.mnt)
        try:
            os.stat(m.p("after-exc"))
            out["stat_after_base_exception"] = "ok"
        except OSError as e:
            out["stat_after_base_exception"] = errno.errorcode[e.errno]
    finally:
        m.umount()
    log = open(f"{BASE}/exc.log").read()
    out["exc_log_tail"] = log[-600:]

    # unmount while a file is open
    m = Mount(back, f"{BASE}/mntA", "", name="busy")
    fd = os.open(m.p("busy"), os.O_WRONLY | os.O_CREAT, 0o644)
    r = subprocess.run(["fusermount3", "-u", m.mnt], capture_output=True, text=True)
    out["umount_with_open_file"] = f"rc={r.returncode} {r.stderr.strip()}"
    os.close(fd)
    m.umount()

    # daemon killed (SIGKILL) without auto_unmount, then with auto_unmount
    for opts in ("", "auto_unmount"):
        m = Mount(back, f"{BASE}/mntA", opts, name="kill")
        m.proc.kill()
        m.proc.wait()
        time.sleep(0.5)
        try:
            os.stat(m.p("."))
            st = "ok"
        except OSError as e:
            st = errno.errorcode[e.errno]
        key = f"after_SIGKILL[{opts or 'no opts'}]"
        out[key] = f"stat mnt: {st}; still mounted: {is_mounted(m.mnt)}"
        if is_mounted(m.mnt):
            r = subprocess.run(["fusermount3", "-u", m.mnt], capture_output=True, text=True)
            out[key] += f"; fusermount3 -u rc={r.returncode}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    ap.add_argument("--skip-extra", action="store_true")
    a = ap.parse_args()
    os.makedirs(BASE, exist_ok=True)
    allres = {}
    for name, opts in OPTION_SETS.items():
        if a.only and name != a.only:
            continue
        allres[name] = run_set(opts)
        print(name, json.dumps(allres[name]), flush=True)
    if not a.skip_extra:
        allres["extra"] = extra_checks()
        print("extra", json.dumps(allres["extra"], indent=1))
    json.dump(allres, open("/tmp/fuse_probe_consistency.json", "w"), indent=1)


if __name__ == "__main__":
    main()
