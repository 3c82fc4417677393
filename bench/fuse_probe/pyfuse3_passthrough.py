#!/usr/bin/env python3
"""Minimal pyfuse3 (low-level, inode-based, trio) pass-through, for comparing the
write path against the mfusepy one. Enough for fio and simple tools; not complete
(no links/symlinks/xattrs/rename-flags).

Usage: python3 pyfuse3_passthrough.py BACKING MOUNTPOINT [--timeout SECONDS]
       [--capture none|data] [--stats FILE]
Inode numbers = backing st_ino (root = pyfuse3.ROOT_INODE). Unmount: fusermount3 -u.
"""
from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import stat
import threading

import pyfuse3
import trio


class PT(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, backing: str, timeout: float, capture: str, stats: str | None):
        super().__init__()
        self.root = os.path.realpath(backing)
        self.timeout = timeout
        self.capture = capture
        self.stats = stats
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: self.root}
        self.events: list = []
        self.n = 0
        self.max_req = 0
        self.hist: collections.Counter = collections.Counter()

    def _path(self, inode: int) -> str:
        try:
            return self.paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, st: os.stat_result, inode: int | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode or st.st_ino
        e.generation = 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, k, getattr(st, k))
        e.st_blksize = 4096
        e.st_blocks = st.st_blocks
        return e

    def _entry(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        self.paths[st.st_ino] = path
        return self._attr(st)

    async def lookup(self, parent_inode, name, ctx=None):
        return self._entry(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def getattr(self, inode, ctx=None):
        try:
            st = os.lstat(self._path(inode))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return self._attr(st, inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        p = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(p, attr.st_size)
            if fields.update_mode:
                os.chmod(p, stat.S_IMODE(attr.st_mode))
            if fields.update_mtime or fields.update_atime:
                st = os.lstat(p)
                os.utime(p, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return await self.getattr(inode, ctx)

    async def forget(self, inode_list):
        pass

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        p = self._path(fh)
        names = sorted(os.listdir(p))
        for i, n in enumerate(names[start_id:], start_id):
            e = self._entry(os.path.join(p, n))
            if not pyfuse3.readdir_reply(token, os.fsencode(n), e, i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def create(self, parent_inode, name, mode, flags, ctx):
        p = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            fd = os.open(p, (flags & ~os.O_DIRECT) | os.O_CREAT, mode)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return pyfuse3.FileInfo(fh=fd), self._entry(p)

    async def open(self, inode, flags, ctx):
        try:
            fd = os.open(self._path(inode), flags & ~(os.O_DIRECT | os.O_CREAT))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return pyfuse3.FileInfo(fh=fd)

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        n = os.pwrite(fh, buf, off)
        if self.capture == "data":
            self.events.append((fh, off, bytes(buf)))
            if len(self.events) > 64:
                self.events.clear()  # drop: stand-in for hand-off to a shipper
        self.n += 1
        self.hist[len(buf)] += 1
        if len(buf) > self.max_req:
            self.max_req = len(buf)
        return n

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    async def release(self, fh):
        os.close(fh)

    async def unlink(self, parent_inode, name, ctx):
        try:
            os.unlink(os.path.join(self._path(parent_inode), os.fsdecode(name)))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        sv = os.statvfs(self.root)
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(s, k, getattr(sv, k))
        return s

    def dump(self):
        if self.stats:
            json.dump({"n_writes": self.n, "max_req": self.max_req,
                       "hist": {str(k): v for k, v in self.hist.items()}}, open(self.stats, "w"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("backing")
    ap.add_argument("mountpoint")
    ap.add_argument("--timeout", type=float, default=0.0)
    ap.add_argument("--capture", default="none", choices=["none", "data"])
    ap.add_argument("--stats")
    a = ap.parse_args()
    ops = PT(a.backing, a.timeout, a.capture, a.stats)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=pyfuse3_probe")
    opts.discard("default_permissions")
    pyfuse3.init(ops, a.mountpoint, opts)
    stop = threading.Event()

    def dumper():
        while not stop.wait(0.5):
            ops.dump()
    threading.Thread(target=dumper, daemon=True).start()
    try:
        trio.run(pyfuse3.main)
    finally:
        stop.set()
        ops.dump()
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
