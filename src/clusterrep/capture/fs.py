"""The capture file system: a FUSE pass-through over the volume that records every change.

Reads and data writes go straight to the backing files (the *direct I/O* path); each write is
recorded by the `NodeAgent` under the file's lock and write token. Metadata operations (create,
open for writing, close, mkdir, rmdir, unlink, rename, truncate, chmod, utimens, symlink) are
sent to the coordinator, which executes them on the volume; the agent records its own copy.

Handlers may raise only OSError (mfusepy turns it into the errno); anything else is logged and
answered with EIO, so a bug never takes the mount down. Nothing is cached by inode: every call
resolves its path against the volume afresh (another host may have renamed or deleted it), and
the mount is made with zero attribute/entry timeouts and without write-back caching, so a write
is on the volume when the call returns and an open sees what other hosts wrote before it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import mfusepy as fuse

from ..errors import ClusterrepError
from ..node.agent import NodeAgent

log = logging.getLogger("clusterrep.capture")
F = TypeVar("F", bound=Callable[..., Any])
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
MAX_RACE_RETRIES = 1000  # an open that loses this many races in a row to other hosts fails (EIO)

# Shared-volume consistency and speed (measured, see docs/benchmarks.md):
MOUNT_OPTIONS: dict[str, Any] = {
    "attr_timeout": 0,  # sizes and modes changed by other hosts are seen at once
    "entry_timeout": 0,  # names created, renamed or removed by other hosts too
    "negative_timeout": 0,
    "use_ino": True,
    "hard_remove": True,  # unlink while open really unlinks (no .fuse_hidden files on the volume)
    "auto_unmount": True,  # a killed node agent leaves no dead mount behind
}
MAX_WRITE = 1 << 20  # 1 MiB write requests for sequential I/O (set in init: not a mount option)


def guarded(func: F) -> F:
    """Turn every non-OSError exception into EIO (logged), so the mount survives bugs."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OSError:
            raise
        except Exception:
            log.exception("capture: %s failed", func.__name__)
            raise OSError(errno.EIO, "internal error in clusterrep capture") from None

    return wrapper  # type: ignore[return-value]


@dataclass
class Handle:
    ino: int
    path: str
    write: bool
    append: bool = False  # O_APPEND: each write goes to the file's end as the volume has it


def _backing_flags(flags: int) -> int:
    """Flags for the backing file of a write handle. O_APPEND is dropped: the kernel already
    chose the offset, and pwrite on an O_APPEND descriptor would ignore it (Linux), so the data
    could land elsewhere than the offset we record. Creation and truncation were done by the
    coordinator. O_DIRECT is dropped too (FUSE hands us unaligned buffers; the kernel side of the
    mount already bypasses its cache as the application asked)."""
    return (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_DIRECT)) | os.O_CLOEXEC


def rel(path: str) -> str:
    return path.lstrip("/") or "."


