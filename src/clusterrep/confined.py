"""The target directory: every change the applier makes, confined beneath one directory.

Paths are resolved one component at a time relative to directory file descriptors, with
``O_NOFOLLOW``: a symlink or a non-directory standing where a directory must be is refused with
`TargetEscape`, so nothing outside the target is ever touched, whatever the target contains.
Files are only opened if they are regular files (a FIFO or device swapped in is refused).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections import OrderedDict

from .durable import syncfs
from .errors import ApplyError, TargetEscape
from .events import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, Attr

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
MAX_OPEN_FILES = 256
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
ZERO_CHUNK = 1 << 20


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode (Python's ``os.posix_fallocate`` has none). Raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(length, ZERO_CHUNK))
    while length > 0:
        n = os.pwrite(fd, zeros[:min(length, len(zeros))], offset)
        offset += n
        length -= n


def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
    """``renameat2(2)`` (glibc 2.28+; Python has no wrapper). Raises OSError like ``os.rename``."""
    if _libc.renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def _check_name(name: str, path: str) -> None:
    """A component may not step out of its directory (the paths given are checked already;
    this is the last line of defence)."""
    if name in ("", ".", "..") or "\0" in name:
        raise TargetEscape(f"{path!r} has a component {name!r} that is not a name; refusing it")


class Target:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        try:
            self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ApplyError(f"target directory {self.root} does not exist",
                             hint="create it or pass an existing directory") from None
        except NotADirectoryError:
            raise ApplyError(f"target {self.root} is not a directory") from None
        self._dirs: dict[str, int] = {}
        self._files: OrderedDict[str, int] = OrderedDict()

    # -- resolution --------------------------------------------------------------------------

    def _dir(self, path: str) -> int:
        """File descriptor of directory ``path`` ('' is the root), opened without following links."""
        if not path:
            return self.root_fd
        fd = self._dirs.get(path)
        if fd is not None:
            return fd
        head, _, name = path.rpartition("/")
        parent = self._dir(head)
        _check_name(name, path)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise TargetEscape(f"{path!r} in the target is not a directory (a symlink or file "
                                   "stands there); refusing to go through it") from None
            if exc.errno == errno.ENOENT:
                raise ApplyError(f"directory {path!r} is missing in the target",
                                 errno=errno.ENOENT) from None
            raise ApplyError(f"cannot open directory {path!r} in the target: {exc}",
                             errno=exc.errno or errno.EIO) from None
        self._dirs[path] = fd
        return fd

    def dir_fd(self, path: str) -> int:
        """The (cached) descriptor of directory ``path`` ("" is the root); the target owns it."""
        return self._dir(path)

    def parent(self, path: str) -> tuple[int, str]:
        head, _, name = path.rpartition("/")
        _check_name(name, path)
        return self._dir(head), name

    def _file(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is not None:
            self._files.move_to_end(path)
            return fd
        parent, name = self.parent(path)
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise self._file_error(path, exc) from None
        self._remember(path, fd)
        return fd

    def _remember(self, path: str, fd: int) -> None:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise TargetEscape(f"{path!r} in the target is not a regular file; refusing to write it",
                               errno=errno.EINVAL)
        self._files[path] = fd
        if len(self._files) > MAX_OPEN_FILES:
            _, old = self._files.popitem(last=False)
            os.close(old)

    @staticmethod
    def _file_error(path: str, exc: OSError) -> ApplyError:
        if exc.errno == errno.ELOOP:
            return TargetEscape(f"{path!r} in the target is a symlink; refusing to write through it")
        if exc.errno == errno.ENOENT:
            return ApplyError(f"file {path!r} is missing in the target", errno=errno.ENOENT)
        if exc.errno == errno.EISDIR:
            return ApplyError(f"{path!r} in the target is a directory, expected a file", errno=errno.EISDIR)
        return ApplyError(f"cannot open {path!r} in the target: {exc}", errno=exc.errno or errno.EIO)

    def _drop_cached(self, path: str) -> None:
        """A name about to be replaced: its cached write descriptor must not outlive it."""
        old = self._files.pop(path, None)
        if old is not None:
            os.close(old)

    def forget(self) -> None:
        """Drop cached descriptors (after a change to the namespace)."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    # -- operations --------------------------------------------------------------------------

    def write(self, path: str, offset: int, data: bytes) -> None:
        fd = self._files.get(path)
        if fd is None:
            fd = self._file(path)
        n = os.pwrite(fd, data, offset)
        if n != len(data):  # short write: finish it
            view = memoryview(data)[n:]
            offset += n
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n

    def truncate(self, path: str, size: int) -> None:
        os.ftruncate(self._file(path), size)

    def file_fd(self, path: str) -> int:
        """The cached read-write descriptor of regular file ``path`` (the target owns it; it
        stays valid until the next change to the namespace)."""
        fd = self._files.get(path)
        return fd if fd is not None else self._file(path)

    def link_out(self, path: str, dir_fd: int, name: str) -> None:
        """Give the inode at ``path`` the further name ``name`` in directory ``dir_fd`` (outside
        the target, on the same file system), never following a symlink."""
        parent, own = self.parent(path)
        os.link(own, name, src_dir_fd=parent, dst_dir_fd=dir_fd, follow_symlinks=False)

    def create(self, path: str, mode: int, *, exist_ok: bool, as_given: bool = False) -> None:
        """Create an empty regular file; with ``exist_ok``, empty an existing one (replay).
        With ``as_given`` it is created with ``mode`` as the file system takes it (the
        process's umask or the directory's default ACL applied), and no chmod follows."""
        parent, name = self.parent(path)
        old = self._files.pop(path, None)
        if old is not None:
            os.close(old)
        flags = _FILE_FLAGS | os.O_CREAT | os.O_TRUNC | (0 if exist_ok else os.O_EXCL)
        try:
            fd = os.open(name, flags, mode if as_given else 0o600, dir_fd=parent)
        except FileExistsError:
            raise ApplyError(f"cannot create {path!r}: it exists in the target", errno=errno.EEXIST) from None
        except OSError as exc:
            raise self._file_error(path, exc) from None
        self._remember(path, fd)
        if not as_given:
            os.fchmod(fd, mode)

    def mkdir(self, path: str, mode: int, *, exist_ok: bool, as_given: bool = False) -> None:
        """Create a directory (``as_given``: as for `create`)."""
        parent, name = self.parent(path)
        try:
            os.mkdir(name, mode if as_given else 0o700, dir_fd=parent)
        except FileExistsError:
            if not exist_ok:
                raise ApplyError(f"cannot create directory {path!r}: it exists in the target",
                                 errno=errno.EEXIST) from None
        fd = self._dir(path)
        if not as_given:
            os.fchmod(fd, mode)

    def rmdir(self, path: str, *, missing_ok: bool) -> None:
        parent, name = self.parent(path)
        try:
            os.rmdir(name, dir_fd=parent)
        except FileNotFoundError:
            if not missing_ok:
                raise ApplyError(f"cannot remove directory {path!r}: missing in the target",
                                 errno=errno.ENOENT) from None
        except OSError as exc:
            raise ApplyError(f"cannot remove directory {path!r} in the target: {exc}",
                             errno=exc.errno or errno.EIO) from None
        finally:
            self.forget()

    def unlink(self, path: str, *, missing_ok: bool) -> None:
        parent, name = self.parent(path)
        old = self._files.pop(path, None)
        if old is not None:
            os.close(old)
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            if not missing_ok:
                raise ApplyError(f"cannot remove {path!r}: missing in the target",
                                 errno=errno.ENOENT) from None
        except IsADirectoryError:
            raise ApplyError(f"cannot unlink {path!r}: it is a directory in the target",
                             errno=errno.EISDIR) from None

    def exists(self, path: str) -> bool:
        parent, name = self.parent(path)
        try:
            os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def lstat(self, path: str) -> os.stat_result:
        """``lstat`` of ``path`` (raises FileNotFoundError)."""
        parent, name = self.parent(path)
        return os.stat(name, dir_fd=parent, follow_symlinks=False)

    def rename(self, src: str, dst: str, *, noreplace: bool = False) -> None:
        """Rename ``src`` to ``dst``; with ``noreplace``, fail with EEXIST if ``dst`` exists
        (one atomic ``renameat2(RENAME_NOREPLACE)``, never a check then a rename)."""
        sparent, sname = self.parent(src)
        dparent, dname = self.parent(dst)
        try:
            if noreplace:
                renameat2(sparent, sname, dparent, dname, RENAME_NOREPLACE)
            else:
                os.rename(sname, dname, src_dir_fd=sparent, dst_dir_fd=dparent)
        except OSError as exc:
            raise ApplyError(f"cannot rename {src!r} to {dst!r} in the target: {exc}",
                             errno=exc.errno or errno.EIO) from None
        finally:
            self.forget()

    def inode(self, path: str) -> int:
        """An ``O_PATH`` descriptor of the inode at ``path`` ("" is the root), never following
        a symlink. Its ``/proc/self/fd/N`` name reaches that very inode (a symlink included)
        for chmod, chown, utime and xattr calls. The caller closes it."""
        if path == "":  # (the directory opened at start, not whatever its name leads to now)
            return os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        parent, name = self.parent(path)
        try:
            return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            raise self._file_error(path, exc) from None

    def setattr(self, path: str, mode: int | None, atime_ns: int | None, mtime_ns: int | None,
                uid: int | None = None, gid: int | None = None) -> None:
        """Set what is not None of ``path`` ("" is the root): owner first (a chown clears
        set-user-ID bits), then mode, then times."""
        fd = self.inode(path)
        try:
            ref = f"/proc/self/fd/{fd}"
            if uid is not None or gid is not None:
                os.chown(ref, -1 if uid is None else uid, -1 if gid is None else gid)
            st = os.fstat(fd)
            if mode is not None and not stat.S_ISLNK(st.st_mode):
                os.chmod(ref, mode)  # (through the O_PATH descriptor: the inode itself)
            if atime_ns is not None or mtime_ns is not None:
                times = (st.st_atime_ns if atime_ns is None else atime_ns,
                         st.st_mtime_ns if mtime_ns is None else mtime_ns)
                os.utime(ref, ns=times)
        finally:
            os.close(fd)

    def apply_attr(self, attr: Attr) -> None:
        """Make ``attr.path`` hold exactly what ``attr`` says: owner, extended attributes (when
        listed: others are removed), mode, then modification time (the access time stays)."""
        fd = self.inode(attr.path)
        try:
            ref = f"/proc/self/fd/{fd}"
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (attr.uid, attr.gid):
                os.chown(ref, attr.uid, attr.gid)
            if attr.xattrs is not None:
                wanted = dict(attr.xattrs)
                for name in os.listxattr(ref):
                    if name not in wanted:
                        os.removexattr(ref, name)
                for name, value in attr.xattrs:
                    os.setxattr(ref, name, value)
            st = os.fstat(fd)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != attr.mode:
                os.chmod(ref, attr.mode)
            if attr.mtime_ns is not None and st.st_mtime_ns != attr.mtime_ns:
                os.utime(ref, ns=(st.st_atime_ns, attr.mtime_ns))
        finally:
            os.close(fd)

    def stamp(self, path: str, mtime_ns: int) -> None:
        """Set the modification time of ``path`` (the access time stays)."""
        self.setattr(path, None, None, mtime_ns)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        fd = self.inode(path)
        try:
            os.setxattr(f"/proc/self/fd/{fd}", name, value)
        finally:
            os.close(fd)

    def removexattr(self, path: str, name: str, *, missing_ok: bool) -> None:
        fd = self.inode(path)
        try:
            os.removexattr(f"/proc/self/fd/{fd}", name)
        except OSError as exc:
            if exc.errno != errno.ENODATA or not missing_ok:
                raise
        finally:
            os.close(fd)

    def link(self, src: str, dst: str, *, replace: bool) -> None:
        """Give the inode at ``src`` the further name ``dst`` (never following a symlink);
        with ``replace`` (replay), a ``dst`` that is already that inode is left, another one
        replaced."""
        sparent, sname = self.parent(src)
        dparent, dname = self.parent(dst)
        try:
            os.link(sname, dname, src_dir_fd=sparent, dst_dir_fd=dparent, follow_symlinks=False)
        except FileExistsError:
            if not replace:
                raise ApplyError(f"cannot link {dst!r}: it exists in the target",
                                 errno=errno.EEXIST) from None
            if self.lstat(dst).st_ino == self.lstat(src).st_ino:
                return
            self.unlink(dst, missing_ok=True)
            os.link(sname, dname, src_dir_fd=sparent, dst_dir_fd=dparent, follow_symlinks=False)
        except OSError as exc:
            raise ApplyError(f"cannot link {src!r} to {dst!r} in the target: {exc}",
                             errno=exc.errno or errno.EIO) from None

    def mknod(self, path: str, mode: int, rdev: int, *, replace: bool, as_given: bool = False) -> None:
        """Create a FIFO, socket or device node (``mode``: type and permission bits). With
        ``as_given`` the permission bits are left as the file system made them of ``mode``
        (umask or the directory's default ACL), as for `create`."""
        parent, name = self.parent(path)
        self._drop_cached(path)
        first = mode if as_given else stat.S_IFMT(mode) | 0o600
        try:
            os.mknod(name, first, rdev, dir_fd=parent)
        except FileExistsError:
            if not replace:
                raise ApplyError(f"cannot create {path!r}: it exists in the target",
                                 errno=errno.EEXIST) from None
            os.unlink(name, dir_fd=parent)
            os.mknod(name, first, rdev, dir_fd=parent)
        except OSError as exc:
            raise ApplyError(f"cannot create special file {path!r} in the target: {exc}",
                             errno=exc.errno or errno.EIO) from None
        if not as_given:
            os.chmod(f"/proc/self/fd/{parent}/{name}", stat.S_IMODE(mode), follow_symlinks=True)

    def exchange(self, src: str, dst: str) -> None:
        """Swap the names ``src`` and ``dst`` atomically (``renameat2(RENAME_EXCHANGE)``)."""
        sparent, sname = self.parent(src)
        dparent, dname = self.parent(dst)
        try:
            renameat2(sparent, sname, dparent, dname, RENAME_EXCHANGE)
        except OSError as exc:
            raise ApplyError(f"cannot exchange {src!r} and {dst!r} in the target: {exc}",
                             errno=exc.errno or errno.EIO) from None
        finally:
            self.forget()

    def fallocate(self, path: str, mode: int, offset: int, length: int) -> bool:
        """``fallocate`` on ``path``; if the target's file system refuses the mode, the same
        result is made by hand (zeros written, the size extended). Returns False if emulated."""
        fd = self._file(path)
        try:
            fallocate(fd, mode, offset, length)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        size = os.fstat(fd).st_size
        end = offset + length
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            _write_zeros(fd, offset, max(0, min(end, size) - offset))  # the range reads as zeros
        if not mode & FALLOC_FL_KEEP_SIZE and end > size:
            os.ftruncate(fd, end)  # (the new part reads as zeros, as allocated space does)
        return False

    def symlink(self, path: str, target: str, *, replace: bool) -> None:
        parent, name = self.parent(path)
        self._drop_cached(path)
        try:
            os.symlink(target, name, dir_fd=parent)
        except FileExistsError:
            if not replace:
                raise ApplyError(f"cannot create symlink {path!r}: it exists in the target",
                                 errno=errno.EEXIST) from None
            os.unlink(name, dir_fd=parent)
            os.symlink(target, name, dir_fd=parent)

    def sync(self) -> None:
        """Make everything written so far durable."""
        syncfs(self.root_fd)

    def close(self) -> None:
        self.forget()
        os.close(self.root_fd)
