"""The capture file system: a FUSE pass-through over the volume that records every change.

It speaks the kernel's inode-based protocol (`session`, `kernel`): every inode the kernel
knows is held open (`inodes`), so an operation on an open file or directory acts on that file
or directory whatever happened to its name, on this host or another. Reads and data writes go
straight to the backing files (the *direct I/O* path); each write and fallocate is recorded
by the `NodeAgent` under the file's lock and write token. Metadata operations (create, open for
writing, close, mkdir, mknod, rmdir, unlink, rename and exchange, link, truncate, chmod, chown,
utimens, symlink, setxattr, removexattr) and file locks are sent to the coordinator, which
decides them in one order for all hosts and executes them on the volume; the agent records its
own copy. A new inode belongs to the calling process's user and group; the kernel checks
permissions itself against modes, owners and ACLs (``default_permissions``, POSIX ACLs), so
with ``allow_other`` other users use the mount as they would a local file system.

Names and paths: the kernel names a child of a directory inode; the path the coordinator needs
is the directory's *current* path (asked of the kernel) plus the name, and the coordinator
checks, in the same step as the operation, that this path still leads to that directory
(``dir_ino``) or file (``ino``). If another host renamed something in between, it answers
ESTALE and the operation is tried again with fresh paths: the order is the coordinator's.

Nothing is cached: entries and attributes are valid for 0 s and there is no write-back cache,
so a write is on the volume when the call returns and a lookup, stat or read sees what other
hosts did before it. An O_APPEND handle bypasses the page cache (see `NodeAgent.write`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import signal
import stat
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..events import time_from_wire, time_to_wire
from ..locks import MAX, FlockType, LockType
from ..node.agent import NodeAgent
from . import kernel as k
from .inodes import Inode, Inodes
from .session import DEFERRED, NO_REPLY, Session, mount_fuse

log = logging.getLogger("clusterrep.capture")
T = TypeVar("T")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
MAX_RACE_RETRIES = 1000  # an operation that loses this many races in a row to other hosts: EIO
INIT_FLAGS = (k.ASYNC_READ | k.POSIX_LOCKS | k.FLOCK_LOCKS | k.ATOMIC_O_TRUNC | k.BIG_WRITES
              | k.AUTO_INVAL_DATA | k.PARALLEL_DIROPS | k.MAX_PAGES | k.ASYNC_DIO | k.DONT_MASK
              | k.POSIX_ACL)
MOUNT_OPTIONS = "fsname=clusterrep,subtype=clusterrep,auto_unmount,default_permissions"
FALLOCATE_MODES = 0x01 | 0x02 | 0x10  # KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE


def mount_options(*, allow_other: bool = False) -> str:
    """The options the mount is made with (``allow_other``: users other than the one running
    the node may use it; the kernel checks their permissions)."""
    return MOUNT_OPTIONS + (",allow_other" if allow_other else "")


def _creds(hdr: k.Header) -> dict[str, Any]:
    """The caller's user and group: a new inode's owner."""
    return {"uid": hdr.uid, "gid": hdr.gid}
_FLOCK_OF = {fcntl.F_RDLCK: FlockType.SHARED, fcntl.F_WRLCK: FlockType.EXCLUSIVE,
             fcntl.F_UNLCK: FlockType.UNLOCK}


@dataclass
class Handle:
    ino: int
    path: str
    write: bool
    append: bool = False  # O_APPEND: each write goes to the file's end as the volume has it


@dataclass
class DirHandle:
    fd: int
    entries: list[bytes] = field(default_factory=list)


def _backing_flags(flags: int) -> int:
    """Flags for opening a backing file. O_APPEND is dropped: the kernel or the agent chose the
    offset, and pwrite on an O_APPEND descriptor would ignore it (Linux). Creation and
    truncation are the coordinator's. O_DIRECT is dropped too (requests carry unaligned
    buffers; the kernel side of the mount already bypasses its cache as the program asked), and
    O_NOFOLLOW (the kernel resolved the name; we open the inode through its /proc link)."""
    return (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_DIRECT
                      | os.O_NOCTTY | os.O_NOFOLLOW)) | os.O_CLOEXEC


def _retry_stale(op: Callable[[], T]) -> T:
    """Run ``op`` again while the coordinator answers ESTALE (a name changed under it)."""
    for _ in range(MAX_RACE_RETRIES):
        try:
            return op()
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
    raise OSError(errno.EIO, "the operation kept racing other hosts")


class CaptureFS:
    """The FUSE operations, by opcode (`handlers`); ``session`` is set once mounted."""

    def __init__(self, volume: str, agent: NodeAgent) -> None:
        self.inodes = Inodes(volume)
        self.inodes.locate = agent.where
        self.volume = self.inodes.volume
        self.agent = agent
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        # POSIX lock owners seen on each open file: an open-file-description lock (owner = the
        # open file) goes when that file is released, which the kernel does not say itself
        self.lock_owners: dict[int, set[int]] = {}
        self._lock = threading.Lock()
        self.session: Session | None = None

    def handlers(self) -> dict[int, Callable[[k.Header, memoryview], Any]]:
        return {
            k.LOOKUP: self.lookup, k.FORGET: self.forget, k.BATCH_FORGET: self.batch_forget,
            k.GETATTR: self.getattr, k.SETATTR: self.setattr, k.READLINK: self.readlink,
            k.SYMLINK: self.symlink, k.MKDIR: self.mkdir, k.UNLINK: self.unlink,
            k.RMDIR: self.rmdir, k.RENAME: self.rename, k.RENAME2: self.rename2,
            k.LINK: self.link, k.MKNOD: self.mknod, k.OPEN: self.open,
            k.CREATE: self.create, k.READ: self.read, k.WRITE: self.write,
            k.STATFS: self.statfs, k.ACCESS: self.access, k.FLUSH: self.flush, k.RELEASE: self.release,
            k.FSYNC: self.fsync, k.OPENDIR: self.opendir, k.READDIR: self.readdir,
            k.RELEASEDIR: self.releasedir, k.FSYNCDIR: self.fsyncdir, k.GETLK: self.getlk,
            k.SETLK: self.setlk, k.SETLKW: self.setlk, k.SETXATTR: self.setxattr,
            k.GETXATTR: self.getxattr, k.LISTXATTR: self.listxattr,
            k.REMOVEXATTR: self.removexattr, k.FALLOCATE: self.fallocate, k.LSEEK: self.lseek,
        }

    # -- names -------------------------------------------------------------------------------

    def lookup(self, hdr: k.Header, body: memoryview) -> bytes:
        name = k.names(body, 1)[0]
        inode, st = self.inodes.lookup(self.inodes.get(hdr.nodeid), name)
        return k.pack_entry(inode.nodeid, st)

    def forget(self, hdr: k.Header, body: memoryview) -> object:
        self.inodes.forget(hdr.nodeid, k.FORGET_IN.unpack_from(body)[0])
        return NO_REPLY

    def batch_forget(self, hdr: k.Header, body: memoryview) -> object:
        count = k.BATCH_FORGET_IN.unpack_from(body)[0]
        for i in range(count):
            nodeid, nlookup = k.FORGET_ONE.unpack_from(body, k.BATCH_FORGET_IN.size + 16 * i)
            self.inodes.forget(nodeid, nlookup)
        return NO_REPLY

    def _entry(self, parent: Inode, name: bytes) -> bytes:
        inode, st = self.inodes.lookup(parent, name)
        return k.pack_entry(inode.nodeid, st)

    def _in_dir(self, kind: str, parent: Inode, name: bytes, **fields: Any) -> None:
        """A metadata operation on ``name`` in directory ``parent``, decided by the coordinator
        while that directory is still where its path says (else retried with a fresh one)."""
        def run() -> None:
            self.agent.meta(kind, path=self.inodes.child(parent, name), dir_ino=parent.ino, **fields)
        _retry_stale(run)

    # -- attributes --------------------------------------------------------------------------

    def getattr(self, hdr: k.Header, body: memoryview) -> bytes:
        flags, _, fh = k.GETATTR_IN.unpack_from(body)
        if flags & k.GETATTR_FH and fh in self.handles:
            st = os.fstat(fh)
        else:
            st = os.fstat(self.inodes.get(hdr.nodeid).fd)
        return k.ATTR_OUT.pack(0, 0, 0) + k.pack_attr(st)

    def setattr(self, hdr: k.Header, body: memoryview) -> bytes:
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimens, mtimens, _ctimens, mode,
         _, uid, gid, _) = k.SETATTR_IN.unpack_from(body)
        inode = self.inodes.get(hdr.nodeid)
        handle = self.handles.get(fh) if valid & k.FATTR_FH else None
        if valid & k.FATTR_SIZE:
            self._truncate(inode, fh if handle is not None else None, size)
        fields: dict[str, Any] = {}
        if valid & k.FATTR_MODE:
            fields["mode"] = mode & 0o7777
        # (times past 2262 do not fit 64 bits of nanoseconds: sent as [seconds, nanoseconds])
        if valid & k.FATTR_ATIME:
            fields["atime_ns"] = "now" if valid & k.FATTR_ATIME_NOW else time_to_wire(
                atime * 10**9 + atimens)
        if valid & k.FATTR_MTIME:
            fields["mtime_ns"] = "now" if valid & k.FATTR_MTIME_NOW else time_to_wire(
                mtime * 10**9 + mtimens)
        if valid & k.FATTR_UID:
            fields["uid"] = uid
        if valid & k.FATTR_GID:
            fields["gid"] = gid
        if fields:  # (UTIME_NOW: the coordinator's clock; a node's may be skewed by hours)
            self._setattr(inode, fields)
        st = os.fstat(fh) if handle is not None else os.fstat(inode.fd)
        return k.ATTR_OUT.pack(0, 0, 0) + k.pack_attr(st)

    def _named(self, inode: Inode, kind: str, **fields: Any) -> bool:
        """Run ``kind`` through the coordinator on ``inode`` wherever its name is now; False if
        it has none (then the caller changes it here alone: nothing on the volume can show it)."""
        def run() -> None:
            path = self.inodes.path(inode)
            if path is None:
                raise FileNotFoundError(errno.ENOENT, "no name")
            self.agent.meta(kind, path=path, ino=inode.ino, **fields)
        try:
            _retry_stale(run)
        except FileNotFoundError:
            return False
        return True

    def _truncate(self, inode: Inode, fd: int | None, length: int) -> None:
        """Truncate this inode wherever its name is now (a nameless one here alone)."""
        if not self._named(inode, "truncate", size=length):
            if fd is not None:
                os.ftruncate(fd, length)
            else:
                os.truncate(inode.proc, length)

    def _setattr(self, inode: Inode, fields: dict[str, Any]) -> None:
        if not self._named(inode, "setattr", **fields):  # no name: the orphan, here alone
            if "uid" in fields or "gid" in fields:
                os.chown(inode.proc, fields.get("uid", -1), fields.get("gid", -1))
            if "mode" in fields:
                os.chmod(inode.proc, fields["mode"])
            if "atime_ns" in fields or "mtime_ns" in fields:
                st = os.fstat(inode.fd)
                now = self.agent.now_ns()
                times = tuple(now if v == "now" else time_from_wire(v, "time") for v in (
                    fields.get("atime_ns", st.st_atime_ns), fields.get("mtime_ns", st.st_mtime_ns)))
                os.utime(inode.proc, ns=times)  # type: ignore[arg-type]

    def readlink(self, hdr: k.Header, body: memoryview) -> bytes:
        return os.fsencode(os.readlink("", dir_fd=self.inodes.get(hdr.nodeid).fd))

    def access(self, hdr: k.Header, body: memoryview) -> None:
        """access(2) as the kernel would answer it for the caller (root: an execute bit is
        still needed to execute)."""
        mask, _ = k.ACCESS_IN.unpack_from(body)
        if not os.access(self.inodes.get(hdr.nodeid).proc, mask):
            raise OSError(errno.EACCES, "access denied")

    def statfs(self, hdr: k.Header, body: memoryview) -> bytes:
        sv = os.statvfs(self.volume)
        return k.STATFS_OUT.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
                                 sv.f_bsize, sv.f_namemax, sv.f_frsize, 0, *([0] * 6))

    # -- namespace (through the coordinator) -------------------------------------------------

    def mkdir(self, hdr: k.Header, body: memoryview) -> bytes:
        mode, umask = k.MKDIR_IN.unpack_from(body)
        name = k.names(body[k.MKDIR_IN.size:], 1)[0]
        parent = self.inodes.get(hdr.nodeid)
        self._in_dir("mkdir", parent, name, mode=mode & 0o7777, umask=umask, **_creds(hdr))
        return self._entry(parent, name)

    def mknod(self, hdr: k.Header, body: memoryview) -> bytes:
        """FIFOs, sockets and (as root) device nodes; a regular file made by mknod(2) is an
        ordinary create."""
        mode, rdev, umask, _ = k.MKNOD_IN.unpack_from(body)
        name = k.names(body[k.MKNOD_IN.size:], 1)[0]
        parent = self.inodes.get(hdr.nodeid)
        if stat.S_ISREG(mode):
            self._in_dir("create", parent, name, mode=mode & 0o7777, umask=umask, **_creds(hdr))
        else:
            self._in_dir("mknod", parent, name, mode=mode & 0o177777, rdev=rdev, umask=umask,
                         **_creds(hdr))
        return self._entry(parent, name)

    def link(self, hdr: k.Header, body: memoryview) -> bytes:
        """A hard link: a further name, in directory ``hdr.nodeid``, for an inode."""
        old = self.inodes.get(k.LINK_IN.unpack_from(body)[0])
        name = k.names(body[k.LINK_IN.size:], 1)[0]
        parent = self.inodes.get(hdr.nodeid)

        def run() -> None:
            path = self.inodes.path(old)
            if path is None:
                raise OSError(errno.ENOENT, "the file has no name left to link to")
            self.agent.meta("link", path=path, ino=old.ino, dst=self.inodes.child(parent, name),
                            dst_dir_ino=parent.ino)
        _retry_stale(run)
        return self._entry(parent, name)

    def rmdir(self, hdr: k.Header, body: memoryview) -> None:
        self._in_dir("rmdir", self.inodes.get(hdr.nodeid), k.names(body, 1)[0])

    def unlink(self, hdr: k.Header, body: memoryview) -> None:
        self._in_dir("unlink", self.inodes.get(hdr.nodeid), k.names(body, 1)[0])

    def symlink(self, hdr: k.Header, body: memoryview) -> bytes:
        name, target = k.names(body, 2)
        parent = self.inodes.get(hdr.nodeid)
        self._in_dir("symlink", parent, name, target=os.fsdecode(target), **_creds(hdr))
        return self._entry(parent, name)

    def rename(self, hdr: k.Header, body: memoryview) -> None:
        newdir = k.RENAME_IN.unpack_from(body)[0]
        self._rename(hdr.nodeid, newdir, 0, body[k.RENAME_IN.size:])

    def rename2(self, hdr: k.Header, body: memoryview) -> None:
        newdir, flags, _ = k.RENAME2_IN.unpack_from(body)
        self._rename(hdr.nodeid, newdir, flags, body[k.RENAME2_IN.size:])

    def _rename(self, olddir: int, newdir: int, flags: int, body: memoryview) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "rename flags not supported (RENAME_WHITEOUT is overlayfs')")
        old, new = k.names(body, 2)
        src, dst = self.inodes.get(olddir), self.inodes.get(newdir)
        kind = "exchange" if flags & RENAME_EXCHANGE else "rename"
        opts: dict[str, Any] = {"noreplace": True} if flags & RENAME_NOREPLACE else {}

        def run() -> None:
            # decided by the coordinator, atomically: with NOREPLACE one host wins
            self.agent.meta(kind, path=self.inodes.child(src, old), dst=self.inodes.child(dst, new),
                            dir_ino=src.ino, dst_dir_ino=dst.ino, **opts)
        _retry_stale(run)

    # -- extended attributes (read here, changed through the coordinator) ----------------------

    def setxattr(self, hdr: k.Header, body: memoryview) -> None:
        size, flags = k.SETXATTR_IN.unpack_from(body)
        rest = body[k.SETXATTR_IN.size:]
        name = k.names(rest, 1)[0]
        value = bytes(rest[len(name) + 1:len(name) + 1 + size])
        inode = self.inodes.get(hdr.nodeid)
        if not self._named(inode, "setxattr", name=os.fsdecode(name), value=value, flags=flags):
            os.setxattr(inode.proc, name, value, flags)

    def removexattr(self, hdr: k.Header, body: memoryview) -> None:
        name = k.names(body, 1)[0]
        inode = self.inodes.get(hdr.nodeid)
        if not self._named(inode, "removexattr", name=os.fsdecode(name)):
            os.removexattr(inode.proc, name)

    def getxattr(self, hdr: k.Header, body: memoryview) -> bytes:
        size, _ = k.GETXATTR_IN.unpack_from(body)
        name = k.names(body[k.GETXATTR_IN.size:], 1)[0]
        value = os.getxattr(self.inodes.get(hdr.nodeid).proc, name)  # (the inode itself)
        return k.xattr_reply(value, size)

    def listxattr(self, hdr: k.Header, body: memoryview) -> bytes:
        size, _ = k.GETXATTR_IN.unpack_from(body)
        names = os.listxattr(self.inodes.get(hdr.nodeid).proc)
        return k.xattr_reply(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    # -- files -------------------------------------------------------------------------------

    def _register(self, fd: int, handle: Handle) -> int:
        with self._lock:
            self.handles[fd] = handle
        return fd

    def _open_out(self, fd: int) -> bytes:
        handle = self.handles[fd]
        # an O_APPEND handle bypasses the page cache: the kernel picks an append's offset from
        # its own idea of the size, which other hosts' appends make stale; the agent writes at
        # the volume's end instead, and pages cached at the kernel's offset would lie
        return k.OPEN_OUT.pack(fd, k.FOPEN_DIRECT_IO if handle.append else 0, 0)

    def open(self, hdr: k.Header, body: memoryview) -> bytes:
        flags, _ = k.OPEN_IN.unpack_from(body)
        inode = self.inodes.get(hdr.nodeid)
        if flags & _WRITE_FLAGS:
            return self._open_out(self._open_for_write(inode, flags))
        fd = os.open(inode.proc, _backing_flags(flags))
        if flags & os.O_TRUNC:  # (Linux truncates on O_RDONLY|O_TRUNC too)
            try:
                self._truncate(inode, None, 0)
            except BaseException:
                os.close(fd)
                raise
        return self._open_out(self._register(fd, Handle(inode.ino, "", False)))

    def _open_for_write(self, inode: Inode, flags: int) -> int:
        """Open this inode for writing, in the coordinator's order: it confirms (an ``Open``
        mark) that the inode is still the one at its current path; if a rename got in between,
        it answers ESTALE and we ask again. An inode without a name is opened as an orphan."""
        fd = os.open(inode.proc, _backing_flags(flags))
        try:
            def run() -> str | None:
                path = self.inodes.path(inode)
                if path is not None:
                    self.agent.meta("open", path=path, ino=inode.ino)
                return path
            path = _retry_stale(run)
            if path is None:
                self.agent.orphaned(inode.ino)
            if flags & os.O_TRUNC:
                self._truncate(inode, fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return self._register(fd, Handle(inode.ino, path or "", True, bool(flags & os.O_APPEND)))

    def create(self, hdr: k.Header, body: memoryview) -> bytes:
        """``open(O_CREAT)`` of a name the kernel found missing. Without ``O_EXCL`` another host
        may create it first: then this opens that file, as one file system would."""
        flags, mode, umask, _ = k.CREATE_IN.unpack_from(body)
        name = k.names(body[k.CREATE_IN.size:], 1)[0]
        parent = self.inodes.get(hdr.nodeid)
        for _ in range(MAX_RACE_RETRIES):
            if not flags & os.O_EXCL:
                try:
                    inode, _st = self.inodes.lookup(parent, name)
                except FileNotFoundError:
                    pass
                else:
                    try:
                        return self._created_reply(inode, self._open_for_write(inode, flags))
                    except BaseException:
                        self.inodes.forget(inode.nodeid, 1)  # the kernel never saw this lookup
                        raise
            try:
                reply = _retry_stale(lambda: self.agent.meta(
                    "create", path=self.inodes.child(parent, name), dir_ino=parent.ino,
                    mode=mode & 0o7777, umask=umask, **_creds(hdr)))
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                continue  # created by another host meanwhile: open it
            return self._open_created(parent, name, flags, int(reply["ino"]))
        raise OSError(errno.EIO, "create kept racing other hosts")

    def _created_reply(self, inode: Inode, fd: int) -> bytes:
        return k.pack_entry(inode.nodeid, os.fstat(fd)) + self._open_out(fd)

    def _open_created(self, parent: Inode, name: bytes, flags: int, ino: int) -> bytes:
        """Open the file the coordinator just created as ``ino``, wherever another host's rename
        has moved it since; an anonymous file if it was already removed (what the program
        writes then goes nowhere, as to a file unlinked while open)."""
        path: str | None = self.inodes.child(parent, name)
        for _ in range(MAX_RACE_RETRIES):
            try:
                fd = os.open(path, _backing_flags(flags) | os.O_NOFOLLOW,  # type: ignore[arg-type]
                             dir_fd=self.inodes.root.fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
                    raise
            else:
                st = os.fstat(fd)
                if st.st_ino == ino:
                    return self._new_file(fd, Handle(ino, path, True, bool(flags & os.O_APPEND)))  # type: ignore[arg-type]
                os.close(fd)
            path = self.agent.where(ino, path)  # type: ignore[arg-type]
            if path is None:
                self.agent.orphaned(ino)
                fd = os.open(self.agent.state, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
                return self._new_file(fd, Handle(ino, "", True, bool(flags & os.O_APPEND)))
        raise OSError(errno.EIO, "created file kept moving while being opened")

    def _new_file(self, fd: int, handle: Handle) -> bytes:
        ref = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
        inode = self.inodes.learn(ref, os.fstat(ref))
        self._register(fd, handle)
        return self._created_reply(inode, fd)

    def read(self, hdr: k.Header, body: memoryview) -> bytes:
        fh, offset, size, *_ = k.READ_IN.unpack_from(body)
        return os.pread(fh, size, offset)

    def write(self, hdr: k.Header, body: memoryview) -> bytes:
        fh, offset, size, *_ = k.WRITE_IN.unpack_from(body)
        handle = self.handles.get(fh)
        if handle is None or not handle.write:
            raise OSError(errno.EBADF, "not open for writing")
        data = bytes(body[k.WRITE_IN.size:k.WRITE_IN.size + size])
        if handle.append and hdr.uid != 0:
            self._remove_privs(hdr, fh)
        n = self.agent.write(handle.ino, handle.path, fh, data, offset, append=handle.append)
        return k.WRITE_OUT.pack(n, 0)

    def _remove_privs(self, hdr: k.Header, fh: int) -> None:
        """A write by an unprivileged user clears set-user-ID (and group-executable
        set-group-ID) bits, as any file system does. The kernel does it for cached writes; for
        an O_APPEND handle (direct I/O) it leaves it to us."""
        mode = stat.S_IMODE(os.fstat(fh).st_mode)
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill:
            self._setattr(self.inodes.get(hdr.nodeid), {"mode": mode & ~kill})

    def fallocate(self, hdr: k.Header, body: memoryview) -> None:
        fh, offset, length, mode, _ = k.FALLOCATE_IN.unpack_from(body)
        handle = self.handles.get(fh)
        if handle is None or not handle.write:
            raise OSError(errno.EBADF, "not open for writing")
        if mode & ~FALLOCATE_MODES:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode not supported")
        self.agent.fallocate(handle.ino, handle.path, fh, mode, offset, length)

    def lseek(self, hdr: k.Header, body: memoryview) -> bytes:
        """SEEK_DATA / SEEK_HOLE (the kernel answers the other whences itself)."""
        fh, offset, whence, _ = k.LSEEK_IN.unpack_from(body)
        if fh not in self.handles:
            raise OSError(errno.EBADF, "file not open")
        return k.LSEEK_OUT.pack(os.lseek(fh, offset, whence))

    def fsync(self, hdr: k.Header, body: memoryview) -> None:
        fh, flags, _ = k.FSYNC_IN.unpack_from(body)
        if flags & k.FSYNC_FDATASYNC:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    def flush(self, hdr: k.Header, body: memoryview) -> None:
        """A close of one descriptor: the closing process's POSIX locks on the file go."""
        fh, _, _, owner = k.FLUSH_IN.unpack_from(body)
        handle = self.handles.get(fh)
        if handle is not None:
            self.agent.drop_posix_locks(handle.ino, owner, handle.path)

    def release(self, hdr: k.Header, body: memoryview) -> None:
        fh, _flags, release_flags, owner = k.RELEASE_IN.unpack_from(body)
        with self._lock:
            handle = self.handles.pop(fh, None)
            last = handle is not None and all(h.ino != handle.ino for h in self.handles.values())
            owners = self.lock_owners.pop(fh, set())
        try:
            if handle is None:
                return
            if release_flags & k.RELEASE_FLOCK_UNLOCK:
                self.agent.drop_flock(handle.ino, owner, handle.path)
            for lock_owner in owners:  # a process's own were dropped at its flush already
                self.agent.drop_posix_locks(handle.ino, lock_owner, handle.path)
            if last:
                if handle.write:
                    self.agent.settle(handle.ino)  # its time, before the Close mark
                self.agent.released(handle.ino)
            current = self.agent.paths.get(handle.ino, handle.path)
            if handle.write and current:  # (a file without a name needs no Close mark)
                try:
                    self.agent.meta("close", path=current, ino=handle.ino)
                except OSError as exc:
                    log.warning("close of %s not recorded: %s", current, exc)
        finally:
            os.close(fh)

    # -- directories -------------------------------------------------------------------------

    def opendir(self, hdr: k.Header, body: memoryview) -> bytes:
        fd = os.open(self.inodes.get(hdr.nodeid).proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with self._lock:
            self.dirs[fd] = DirHandle(fd)
        return k.OPEN_OUT.pack(fd, 0, 0)

    def readdir(self, hdr: k.Header, body: memoryview) -> bytes:
        fh, offset, size, *_ = k.READ_IN.unpack_from(body)
        handle = self.dirs.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "directory not open")
        if offset == 0:  # (again: rewinddir) what the directory holds now
            handle.entries = self._list(handle.fd)
        out = bytearray()
        for i in range(offset, len(handle.entries)):
            rec = handle.entries[i]
            if len(out) + len(rec) > size:
                break
            out += rec
        return bytes(out)

    def _list(self, fd: int) -> list[bytes]:
        here = os.fstat(fd)
        recs = [k.pack_dirent(here.st_ino, 1, b".", stat.S_IFDIR >> 12),
                k.pack_dirent(k.ROOT_ID, 2, b"..", stat.S_IFDIR >> 12)]
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    dtype = entry.stat(follow_symlinks=False).st_mode >> 12
                except OSError:
                    continue  # removed meanwhile
                recs.append(k.pack_dirent(entry.inode(), len(recs) + 1, os.fsencode(entry.name), dtype))
        return recs

    def releasedir(self, hdr: k.Header, body: memoryview) -> None:
        fh = k.RELEASE_IN.unpack_from(body)[0]
        with self._lock:
            handle = self.dirs.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)

    def fsyncdir(self, hdr: k.Header, body: memoryview) -> None:
        os.fsync(k.FSYNC_IN.unpack_from(body)[0])

    # -- locks (held cluster-wide, through the coordinator) ----------------------------------

    def _lock_request(self, hdr: k.Header, body: memoryview) -> tuple[dict[str, Any], bool]:
        fh, owner, start, end, ltype, _pid, lk_flags, _ = k.LK_IN.unpack_from(body)
        handle = self.handles.get(fh)
        inode = self.inodes.get(hdr.nodeid)
        path = self.inodes.path(inode) or "."  # (fresh: the coordinator finds the file by it)
        flock = bool(lk_flags & k.LK_FLOCK)
        if not flock and handle is not None:
            with self._lock:
                self.lock_owners.setdefault(fh, set()).add(owner)
        req: dict[str, Any] = {"ino": inode.ino, "path": path, "kind": "flock" if flock else "posix",
                               "owner": owner, "type": int(_FLOCK_OF[ltype]) if flock else ltype,
                               "start": min(start, MAX), "end": min(end, MAX)}
        return req, flock

    def getlk(self, hdr: k.Header, body: memoryview) -> bytes:
        req, _ = self._lock_request(hdr, body)
        conflict = self.agent.file_lock({**req, "test": True}, interrupted=lambda: False)
        if conflict is None:
            return k.LK_OUT.pack(0, 0, LockType.UNLOCK, 0)
        ltype, start, end = conflict
        return k.LK_OUT.pack(start, end, ltype, 0)  # the holder may be on another host: no pid

    def setlk(self, hdr: k.Header, body: memoryview) -> object:
        req, _ = self._lock_request(hdr, body)
        if hdr.opcode == k.SETLK or self.session is None:
            self.agent.file_lock({**req, "wait": hdr.opcode == k.SETLKW}, interrupted=lambda: False)
            return None
        # a program that waits for a lock waits in a thread of its own, not in a FUSE worker:
        # hundreds of them must not stop the mount from serving the holder's unlock
        threading.Thread(target=self._wait_for_lock, args=(self.session, hdr, req),
                         name="lock-wait", daemon=True).start()
        return DEFERRED

    def _wait_for_lock(self, session: Session, hdr: k.Header, req: dict[str, Any]) -> None:
        try:
            self.agent.file_lock({**req, "wait": True},
                                 interrupted=lambda: session.interrupted(hdr.unique))
        except BaseException as exc:
            session.finish(hdr, exc)
        else:
            session.finish(hdr, None)


def raise_open_files_limit() -> int:
    """Every inode the kernel knows is held open (`inodes`), as many as programs look up: raise
    the soft limit on open descriptors to the hard one. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def mount(fs: CaptureFS, mountpoint: str, *, allow_other: bool = False) -> None:
    """Mount ``fs`` and serve until unmounted or sent SIGINT/SIGTERM (then unmount)."""
    limit = raise_open_files_limit()
    if limit < 16384:
        log.warning("only %d open files allowed (ulimit -n): the mount holds one per file the "
                    "kernel knows; raise the hard limit for large volumes", limit)
    fd, keeper = mount_fuse(mountpoint, mount_options(allow_other=allow_other))
    session = Session(fd, fs.handlers(), init_flags=INIT_FLAGS)
    fs.session = session

    def stop(signum: int, frame: Any) -> None:
        log.info("signal %d: unmounting %s", signum, mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], check=False,
                       capture_output=True)
        session.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    try:
        session.serve()
    finally:
        os.close(fd)
        keeper.close()
