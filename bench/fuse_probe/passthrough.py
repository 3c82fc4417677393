#!/usr/bin/env python3
"""Minimal mfusepy pass-through on libfuse 3, for probing FUSE behaviour and cost.

Usage:
    python3 passthrough.py BACKING MOUNTPOINT [--capture none|meta|data|spool]
        [-o opt[,opt...]] [--lib fuse3|fuse2|/path/to/libfuse.so] [--nothreads]
        [--stats FILE] [--slow-write SECONDS] [--debug] [--zerocopy]
        [--keep-odirect] [--log-writes FILE]

Runs in the foreground; unmount with `fusermount3 -u MOUNTPOINT` (or
`fusermount -u` when --lib fuse2).

* Paths are resolved relative to an O_PATH fd of BACKING (openat-style, dir_fd=),
  so the process cwd does not matter.
* File handles ARE the real fds of the backing files; read/write are
  os.pread/os.pwrite on fh (no lseek, no lock needed).
* --capture:
    none  : no capture
    meta  : append (seq, path, offset, len) to a per-file list under a per-file lock
    data  : append (seq, path, offset, bytes) likewise; a drainer thread swaps the
            lists out every 100 ms and drops them (simulates hand-off to a shipper)
    spool : append a 24-byte header + data to one spool file (O_APPEND, no fsync)
            under one global lock, from inside the write handler
* --stats FILE: a thread rewrites FILE (JSON) every 0.5 s and at destroy:
  write count, bytes, max/min request size, size histogram, init conn info.
* --slow-write S: sleep S seconds inside write() (to prove write-through).
* --zerocopy: patch mfusepy's FUSE.write so the handler gets a memoryview over
  libfuse's request buffer instead of a bytes copy (valid only during the call;
  capture=data then copies with bytes(mv)).
* O_DIRECT is stripped from open/create flags (like bindfs) unless --keep-odirect:
  the kernel forwards the app's O_DIRECT, and pwrite() of mfusepy's unaligned bytes
  buffer to an O_DIRECT backing fd fails with EINVAL.
* --log-writes FILE: append "path offset len written" per write (debug only).
* --fuse3-fixes: see fuse3_fixes.py (rename flags, truncate fh).
* Files named 'boom-exc*' raise RuntimeError in write(); 'boom-base*' raise
  SystemExit in write() (to see what mfusepy does with each).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import struct
import sys
import threading
import time

# ---------------------------------------------------------------------------
# Library selection MUST happen before `import mfusepy`: mfusepy calls
# find_library('fuse') first, which finds libfuse.so.2 as soon as any libfuse2
# package (e.g. bindfs, sshfs on Debian 12) is installed -> silently FUSE 2 API.
# ---------------------------------------------------------------------------
LIBS = {
    "fuse3": "libfuse3.so.3",
    "fuse2": "libfuse.so.2",
}


def _select_lib(argv: list[str]) -> None:
    lib = "fuse3"
    for i, a in enumerate(argv):
        if a == "--lib" and i + 1 < len(argv):
            lib = argv[i + 1]
        elif a.startswith("--lib="):
            lib = a.split("=", 1)[1]
    os.environ["FUSE_LIBRARY_PATH"] = LIBS.get(lib, lib)


_select_lib(sys.argv)
import mfusepy as fuse  # noqa: E402

FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_ASYNC_READ = 1 << 0
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_SPLICE_READ = 1 << 9
FUSE_CAP_PARALLEL_DIROPS = 1 << 18
CAP_NAMES = {
    0: "ASYNC_READ", 1: "POSIX_LOCKS", 3: "ATOMIC_O_TRUNC", 4: "EXPORT_SUPPORT",
    6: "DONT_MASK", 7: "SPLICE_WRITE", 8: "SPLICE_MOVE", 9: "SPLICE_READ",
    10: "FLOCK_LOCKS", 11: "IOCTL_DIR", 12: "AUTO_INVAL_DATA", 13: "READDIRPLUS",
    14: "READDIRPLUS_AUTO", 15: "ASYNC_DIO", 16: "WRITEBACK_CACHE",
    17: "NO_OPEN_SUPPORT", 18: "PARALLEL_DIROPS", 19: "POSIX_ACL",
    20: "HANDLE_KILLPRIV", 23: "CACHE_SYMLINKS", 24: "NO_OPENDIR_SUPPORT",
    25: "EXPLICIT_INVAL_DATA", 26: "EXPIRE_ONLY",
}


def cap_list(mask: int) -> list[str]:
    return [CAP_NAMES.get(b, f"bit{b}") for b in range(32) if mask & (1 << b)]


class FileState:
    __slots__ = ("events", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list = []


class Passthrough(fuse.Operations):
    use_ns = True  # utimens gets ns ints, getattr may return *_ns-like ints

    def __init__(self, backing: str, capture: str = "none", stats_path: str | None = None,
                 slow_write: float = 0.0, keep_odirect: bool = False,
                 log_writes: str | None = None) -> None:
        self.strip_flags = 0 if keep_odirect else os.O_DIRECT
        self.wlog = open(log_writes, "a", buffering=1) if log_writes else None
        self.backing = os.path.realpath(backing)
        self.root_fd = os.open(self.backing, os.O_PATH | os.O_DIRECTORY)
        self.capture = capture
        self.slow_write = slow_write
        self.stats_path = stats_path
        self.seq = itertools.count(1)  # next() is atomic under the GIL
        self.files: dict[int, FileState] = {}  # fh -> state
        self.files_lock = threading.Lock()
        self.spool_lock = threading.Lock()
        self.spool_fd = -1
        if capture == "spool":
            self.spool_fd = os.open(f"/var/tmp/fuse_probe_spool.{os.getpid()}",
                                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        # stats (updated without a lock: approximate under threads is fine, but
        # += on ints is not atomic across threads; we use a lock-free per-call tuple append)
        self.stats_lock = threading.Lock()
        self.n_writes = 0
        self.bytes_written = 0
        self.max_req = 0
        self.min_req = 1 << 62
        self.hist: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()
        self.init_info: dict = {}
        self.captured_events = 0
        self.captured_bytes = 0
        self._stop = threading.Event()

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _rel(path: str) -> str:
        rel = path.lstrip("/")
        return rel or "."

    def _count(self, op: str) -> None:
        self.ops[op] += 1  # approximate under threads (Counter += is not atomic)

    def _register(self, fh: int) -> int:
        with self.files_lock:
            self.files[fh] = FileState()
        return fh

    # ------------------------------------------------------------- lifecycle
    def init_with_config(self, conn, config) -> None:
        info = {}
        if conn is not None:
            info.update(
                proto=f"{conn.proto_major}.{conn.proto_minor}", time_gran=getattr(conn, "time_gran", None),
                max_write=conn.max_write, max_read=getattr(conn, "max_read", None),
                max_readahead=conn.max_readahead,
                capable=cap_list(conn.capable), want=cap_list(conn.want),
                max_background=conn.max_background,
                congestion_threshold=getattr(conn, "congestion_threshold", None),
                writeback_cache_wanted=bool(conn.want & FUSE_CAP_WRITEBACK_CACHE),
            )
            # Belt and braces: never let the kernel cache writes (write-through only).
            conn.want &= ~FUSE_CAP_WRITEBACK_CACHE
        if config is not None:
            info["config"] = {k: getattr(config, k) for k in (
                "entry_timeout", "negative_timeout", "attr_timeout", "ac_attr_timeout_set",
                "ac_attr_timeout", "remember", "hard_remove", "use_ino", "readdir_ino",
                "direct_io", "kernel_cache", "auto_cache", "nullpath_ok", "intr")}
        info["libfuse"] = f"{fuse.fuse_version_major}.{fuse.fuse_version_minor}"
        info["library_path"] = fuse._libfuse_path
        self.init_info = info
        if self.stats_path:
            threading.Thread(target=self._stats_loop, daemon=True).start()
        if self.capture == "data":
            threading.Thread(target=self._drain_loop, daemon=True).start()

    def destroy(self, path) -> None:
        self._stop.set()
        self._dump_stats()

    def _stats(self) -> dict:
        return {
            "pid": os.getpid(), "capture": self.capture, "init": self.init_info,
            "n_writes": self.n_writes, "bytes_written": self.bytes_written,
            "max_req": self.max_req, "min_req": self.min_req if self.n_writes else 0,
            "hist": {str(k): v for k, v in sorted(self.hist.items())},
            "ops": dict(self.ops),
            "captured_events": self.captured_events, "captured_bytes": self.captured_bytes,
        }

    def _dump_stats(self) -> None:
        if not self.stats_path:
            return
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._stats(), f, indent=1)
        os.replace(tmp, self.stats_path)

    def _stats_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._dump_stats()
            except Exception:
                pass

    def _drain_loop(self) -> None:
        while not self._stop.wait(0.1):
            with self.files_lock:
                states = list(self.files.values())
            for st in states:
                with st.lock:
                    evs, st.events = st.events, []
                # drop: a real implementation hands evs to the spool/shipper here
                del evs

    # ----------------------------------------------------------- metadata ops
    def getattr(self, path, fh=None):
        self._count("getattr")
        if fh is not None:
            st = os.fstat(fh)
        else:
            st = os.stat(self._rel(path), dir_fd=self.root_fd, follow_symlinks=False)
        return {
            "st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_uid": st.st_uid,
            "st_gid": st.st_gid, "st_size": st.st_size, "st_ino": st.st_ino,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
            "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
        }

    def readdir(self, path, fh):
        self._count("readdir")
        fd = os.open(self._rel(path), os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root_fd)
        try:
            return [".", "..", *os.listdir(fd)]
        finally:
            os.close(fd)

    def readlink(self, path):
        return os.readlink(self._rel(path), dir_fd=self.root_fd)

    def mkdir(self, path, mode):
        self._count("mkdir")
        os.mkdir(self._rel(path), mode, dir_fd=self.root_fd)
        return 0

    def rmdir(self, path):
        self._count("rmdir")
        os.rmdir(self._rel(path), dir_fd=self.root_fd)
        return 0

    def unlink(self, path):
        self._count("unlink")
        os.unlink(self._rel(path), dir_fd=self.root_fd)
        return 0

    def symlink(self, target, source):
        os.symlink(source, self._rel(target), dir_fd=self.root_fd)
        return 0

    def link(self, target, source):
        os.link(self._rel(source), self._rel(target), src_dir_fd=self.root_fd,
                dst_dir_fd=self.root_fd, follow_symlinks=False)
        return 0

    def rename(self, old, new, flags=0):
        # NB: plain mfusepy 3.1.1 drops the libfuse3 `flags` argument (RENAME_NOREPLACE /
        # RENAME_EXCHANGE) and calls rename(old, new); with --fuse3-fixes we get flags.
        self._count("rename")
        if flags:
            import fuse3_fixes
            fuse3_fixes.renameat2(self.root_fd, self._rel(old), self.root_fd, self._rel(new), flags)
        else:
            os.rename(self._rel(old), self._rel(new), src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
        return 0

    def chmod(self, path, mode):
        self._count("chmod")
        os.chmod(self._rel(path), mode, dir_fd=self.root_fd)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._rel(path), uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
        return 0

    def truncate(self, path, length, fh=None):
        # mfusepy 3.1.1 on libfuse3 never passes fh here (truncate_fuse_3 drops fip).
        self._count("truncate")
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            fd = os.open(self._rel(path), os.O_WRONLY, dir_fd=self.root_fd)
            try:
                os.ftruncate(fd, length)
            finally:
                os.close(fd)
        return 0

    def utimens(self, path, times=None):
        self._count("utimens")
        if times is None:
            now = time.time_ns()
            times = (now, now)
        os.utime(self._rel(path), ns=times, dir_fd=self.root_fd, follow_symlinks=False)
        return 0

    def statfs(self, path):
        sv = os.statvfs(self.backing)
        return {k: getattr(sv, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
            "f_files", "f_flag", "f_frsize", "f_namemax")}

    # --------------------------------------------------------------- file ops
    def create(self, path, mode, flags=os.O_WRONLY):
        self._count("create")
        fd = os.open(self._rel(path), (flags & ~self.strip_flags) | os.O_CREAT, mode,
                     dir_fd=self.root_fd)
        return self._register(fd)

    def open(self, path, flags):
        self._count("open")
        # The kernel already handled O_CREAT/O_EXCL; O_TRUNC arrives here only with
        # ATOMIC_O_TRUNC (libfuse3 default) -> pass flags through unchanged.
        fd = os.open(self._rel(path), flags & ~self.strip_flags, dir_fd=self.root_fd)
        return self._register(fd)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        n = len(data)
        if path is not None and "/boom-" in path:
            if "/boom-exc" in path:
                raise RuntimeError("deliberate non-OSError in write()")
            if "/boom-base" in path:
                raise SystemExit("deliberate BaseException in write()")
        if self.slow_write:
            time.sleep(self.slow_write)
        written = os.pwrite(fh, data, offset)
        cap = self.capture
        if cap != "none":
            seq = next(self.seq)
            if cap == "spool":
                hdr = struct.pack("<QQQ", seq, offset, written)
                with self.spool_lock:
                    os.write(self.spool_fd, hdr + data[:written])
            else:
                st = self.files.get(fh)
                if st is not None:
                    if cap == "meta":
                        ev = (seq, path, offset, written)
                    else:
                        ev = (seq, path, offset, data if type(data) is bytes else bytes(data))
                    with st.lock:
                        st.events.append(ev)
        if self.wlog is not None:
            self.wlog.write(f"{path} {offset} {n} {written}\n")
        with self.stats_lock:
            self.n_writes += 1
            self.bytes_written += written
            if n > self.max_req:
                self.max_req = n
            if n < self.min_req:
                self.min_req = n
            self.hist[n] += 1
            if cap != "none":
                self.captured_events += 1
                self.captured_bytes += written
        return written

    def flush(self, path, fh):
        # called on every close() of an fd (also dup'ed fds); nothing to do for a
        # write-through pass-through (do NOT fsync here like mfusepy's loopback example)
        return 0

    def fsync(self, path, datasync, fh):
        self._count("fsync")
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def release(self, path, fh):
        self._count("release")
        with self.files_lock:
            self.files.pop(fh, None)
        os.close(fh)
        return 0


def install_zerocopy_write() -> None:
    """Replace mfusepy.FUSE.write (which does ctypes.string_at = a full copy) by a
    version handing the Operations.write a memoryview over libfuse's buffer."""
    import ctypes

    def write(self, path, buf, size, offset, fip):
        addr = ctypes.cast(buf, ctypes.c_void_p).value
        mv = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
        fh = fip.contents if self.raw_fi else fip.contents.fh
        return self.operations.write(
            None if path is None else path.decode(self.encoding, self.errors), mv, offset, fh)

    fuse.FUSE.write = write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("backing")
    ap.add_argument("mountpoint")
    ap.add_argument("--capture", choices=["none", "meta", "data", "spool"], default="none")
    ap.add_argument("-o", dest="opts", action="append", default=[],
                    help="comma-separated FUSE options (key or key=value)")
    ap.add_argument("--lib", default="fuse3")
    ap.add_argument("--nothreads", action="store_true")
    ap.add_argument("--stats")
    ap.add_argument("--slow-write", type=float, default=0.0)
    ap.add_argument("--debug", action="store_true")
    ap.add_argument("--zerocopy", action="store_true")
    ap.add_argument("--keep-odirect", action="store_true")
    ap.add_argument("--log-writes")
    ap.add_argument("--fuse3-fixes", action="store_true",
                    help="pass rename flags and truncate fh through (fuse3_fixes.py)")
    a = ap.parse_args()

    kwargs: dict = {}
    for group in a.opts:
        for o in filter(None, group.split(",")):
            k, eq, v = o.partition("=")
            kwargs[k] = v if eq else True
    if a.zerocopy:
        install_zerocopy_write()
    if a.fuse3_fixes:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import fuse3_fixes
        fuse3_fixes.install()
    ops = Passthrough(a.backing, a.capture, a.stats, a.slow_write, a.keep_odirect, a.log_writes)
    fuse.FUSE(ops, a.mountpoint, foreground=True, nothreads=a.nothreads, debug=a.debug,
              fsname="fuse_probe", **kwargs)


if __name__ == "__main__":
    main()
