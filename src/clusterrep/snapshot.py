"""The seed's structure snapshot: a tree walked as a stream of `Entry`, in one total order.

``walk(root)`` yields the root directory itself (path ``""``) and then every entry below it,
depth-first, a directory before its contents, the names of one directory sorted by their raw
bytes. As a sort key that is ``order_key(path)``: the tuple of the path's components as bytes
(``()`` for the root), compared element by element. It is *not* the byte order of whole paths
(``"a-b"`` sorts before ``"a/b"`` as bytes, after it here, because ``a`` is a prefix of ``a-b``),
and it is what lets two walks be merge-joined without loading either tree
(`clusterrep.treediff.compare`).

What an `Entry` holds: ``path`` (relative, ``/``-separated; names that are not UTF-8 carried as
``surrogateescape`` str, as `clusterrep.events` does; ``""`` for the root); ``kind`` (`Kind`);
``size`` in bytes (regular files only, 0 for every other kind: a directory's size depends on the
file system, a symlink's is its target's length); ``mode`` (permission bits, ``S_IMODE``; 0o777
for symlinks, which have none on Linux); numeric ``uid``/``gid``; ``mtime_ns`` (nanoseconds);
``rdev`` (character and block devices, else 0); ``target`` (symlinks, else None); ``xattrs``
(every extended attribute, ``((name, value), ...)`` sorted by the name's raw bytes, POSIX ACLs
included, read from the inode itself, symlinks included); ``inode`` ``(st_dev, st_ino)`` and
``nlink``, the hard-link key. Access and change times and inode numbers across trees are not
compared by anything: they depend on the file system, not on what was replicated.

How: every entry is opened ``O_PATH | O_NOFOLLOW`` relative to its directory's descriptor, then
``fstat``, ``readlinkat(fd, "")`` and the xattr calls through ``/proc/self/fd/N`` act on that
inode; a directory is re-opened for listing through the same ``/proc/self/fd/N`` link, so what is
listed is the inode that was stat'ed, a symlink is never followed, and paths longer than
PATH_MAX work (nothing is ever resolved from the root).

Memory: the walk holds, per directory level on the current path, one descriptor and that
directory's sorted name list; so at most ``depth`` descriptors and ``depth x widest directory``
names, never the tree. A tree deeper than the descriptor limit (``RLIMIT_NOFILE``, typically 1024
here minus what else is open) fails with ``OSError(EMFILE)``.

A live volume: an entry that is listed but gone when opened (``ENOENT``/``ENOTDIR``, also a
directory that vanished or was replaced before its listing) is skipped, and its path given to the
``vanished`` callback if one is passed; a name removed and re-created as another type is walked as
whatever ``fstat`` finds. A directory removed while it is being walked lists as empty. Nothing here
raises for such races: the event stream recorded after the sync's mark fixes them up. Other
``OSError`` (``EIO``, ``EACCES``, ``EMFILE``) propagate; the root must exist and be a directory.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from clusterrep.verify import read_xattrs

_RACES = (errno.ENOENT, errno.ENOTDIR)


class Kind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    SOCKET = "socket"
    CHAR = "char"
    BLOCK = "block"


_KINDS = {stat.S_IFREG: Kind.FILE, stat.S_IFDIR: Kind.DIR, stat.S_IFLNK: Kind.SYMLINK,
          stat.S_IFIFO: Kind.FIFO, stat.S_IFSOCK: Kind.SOCKET, stat.S_IFCHR: Kind.CHAR,
          stat.S_IFBLK: Kind.BLOCK}
FORMAT = {kind: fmt for fmt, kind in _KINDS.items()}  # Kind -> S_IFxxx, for mknod

Xattrs = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a walk (see the module docstring for each field's meaning and units)."""

    path: str
    kind: Kind
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    rdev: int = 0
    target: str | None = None
    xattrs: Xattrs = ()
    inode: tuple[int, int] = (0, 0)
    nlink: int = 1

    @property
    def key(self) -> tuple[bytes, ...]:
        return order_key(self.path)


def order_key(path: str) -> tuple[bytes, ...]:
    """The walk's sort key of ``path``: its components as raw bytes; ``()`` for the root ``""``."""
    return tuple(os.fsencode(path).split(b"/")) if path else ()


def _bytes_key(name: str) -> bytes:
    return os.fsencode(name)


def _names(dirfd: int) -> list[str]:
    """The names in directory ``dirfd``, sorted by their raw bytes."""
    return sorted(os.listdir(dirfd), key=_bytes_key)


def read_entry(path: str, fd: int) -> Entry:
    """The `Entry` for the inode ``fd`` refers to (an ``O_PATH`` descriptor is enough)."""
    st = os.fstat(fd)
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise OSError(errno.EINVAL, f"unknown file type {stat.S_IFMT(st.st_mode):o}", path)
    xattrs = tuple(sorted(read_xattrs(fd).items(), key=lambda item: os.fsencode(item[0])))
    return Entry(
        path=path, kind=kind, size=st.st_size if kind is Kind.FILE else 0, mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
        rdev=st.st_rdev if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        target=os.readlink("", dir_fd=fd) if kind is Kind.SYMLINK else None,
        xattrs=xattrs, inode=(st.st_dev, st.st_ino), nlink=st.st_nlink)


@dataclass(slots=True)
class _Dir:
    fd: int
    path: str
    names: list[str]
    at: int = 0


def walk(root: str | bytes | os.PathLike[str] | os.PathLike[bytes], *,
         vanished: Callable[[str], None] | None = None) -> Iterator[Entry]:
    """Every entry of the tree at ``root``, the root first as ``""``, in ``order_key`` order.

    Entries that disappear while walked are skipped and reported to ``vanished`` (see the module
    docstring). Closing the generator early closes every descriptor it holds.
    """
    stack: list[_Dir] = []
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        stack.append(_Dir(rootfd, "", _names(rootfd)))
        yield read_entry("", rootfd)
        while stack:
            top = stack[-1]
            if top.at >= len(top.names):
                stack.pop()
                os.close(top.fd)
                continue
            name = top.names[top.at]
            top.at += 1
            path = f"{top.path}/{name}" if top.path else name
            try:
                entry, listing = _open_entry(top.fd, name, path)
            except OSError as exc:
                if exc.errno not in _RACES:
                    raise
                if vanished is not None:
                    vanished(path)
                continue
            if listing is not None:
                stack.append(listing)
            yield entry
    finally:
        for frame in stack:
            os.close(frame.fd)


def _open_entry(dirfd: int, name: str, path: str) -> tuple[Entry, _Dir | None]:
    """``name``'s entry and, for a directory, its open listing (``ENOENT`` if it vanished)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        entry = read_entry(path, fd)
        if entry.kind is not Kind.DIR:
            return entry, None
        listfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(fd)
    try:
        return entry, _Dir(listfd, path, _names(listfd))
    except BaseException:
        os.close(listfd)
        raise
