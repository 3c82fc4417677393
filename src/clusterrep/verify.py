"""Compare two directory trees: everything ``rsync -aHAX --numeric-ids`` keeps.

Used by `clusterrep verify` (volume against replica) and by the tests. For every entry, and
for the root directory itself (reported with the path ``"."``, before every other path), it
compares:

- names (``missing``, ``extra``) and types (``type``: file, directory, symlink, fifo, socket,
  character device, block device);
- contents of files (``size``, ``content``), compared in chunks, so multi-gigabyte disk images
  do not need to fit in memory; a file is read once, even when it has several hard links;
- symlink targets (``symlink``); symlinks are compared by their content and never followed;
- permission bits (``mode``, not for symlinks, which have none on Linux);
- the numeric owner, uid and gid (``owner``), symlinks included;
- the modification time to the nanosecond (``mtime``), of files, directories, special files
  and symlinks alike;
- extended attributes (``xattr``): the full set of names and values, read from the entry
  itself, never through a symlink. POSIX ACLs are the attributes system.posix_acl_access and
  system.posix_acl_default, so they are compared as well;
- the device number of character and block devices (``rdev``);
- hard links (``links``): two paths that are one inode on the volume must be one inode in the
  replica, and the other way round. One difference is reported per group of paths whose link
  structure differs, at the group's first path.

Directory sizes, link counts, inode numbers and access and change times are not compared: they
depend on the file system, not on what was replicated. Keyword flags of `compare_trees` turn
off the mode, owner, time, xattr and hard link comparisons.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CHUNK = 1 << 20
ROOT = "."  # the path differences of the compared directories themselves are reported with


@dataclass(frozen=True)
class Difference:
    path: str  # relative to the compared roots; ROOT (".") for the roots themselves
    # "missing", "extra", "type", "size", "content", "symlink", "mode", "owner", "mtime",
    # "xattr", "rdev" or "links"
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what:8} {self.path}: {self.detail}"

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "what": self.what, "detail": self.detail}


@dataclass(frozen=True)
class _Entry:
    st: os.stat_result
    xattrs: dict[str, bytes]  # empty when not read (xattrs=False) or there are none

    @property
    def inode(self) -> tuple[int, int]:
        return self.st.st_dev, self.st.st_ino


_NO_XATTRS: dict[str, bytes] = {}


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def _show(text: str) -> str:
    """``text`` as is if printable, else its repr (names need not be UTF-8: surrogateescape)."""
    return text if text.isprintable() else repr(text)


def _time(ns: int) -> str:
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def read_xattrs(fd: int) -> dict[str, bytes]:
    """Every extended attribute of the inode ``fd`` (an O_PATH descriptor is enough) refers to.

    Through /proc/self/fd the calls act on the inode itself, a symlink included, where the
    descriptor calls would refuse an O_PATH descriptor and the path calls would follow.
    """
    proc = f"/proc/self/fd/{fd}"
    try:
        names = os.listxattr(proc)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return _NO_XATTRS
        raise
    out: dict[str, bytes] = {}
    for name in names:
        try:
            out[name] = os.getxattr(proc, name)
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed since listed
                raise
    return out or _NO_XATTRS


def _entry(name: str, dirfd: int, xattrs: bool) -> _Entry:
    """lstat (and extended attributes) of ``name`` in the directory ``dirfd``."""
    if not xattrs:
        return _Entry(os.stat(name, dir_fd=dirfd, follow_symlinks=False), _NO_XATTRS)
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        return _Entry(os.fstat(fd), read_xattrs(fd))
    finally:
        os.close(fd)


def _entries(root: str, xattrs: bool) -> dict[str, _Entry]:
    """Every entry under ``root`` by relative path, and ``root`` itself as ROOT; through
    directory descriptors, so paths longer than PATH_MAX are compared too."""
    out: dict[str, _Entry] = {}
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        out[ROOT] = _entry(".", rootfd, xattrs)
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=rootfd):
            rel_dir = dirpath[2:]  # dirpath is "." or "./<relative path>"
            for name in dirnames + filenames:
                out[f"{rel_dir}/{name}" if rel_dir else name] = _entry(name, dirfd, xattrs)
    finally:
        os.close(rootfd)
    return out


def _open_under(root: str, rel: str, flags: int = os.O_RDONLY) -> int:
    """Open ``rel`` below ``root`` one component at a time (no PATH_MAX limit, no symlinks)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        *dirs, name = rel.split("/")
        for part in dirs:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _readlink_under(root: str, rel: str) -> str:
    head, _, name = rel.rpartition("/")
    fd = _open_under(root, f"{head}/." if head else ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.readlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def _first_difference(a: tuple[str, str], b: tuple[str, str]) -> int | None:
    """Offset of the first byte where file ``a`` and ``b`` (each: root, relative path) differ.
    Ranges that are holes in both (SEEK_DATA) read as zeros in both, so they are not read."""
    fa, fb = _open_under(*a), _open_under(*b)
    try:
        offset = 0
        while True:
            start = min(_next_data(fa, offset), _next_data(fb, offset))
            if start > offset:
                offset = start
            ca, cb = os.pread(fa, CHUNK, offset), os.pread(fb, CHUNK, offset)
            if ca != cb:
                for i, (x, y) in enumerate(zip(ca, cb, strict=False)):
                    if x != y:
                        return offset + i
                return offset + min(len(ca), len(cb))
            if not ca:
                return None
            offset += len(ca)
    finally:
        os.close(fa)
        os.close(fb)


def _next_data(fd: int, offset: int) -> int:
    """Where data starts at or after ``offset`` (the file's size past its last data)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return os.fstat(fd).st_size
        return offset  # no SEEK_DATA here: read everything


def _xattr_detail(a: dict[str, bytes], b: dict[str, bytes]) -> str | None:
    """Which attribute names differ between ``a`` (volume) and ``b`` (replica); None if none."""
    parts = []
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    changed = sorted(n for n in set(a) & set(b) if a[n] != b[n])
    if only_a:
        parts.append(f"missing in the replica: {', '.join(map(_show, only_a))}")
    if only_b:
        parts.append(f"not on the volume: {', '.join(map(_show, only_b))}")
    if changed:
        parts.append(f"values differ: {', '.join(map(_show, changed))}")
    return "; ".join(parts) or None


def _attr_differences(path: str, a: _Entry, b: _Entry, *, modes: bool, owners: bool,
                      times: bool, xattrs: bool) -> Iterator[Difference]:
    """Differences of the inode attributes of two entries of the same type."""
    sa, sb = a.st, b.st
    if modes and not stat.S_ISLNK(sa.st_mode) and stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
        yield Difference(path, "mode", f"{stat.S_IMODE(sa.st_mode):o} on the volume, "
                                       f"{stat.S_IMODE(sb.st_mode):o} in the replica")
    if owners and (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
        yield Difference(path, "owner", f"uid:gid {sa.st_uid}:{sa.st_gid} on the volume, "
                                        f"{sb.st_uid}:{sb.st_gid} in the replica")
    if times and sa.st_mtime_ns != sb.st_mtime_ns:
        delta = sb.st_mtime_ns - sa.st_mtime_ns
        yield Difference(path, "mtime", f"{_time(sa.st_mtime_ns)} on the volume, "
                                        f"{_time(sb.st_mtime_ns)} in the replica (replica "
                                        f"{'newer' if delta > 0 else 'older'} by {_time(abs(delta))} s)")
    if xattrs:
        detail = _xattr_detail(a.xattrs, b.xattrs)
        if detail is not None:
            yield Difference(path, "xattr", detail)


def _link_differences(paths: Iterable[str], exp: dict[str, _Entry],
                      act: dict[str, _Entry]) -> dict[str, Difference]:
    """Hard link structure differences among ``paths`` (non-directories of the same type on
    both sides), keyed by the first path of each differing group.

    Paths are joined into groups when they share an inode on either side; a group differs when
    its paths do not fall into the same inodes on both sides.
    """
    paths = sorted(paths)
    parent = {p: p for p in paths}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for side in (exp, act):
        first: dict[tuple[int, int], str] = {}
        for p in paths:
            other = first.setdefault(side[p].inode, p)
            if other != p:
                ra, rb = find(other), find(p)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(find(p), []).append(p)

    def inodes(members: list[str], side: dict[str, _Entry]) -> list[list[str]]:
        by_inode: dict[tuple[int, int], list[str]] = {}
        for p in members:
            by_inode.setdefault(side[p].inode, []).append(p)
        return sorted(by_inode.values())

    def show(split: list[list[str]]) -> str:
        return "; ".join(" = ".join(map(_show, same)) for same in split)

    out: dict[str, Difference] = {}
    for head, members in groups.items():
        if len(members) < 2:
            continue
        on_volume, in_replica = inodes(members, exp), inodes(members, act)
        if on_volume != in_replica:
            out[head] = Difference(head, "links", f"inodes on the volume: {show(on_volume)}; "
                                                  f"in the replica: {show(in_replica)}")
    return out


def compare_trees(expected: str | os.PathLike[str], actual: str | os.PathLike[str], *,
                  modes: bool = True, owners: bool = True, times: bool = True,
                  xattrs: bool = True, links: bool = True) -> Iterator[Difference]:
    """Yield every difference of ``actual`` from ``expected``: the roots themselves first (as
    path "."), then in path order.

    ``modes``, ``owners``, ``times``, ``xattrs`` and ``links`` turn the comparison of
    permission bits, uid/gid, modification times, extended attributes (and so ACLs) and the
    hard link structure on or off. Names, types, sizes, contents, symlink targets and device
    numbers are always compared.
    """
    exp_root, act_root = os.fspath(expected), os.fspath(actual)
    exp, act = _entries(exp_root, xattrs), _entries(act_root, xattrs)
    attrs = {"modes": modes, "owners": owners, "times": times, "xattrs": xattrs}
    yield from _attr_differences(ROOT, exp[ROOT], act[ROOT], **attrs)
    del exp[ROOT], act[ROOT]

    paths = sorted(set(exp) | set(act))
    linked: dict[str, Difference] = {}
    if links:
        linked = _link_differences(
            (p for p in paths if p in exp and p in act and not stat.S_ISDIR(exp[p].st.st_mode)
             and _kind(exp[p].st.st_mode) == _kind(act[p].st.st_mode)), exp, act)
    compared: dict[tuple[tuple[int, int], tuple[int, int]], int | None] = {}
    for path in paths:
        a, b = exp.get(path), act.get(path)
        if b is None:
            yield Difference(path, "missing", f"{_kind(a.st.st_mode)} missing in the replica")  # type: ignore[union-attr]
            continue
        if a is None:
            yield Difference(path, "extra", f"{_kind(b.st.st_mode)} not on the volume")
            continue
        sa, sb = a.st, b.st
        ka, kb = _kind(sa.st_mode), _kind(sb.st_mode)
        if ka != kb:
            yield Difference(path, "type", f"{ka} on the volume, {kb} in the replica")
            continue
        if ka == "symlink":
            ta, tb = _readlink_under(exp_root, path), _readlink_under(act_root, path)
            if ta != tb:
                yield Difference(path, "symlink", f"points to {ta!r}, replica to {tb!r}")
        yield from _attr_differences(path, a, b, **attrs)
        if path in linked:
            yield linked[path]
        if ka in ("character device", "block device") and sa.st_rdev != sb.st_rdev:
            yield Difference(path, "rdev", f"device {os.major(sa.st_rdev)}:{os.minor(sa.st_rdev)} "
                                           f"on the volume, {os.major(sb.st_rdev)}:"
                                           f"{os.minor(sb.st_rdev)} in the replica")
        if ka == "file":
            if sa.st_size != sb.st_size:
                yield Difference(path, "size", f"{sa.st_size} bytes on the volume, {sb.st_size} "
                                               "in the replica")
                continue
            pair = (a.inode, b.inode)
            if pair in compared:  # another hard link to the same two inodes: read already
                at = compared[pair]
            else:
                at = _first_difference((exp_root, path), (act_root, path))
                if sa.st_nlink > 1 or sb.st_nlink > 1:
                    compared[pair] = at
            if at is not None:
                yield Difference(path, "content", f"first differing byte at offset {at}")
