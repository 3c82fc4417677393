"""The FUSE kernel protocol (``linux/fuse.h``, version 7.31+): opcodes, flags and the binary
layouts of requests and replies. Pure data: no I/O.

A request is a 40-byte `IN_HEADER` (length, opcode, unique id, node id, caller's uid, gid, pid)
followed by an opcode-specific struct and, for some opcodes, NUL-terminated names or data. A
reply is a 16-byte `OUT_HEADER` (length, negative errno or 0, the request's unique id) followed
by the reply struct. Node ids are the kernel's handles for inodes; 1 is the root.
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

MAJOR = 7
MINOR = 31  # the newest minor whose layouts this module speaks; the kernel speaks older ones too
ROOT_ID = 1

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, BMAP, DESTROY = 31, 32, 33, 34, 35, 36, 37, 38
IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 39, 40, 41, 42, 43, 44
RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING, SYNCFS, TMPFILE = (
    45, 46, 47, 48, 49, 50, 51)

# INIT flags
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6  # the kernel sends create modes without the umask applied, and the umask
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20  # the kernel checks permissions itself, ACLs included (read as xattrs)
MAX_PAGES = 1 << 22

# SETATTR valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1 << 4, 1 << 5, 1 << 6
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_LOCKOWNER, FATTR_CTIME = 1 << 7, 1 << 8, 1 << 9, 1 << 10

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

GETATTR_FH = 1 << 0  # getattr_flags: fh is valid
LK_FLOCK = 1 << 0  # lk_flags: a flock(2) lock, not a POSIX one
RELEASE_FLOCK_UNLOCK = 1 << 1  # release_flags: drop the file's flock lock
FSYNC_FDATASYNC = 1 << 0

# notifications (unique 0, error = code)
NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY = 2, 3

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (more follows in 7.36+)
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")  # ... max_write time_gran max_pages align flags2
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # ino size blocks a/m/ctime, nsecs, mode nlink uid
#                                            gid rdev blksize flags (times: seconds, signed as
#                                            the kernel reads them, before 1970 too)
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid +nsecs; ATTR
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy; ATTR
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")  # valid pad fh size lock_owner atime mtime ctime
#                                                  atimensec mtimensec ctimensec mode unused4
#                                                  uid gid unused5
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
OPEN_IN = struct.Struct("<II")  # flags open_flags
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII6I")
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
LK_IN = struct.Struct("<QQQQIIII")  # fh owner start end type pid lk_flags padding
LK_OUT = struct.Struct("<QQII")  # start end type pid
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
SETXATTR_IN = struct.Struct("<II")  # size flags (the short form: no FUSE_SETXATTR_EXT)
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
DIRENT = struct.Struct("<QQII")  # ino off namelen type; name, padded to 8 bytes
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len


class Header(NamedTuple):
    """A request's header: ``uid``/``gid``/``pid`` are the calling process's."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def header(buf: memoryview) -> Header:
    """Parse the header at the start of ``buf``; ValueError if ``buf`` is shorter than one."""
    if len(buf) < IN_HEADER.size:
        raise ValueError(f"FUSE request of {len(buf)} bytes is shorter than its header")
    return Header(*IN_HEADER.unpack_from(buf)[:7])


def names(buf: memoryview, count: int) -> list[bytes]:
    """``count`` NUL-terminated names from the start of ``buf`` (as raw bytes)."""
    parts = bytes(buf).split(b"\0", count)
    if len(parts) <= count:
        raise ValueError("FUSE request with a name that is not NUL-terminated")
    return parts[:count]


def pack_attr(st: object, ino: int | None = None) -> bytes:
    """A ``fuse_attr`` from an ``os.stat_result``."""
    s = st  # type: ignore[assignment]
    return ATTR.pack(
        s.st_ino if ino is None else ino, s.st_size, s.st_blocks,  # type: ignore[attr-defined]
        s.st_atime_ns // 10**9, s.st_mtime_ns // 10**9, s.st_ctime_ns // 10**9,  # type: ignore[attr-defined]
        s.st_atime_ns % 10**9, s.st_mtime_ns % 10**9, s.st_ctime_ns % 10**9,  # type: ignore[attr-defined]
        s.st_mode, min(s.st_nlink, 0xFFFFFFFF), s.st_uid, s.st_gid,  # type: ignore[attr-defined]
        s.st_rdev & 0xFFFFFFFF, s.st_blksize, 0)  # type: ignore[attr-defined]


def pack_entry(nodeid: int, st: object, generation: int = 0) -> bytes:
    """A ``fuse_entry_out`` for a lookup-like reply; names and attributes are never cached
    (another host may change them at any moment)."""
    return ENTRY_OUT.pack(nodeid, generation, 0, 0, 0, 0) + pack_attr(st)


def pack_dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    """One ``fuse_dirent`` record, padded to 8 bytes; ``off`` is where the next read resumes."""
    rec = DIRENT.pack(ino, off, len(name), dtype) + name
    return rec + b"\0" * (-len(rec) % 8)


def xattr_reply(value: bytes, size: int) -> bytes:
    """A getxattr/listxattr answer: the size alone when asked with size 0, else the value
    (``ERANGE`` if it does not fit in ``size``)."""
    if size == 0:
        return GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value
