"""What the volume shows after an operation, and who owns what an operation makes.

`VolumeState` is mixed into the coordinator's `Namespace`. It reads back, in the same locked
step as an operation, the state the replica is to set (`events.Attr`: mode, owner, time and,
for a new inode, every extended attribute) of each inode the operation touched, parents
included (`_attrs_for`); a regular file's time is left out while a node holds its write token
(that node records it, as a `Stamp`).

A new inode belongs to the calling user (``uid``, ``gid``, ``umask`` of the request), as on a
local file system (`_settle`): a set-group-ID directory passes its group (and, to a new
directory, the bit) on; the caller's umask applies unless the directory has a default ACL,
which applies instead (the volume's file system does that part itself when the inode is made
with the requested mode).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from ..confined import Target
from ..errors import ApplyError
from ..events import Attr, Create, Exchange, Link, MetaEvent, Mkdir, Mknod, Rename, Rmdir, Symlink, Unlink

SYNC_HOLDER = "coordinator"  # a synchronisation reading a file holds its write token under this name

NEW_INODE = (Create, Mkdir, Symlink, Mknod)  # operations that make an inode (owner, umask)
ACL_DEFAULT = "system.posix_acl_default"


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


class VolumeState:
    """Reads the volume's state of inodes (lock held); uses the service's volume and tokens."""

    vol: Target
    holders: dict[int, str]

    def _stat(self, path: str) -> os.stat_result | None:
        """lstat of ``path`` on the volume ("" is the root); None if missing (lock held)."""
        try:
            return self.vol.lstat(path) if path else os.fstat(self.vol.root_fd)
        except (OSError, ApplyError):
            return None

    def _attr(self, path: str, *, xattrs: bool) -> Attr | None:
        """What ``path`` holds now (lock held): mode, owner, time (not of a file a node is
        writing: that node stamps it) and, if asked, every extended attribute."""
        st = self._stat(path)
        if st is None:
            return None
        writing = stat.S_ISREG(st.st_mode) and self.holders.get(st.st_ino, SYNC_HOLDER) != SYNC_HOLDER
        listed = None
        if xattrs:
            fd = self.vol.inode(path)
            try:
                ref = f"/proc/self/fd/{fd}"
                names = sorted(os.listxattr(ref))
                listed = tuple((n, os.getxattr(ref, n)) for n in names)
            except OSError:
                listed = None
            finally:
                os.close(fd)
        return Attr(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    None if writing else st.st_mtime_ns, listed)

    def _attrs_for(self, cls: type[MetaEvent], f: dict[str, Any]) -> tuple[Attr, ...]:
        """The inodes an operation changed, as the volume has them now (lock held)."""
        path, dst = f.get("path", ""), f.get("dst")
        if cls in NEW_INODE:
            wanted = [(path, True), (parent_of(path), False)]
        elif cls is Link:
            wanted = [(dst, False), (parent_of(dst), False)]
        elif cls in (Unlink, Rmdir):
            wanted = [(parent_of(path), False)]
        elif cls is Rename:
            wanted = [(parent_of(path), False), (parent_of(dst), False), (dst, False)]
        elif cls is Exchange:
            wanted = [(parent_of(path), False), (parent_of(dst), False), (path, False), (dst, False)]
        else:  # truncate, setattr, setxattr, removexattr
            wanted = [(path, False)]
        out: dict[str, Attr] = {}
        for p, with_xattrs in wanted:
            if p not in out:
                attr = self._attr(p, xattrs=with_xattrs)
                if attr is not None:
                    out[p] = attr
        return tuple(out.values())

    def _settle(self, path: str, mode: int | None, creds: list[Any], *, directory: bool) -> None:
        """Give the new inode at ``path`` the caller's owner and mode (see the module doc)."""
        uid, gid, umask = [*creds, None, None, None][:3]
        parent = self._stat(parent_of(path))
        inherit = parent is not None and bool(parent.st_mode & stat.S_ISGID)
        fd = self.vol.inode(path)
        try:
            ref = f"/proc/self/fd/{fd}"
            st = os.fstat(fd)
            want_uid = uid if isinstance(uid, int) else st.st_uid
            want_gid = parent.st_gid if inherit and parent is not None else (
                gid if isinstance(gid, int) else st.st_gid)
            want = None
            if mode is not None:
                if self._has_default_acl(parent_of(path)):
                    want = stat.S_IMODE(st.st_mode)  # what the inherited ACL made of it
                else:
                    want = mode & ~(umask if isinstance(umask, int) else 0) & 0o7777
                if directory:
                    want = (want & 0o1777) | (stat.S_ISGID if inherit else 0)
            if (st.st_uid, st.st_gid) != (want_uid, want_gid):
                os.chown(ref, want_uid, want_gid)  # (clears set-user-ID bits: mode comes after)
            if want is not None and stat.S_IMODE(os.fstat(fd).st_mode) != want:
                os.chmod(ref, want)
        finally:
            os.close(fd)

    def _has_default_acl(self, directory: str) -> bool:
        try:  # (through the target's cached descriptor of the directory: no open)
            os.getxattr(f"/proc/self/fd/{self.vol.dir_fd(directory)}", ACL_DEFAULT)
            return True
        except (OSError, ApplyError):
            return False