class CaptureFS(fuse.Operations):
    use_ns = True

    def __init__(self, volume: str, agent: NodeAgent) -> None:
        self.volume = os.path.realpath(volume)
        self.root = os.open(self.volume, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.agent = agent
        self.handles: dict[int, Handle] = {}
        self._lock = threading.Lock()
        self.mounted = False

    # -- life cycle --------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        self.mounted = True
        if conn is not None:
            conn.want &= ~FUSE_CAP_WRITEBACK_CACHE  # write-through only, whatever the default
            conn.max_write = MAX_WRITE

    # -- reading -----------------------------------------------------------------------------

    @guarded
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.stat(rel(path), dir_fd=self.root,
                                                         follow_symlinks=False)
        return {
            "st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_uid": st.st_uid,
            "st_gid": st.st_gid, "st_size": st.st_size, "st_ino": st.st_ino,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
            "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
        }

    @guarded
    def readdir(self, path: str, fh: int) -> list[Any]:
        # with use_ino the kernel drops entries whose inode is 0: give the real ones
        fd = os.open(rel(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root)
        try:
            here = os.fstat(fd)
            out: list[Any] = [(".", {"st_mode": here.st_mode, "st_ino": here.st_ino}, 0),
                              ("..", {"st_mode": stat.S_IFDIR, "st_ino": 1}, 0)]
            with os.scandir(fd) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    out.append((entry.name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
            return out
        finally:
            os.close(fd)

    @guarded
    def readlink(self, path: str) -> str:
        return os.readlink(rel(path), dir_fd=self.root)

    @guarded
    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.volume)
        return {k: getattr(sv, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
            "f_files", "f_flag", "f_frsize", "f_namemax")}

    @guarded
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    # -- files -------------------------------------------------------------------------------

    def _register(self, fd: int, handle: Handle) -> int:
        with self._lock:
            self.handles[fd] = handle
        return fd

    @guarded
    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        """``open(O_CREAT)`` of a name the kernel found missing. Without ``O_EXCL`` another host
        may create it first: then this opens that file, as one file system would."""
        p = rel(path)
        for _ in range(MAX_RACE_RETRIES):
            if not flags & os.O_EXCL:
                try:
                    return self._open_for_write(p, flags)
                except FileNotFoundError:
                    pass
            try:
                reply = self.agent.meta("create", path=p, mode=mode & 0o7777)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                continue  # created by another host meanwhile: open it
            ino = int(reply["ino"])
            fd = self._open_created(p, flags, ino)
            return self._register(fd, Handle(ino, p, True, bool(flags & os.O_APPEND)))
        raise OSError(errno.EIO, f"create of {p!r} kept racing other hosts")

    def _open_created(self, p: str, flags: int, ino: int) -> int:
        """The backing descriptor of the file the coordinator just created as ``ino``, wherever
        another host's rename has moved it since; an anonymous file if it was already removed
        (what the program writes then goes nowhere, as to a file unlinked while open)."""
        for _ in range(MAX_RACE_RETRIES):
            try:
                fd = os.open(p, _backing_flags(flags) | os.O_NOFOLLOW, dir_fd=self.root)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
                    raise
            else:
                if os.fstat(fd).st_ino == ino:
                    return fd
                os.close(fd)
            where = self.agent.where(ino, p)
            if where is None:
                self.agent.orphaned(ino)
                return os.open(self.agent.state, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            p = where
        raise OSError(errno.EIO, f"created file {p!r} kept moving while being opened")

    def _open_for_write(self, p: str, flags: int) -> int:
        """Open an existing file for writing, in the coordinator's order: open the backing file,
        then the coordinator confirms (under its lock, as an ``Open`` mark) that this inode is
        still the one named ``p``; if a rename or unlink got in between, open again."""
        for _ in range(MAX_RACE_RETRIES):
            fd = os.open(p, _backing_flags(flags), dir_fd=self.root)
            try:
                ino = os.fstat(fd).st_ino
                self.agent.meta("open", path=p, ino=ino)
                if flags & os.O_TRUNC:
                    self._truncate_open(fd, ino, p, 0)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.ESTALE:
                    continue
                raise
            return self._register(fd, Handle(ino, p, True, bool(flags & os.O_APPEND)))
        raise OSError(errno.EIO, f"open of {p!r} kept racing other hosts")

    def _truncate_open(self, fd: int, ino: int, hint: str, length: int) -> None:
        """Truncate the file open as ``fd``, whatever its name is now; one without a name any
        more is truncated here alone (nothing to replicate)."""
        try:
            self.agent.meta("truncate", path=self.agent.paths.get(ino, hint), size=length, ino=ino)
        except FileNotFoundError:
            os.ftruncate(fd, length)

    @guarded
    def open(self, path: str, flags: int) -> int:
        p = rel(path)
        if flags & _WRITE_FLAGS:
            return self._open_for_write(p, flags)
        fd = os.open(p, (flags & ~(os.O_TRUNC | os.O_DIRECT)) | os.O_CLOEXEC, dir_fd=self.root)
        return self._register(fd, Handle(os.fstat(fd).st_ino, p, False))

    @guarded
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        handle = self.handles.get(fh)
        if handle is None or not handle.write:
            raise OSError(errno.EBADF, "not open for writing")
        return self.agent.write(handle.ino, handle.path, fh, data, offset, append=handle.append)

    def _target(self, path: str | None, fh: int | None) -> dict[str, Any]:
        """Which file an attribute change is for: by inode when the caller has it open, since
        another host may have renamed it (libfuse's path would then be stale)."""
        handle = self.handles.get(fh) if fh is not None else None
        if handle is not None:
            return {"path": self.agent.paths.get(handle.ino, handle.path), "ino": handle.ino}
        if path is None:
            raise OSError(errno.EBADF, "no path and no open file")
        return {"path": rel(path)}

    @guarded
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        handle = self.handles.get(fh) if fh is not None else None
        if handle is not None:
            self._truncate_open(fh, handle.ino, handle.path, length)  # type: ignore[arg-type]
        else:
            self.agent.meta("truncate", size=length, **self._target(path, None))
        return 0

    @guarded
    def flush(self, path: str, fh: int) -> int:
        return 0

    @guarded
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    @guarded
    def release(self, path: str, fh: int) -> int:
        with self._lock:
            handle = self.handles.pop(fh, None)
            last = handle is not None and all(h.ino != handle.ino for h in self.handles.values())
        if last:
            self.agent.released(handle.ino)  # type: ignore[union-attr]
        try:
            if handle is not None and handle.write:
                current = self.agent.paths.get(handle.ino, handle.path)
                try:
                    self.agent.meta("close", path=current, ino=handle.ino)
                except OSError as exc:
                    log.warning("close of %s not recorded: %s", current, exc)
        finally:
            os.close(fh)
        return 0

    # -- namespace and attributes (through the coordinator) ----------------------------------

    @guarded
    def mkdir(self, path: str, mode: int) -> int:
        self.agent.meta("mkdir", path=rel(path), mode=mode & 0o7777)
        return 0

    @guarded
    def rmdir(self, path: str) -> int:
        self.agent.meta("rmdir", path=rel(path))
        return 0

    @guarded
    def unlink(self, path: str) -> int:
        self.agent.meta("unlink", path=rel(path))
        return 0

    @guarded
    def symlink(self, target: str, source: str) -> int:
        # mfusepy: ``target`` is the new link's path, ``source`` its content
        self.agent.meta("symlink", path=rel(target), target=source)
        return 0

    @guarded
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if flags & RENAME_NOREPLACE:  # decided by the coordinator, atomically: one host wins
            self.agent.meta("rename", path=rel(old), dst=rel(new), noreplace=True)
        else:
            self.agent.meta("rename", path=rel(old), dst=rel(new))
        return 0

    @guarded
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self.agent.meta("setattr", mode=mode & 0o7777, **self._target(path, fh))
        return 0

    @guarded
    def utimens(self, path: str | None, times: tuple[int, int] | None = None,
                fh: int | None = None) -> int:
        # UTIME_NOW becomes "now" (the coordinator's clock: a node's may be skewed by hours);
        # UTIME_OMIT leaves that time alone
        atime, mtime = times if times is not None else (UTIME_NOW, UTIME_NOW)
        fields: dict[str, Any] = {}
        for name, value in (("atime_ns", atime), ("mtime_ns", mtime)):
            if value == UTIME_NOW:
                fields[name] = "now"
            elif value != UTIME_OMIT:
                fields[name] = int(value)
        if fields:
            self.agent.meta("setattr", **fields, **self._target(path, fh))
        return 0

    @guarded
    def chown(self, path: str, uid: int, gid: int) -> int:
        # ownership is not replicated (see docs); pass it through so tools like tar work
        os.chown(rel(path), uid, gid, dir_fd=self.root, follow_symlinks=False)
        return 0

    @guarded
    def link(self, target: str, source: str) -> int:
        raise OSError(errno.EOPNOTSUPP, "hard links are not supported on a replicated volume")

    @guarded
    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise OSError(errno.EOPNOTSUPP, "special files are not supported on a replicated volume")


def _fh(fip: Any) -> int | None:
    return fip.contents.fh if fip else None


class CaptureFUSE(fuse.FUSE):  # type: ignore[misc]
    """mfusepy with the libfuse 3 arguments it drops passed on: the open file of ftruncate,
    fchmod and futimens (a path alone may be stale on a shared volume), and rename flags (an
    exchange must be refused, not silently run as a plain rename)."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(self._path(path), length, _fh(fip))  # type: ignore[no-any-return]

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(self._path(path), mode, _fh(fip))  # type: ignore[no-any-return]

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            times = (fuse.time_of_timespec(buf.contents.actime, use_ns=True),
                     fuse.time_of_timespec(buf.contents.modtime, use_ns=True))
        return self.operations.utimens(self._path(path), times, _fh(fip))  # type: ignore[no-any-return]

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        if flags & ~RENAME_NOREPLACE:  # RENAME_EXCHANGE, RENAME_WHITEOUT: not supported
            return -errno.EINVAL
        return self.operations.rename(self._path(old), self._path(new), flags)  # type: ignore[no-any-return]

    def open(self, path: bytes, fip: Any) -> int:
        result = super().open(path, fip)
        self._cache_mode(fip)
        return result  # type: ignore[no-any-return]

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        result = super().create(path, mode, fip)
        self._cache_mode(fip)
        return result  # type: ignore[no-any-return]

    def _cache_mode(self, fip: Any) -> None:
        """An O_APPEND handle bypasses the kernel's page cache: the kernel picks the offset of
        an append from its own idea of the size, which another host's appends make stale; we
        write at the volume's end instead, and cached pages at the kernel's offset would lie."""
        fi = fip.contents
        handle = self.operations.handles.get(fi.fh)
        if handle is not None and handle.append:
            fi.direct_io = 1

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not getattr(_thread, "pinned", False):
            _pin_thread_state()
        return super()._wrapper(func, *args, **kwargs)


_thread = threading.local()


def _pin_thread_state() -> None:
    """Keep this libfuse worker thread's Python thread state for good.

    ctypes enters a callback from a foreign thread with PyGILState_Ensure and leaves it with
    PyGILState_Release; for a thread Python did not start, that creates and destroys a whole
    thread state on every call (strace: a gettid, an mmap and a munmap of the frame stack per
    FUSE request). One extra Ensure that is never released keeps the state alive, so later
    callbacks only take and drop the GIL. A worker thread libfuse retires leaves one small
    thread state behind.
    """
    ctypes.pythonapi.PyGILState_Ensure()
    _thread.pinned = True


def mount(fs: CaptureFS, mountpoint: str, *, foreground: bool = True) -> None:
    """Mount ``fs`` and serve until unmounted or signalled (libfuse handles SIGINT/SIGTERM)."""
    try:
        CaptureFUSE(fs, mountpoint, foreground=foreground, nothreads=False, fsname="clusterrep",
                  **MOUNT_OPTIONS)
    except RuntimeError as exc:
        # libfuse returns non-zero when its loop ended by a signal; that is a clean stop once
        # the mount is gone
        if not fs.mounted or os.path.ismount(mountpoint):
            raise ClusterrepError(f"FUSE failed on {mountpoint}: {exc}") from None
        log.debug("FUSE loop ended (%s)", exc)
