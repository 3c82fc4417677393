"""The capture file system's inode table: the kernel's node ids mapped to backing inodes.

Each inode the kernel knows (it looked it up and has not forgotten it) is held open with an
``O_PATH`` descriptor, so every operation on it reaches that inode whatever happened to its
name meanwhile, on this host or another: renamed, replaced, unlinked. Its current name is asked
of the kernel when needed (`Inodes.path`), never remembered. Holding the descriptor also keeps
the backing inode's number from being reused while the kernel may still name it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import kernel as k

_OPATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PATH = 4096  # bytes of a volume-relative path that events carry (events.MAX_PATH_BYTES)


@dataclass
class Inode:
    nodeid: int
    fd: int  # O_PATH descriptor of the backing inode
    ino: int  # the backing inode number (also what stat shows on the mount)
    dev: int
    mode: int  # file type bits (S_IFMT part) as first seen
    nlookup: int = 0

    @property
    def proc(self) -> str:
        """A path that opens this very inode (``/proc/self/fd/N``), whatever its name."""
        return f"/proc/self/fd/{self.fd}"


class Inodes:
    def __init__(self, volume: str) -> None:
        self.volume = os.path.realpath(volume)
        fd = os.open(self.volume, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.root = Inode(k.ROOT_ID, fd, st.st_ino, st.st_dev, st.st_mode & 0o170000, 1 << 62)
        self._by_id: dict[int, Inode] = {k.ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {(st.st_dev, st.st_ino): self.root}
        self._next = k.ROOT_ID + 1
        self._lock = threading.Lock()
        # asks the cluster where file ``ino`` is (``hint``: a name it had): for a hard-linked
        # file whose name we hold went away while another name is left
        self.locate: Callable[[int, str], str | None] | None = None

    def get(self, nodeid: int) -> Inode:
        inode = self._by_id.get(nodeid)
        if inode is None:
            raise OSError(errno.ESTALE, f"unknown node id {nodeid}")
        return inode

    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Look ``name`` up in directory ``parent``; count one kernel reference to the result."""
        fd = os.open(name, _OPATH, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return self.learn(fd, st), st

    def learn(self, fd: int, st: os.stat_result) -> Inode:
        """Take ``fd`` (an O_PATH descriptor, consumed) as a kernel reference to its inode."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            inode = self._by_key.get(key)
            if inode is None:
                inode = Inode(self._next, fd, st.st_ino, st.st_dev, st.st_mode & 0o170000)
                self._next += 1
                self._by_id[inode.nodeid] = inode
                self._by_key[key] = inode
            else:
                os.close(fd)
            inode.nlookup += 1
            return inode

    def forget(self, nodeid: int, count: int) -> None:
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None or inode is self.root:
                return
            inode.nlookup -= count
            if inode.nlookup <= 0:
                del self._by_id[nodeid]
                del self._by_key[(inode.dev, inode.ino)]
                os.close(inode.fd)

    def close(self) -> None:
        """Let go of every inode (the mount is gone)."""
        with self._lock:
            for inode in self._by_id.values():
                os.close(inode.fd)
            self._by_id.clear()
            self._by_key.clear()

    def path(self, inode: Inode) -> str | None:
        """The inode's current path relative to the volume ('' for the root), or None if it has
        no name there any more (unlinked, or moved out of the volume)."""
        if inode is self.root:
            return ""
        try:
            full = os.readlink(inode.proc)
        except OSError as exc:
            if os.fstat(inode.fd).st_nlink == 0:
                return None
            # a name the kernel cannot spell out (over PATH_MAX): never mistake it for no name
            raise OSError(exc.errno or errno.ENAMETOOLONG, "the file's path cannot be read") from None
        nlink = 1 if inode.mode == stat.S_IFDIR else os.fstat(inode.fd).st_nlink
        if nlink == 0:
            return None
        if not full.startswith(self.volume + "/"):
            raise OSError(errno.EXDEV, f"{full!r} is not inside the volume")
        rel = full[len(self.volume) + 1:]
        # a file with hard links: the name we hold may be gone (" (deleted)", while another
        # name is left) or lead elsewhere now
        if (nlink > 1 or full.endswith(" (deleted)")) and not self._leads_to(rel, inode):
            # the name we opened it by went (" (deleted)"), another is left: ask where
            if self.locate is None:
                raise OSError(errno.ESTALE, "the hard link this file was known by is gone")
            found = self.locate(inode.ino, rel.removesuffix(" (deleted)"))
            if found is None:
                return None
            rel = found
        if len(os.fsencode(rel)) > MAX_PATH:
            raise OSError(errno.ENAMETOOLONG, "path longer than clusterrep carries")
        return rel

    def _leads_to(self, rel: str, inode: Inode) -> bool:
        try:
            return os.stat(rel, dir_fd=self.root.fd, follow_symlinks=False).st_ino == inode.ino
        except OSError:
            return False

    def child(self, parent: Inode, name: bytes) -> str:
        """The volume path of ``name`` in directory ``parent``; ENOENT if the directory is gone."""
        head = self.path(parent)
        if head is None:
            raise OSError(errno.ENOENT, "the directory no longer exists")
        text = os.fsdecode(name)
        path = f"{head}/{text}" if head else text
        if len(os.fsencode(path)) > MAX_PATH:
            raise OSError(errno.ENAMETOOLONG, "path longer than clusterrep carries")
        return path
