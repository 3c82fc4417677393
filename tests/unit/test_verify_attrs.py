"""`compare_trees` compares what `rsync -aHAX --numeric-ids` keeps: owners, modification
times, extended attributes (and so ACLs), hard links, special file types and device numbers,
for the roots too, and says which attribute differs. These tests run as root."""

from __future__ import annotations

import os
import shutil
import stat
import struct
from pathlib import Path

import pytest

from clusterrep.verify import ROOT, Difference, compare_trees

T0 = 1_600_000_000_123_456_789  # an mtime in nanoseconds, with a sub-microsecond part

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown, mknod and trusted.* need root")


def diffs(a: Path, b: Path, **flags: bool) -> list[Difference]:
    return list(compare_trees(a, b, **flags))


def kinds(a: Path, b: Path, **flags: bool) -> list[tuple[str, str]]:
    return [(d.path, d.what) for d in diffs(a, b, **flags)]


def freeze(root: Path) -> None:
    """Give every entry below and including ``root`` the same mtime (deepest first, so setting
    one does not disturb its directory's)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(T0, T0), follow_symlinks=False)
    os.utime(root, ns=(T0, T0))


def build(root: Path) -> Path:
    """A small tree with a file, a directory, a symlink and a hard link, all with fixed times."""
    root.mkdir()
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"hello")
    (root / "g").write_bytes(b"world")
    os.link(root / "g", root / "h")
    os.symlink("d/f", root / "l")
    freeze(root)
    return root


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return build(tmp_path / "vol"), build(tmp_path / "rep")


def copy_special(src: str, dst: str) -> None:
    st = os.lstat(src)
    if stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dst)
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_copytree_with_times_owners_and_xattrs_fixed_is_identical(tmp_path: Path) -> None:
    a = build(tmp_path / "vol")
    os.chown(a / "d" / "f", 1234, 5678)
    os.lchown(a / "l", 42, 43)
    os.setxattr(a / "d" / "f", "user.note", b"\x00\xffbin")
    os.setxattr(a / "l", "trusted.t", b"x", follow_symlinks=False)
    os.mkfifo(a / "p")
    os.mknod(a / "c", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    freeze(a)
    b = tmp_path / "rep"
    # copies data, modes, times and xattrs (copystat); not owners or links
    shutil.copytree(a, b, symlinks=True, copy_function=copy_special)
    assert {d.what for d in diffs(a, b)} >= {"owner", "links"}  # not yet fixed
    os.unlink(b / "h")
    os.link(b / "g", b / "h")
    for dirpath, dirnames, filenames in os.walk(a):
        for name in dirnames + filenames:
            src = os.path.join(dirpath, name)
            dst = os.path.join(b, os.path.relpath(src, a))
            st = os.lstat(src)
            os.lchown(dst, st.st_uid, st.st_gid)
            for x in os.listxattr(src, follow_symlinks=False):
                os.setxattr(dst, x, os.getxattr(src, x, follow_symlinks=False), follow_symlinks=False)
    freeze(b)
    assert diffs(a, b) == []


def test_owner_of_file_and_symlink(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.chown(b / "d" / "f", 1000, 0)
    os.lchown(b / "l", 0, 1000)
    found = diffs(a, b)
    assert [(d.path, d.what) for d in found] == [("d/f", "owner"), ("l", "owner")]
    assert "0:0 on the volume, 1000:0 in the replica" in found[0].detail
    assert diffs(a, b, owners=False) == []
    os.chown(a / "d" / "f", 1000, 0)
    os.lchown(a / "l", 0, 1000)
    assert diffs(a, b) == []


def test_mtime_in_nanoseconds(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.utime(b / "g", ns=(T0, T0 + 1))  # one nanosecond later, through either link
    os.utime(b / "l", ns=(T0, T0 - 7), follow_symlinks=False)
    os.mkfifo(a / "p")
    os.mkfifo(b / "p")
    os.utime(a / "p", ns=(T0, T0))
    os.utime(b / "p", ns=(T0, T0 + 10**9))
    os.utime(b / "d", ns=(T0, T0 + 5))
    os.utime(a, ns=(T0, T0))
    os.utime(b, ns=(T0, T0))
    found = diffs(a, b)
    assert [(d.path, d.what) for d in found] == [
        ("d", "mtime"), ("g", "mtime"), ("h", "mtime"), ("l", "mtime"), ("p", "mtime")]
    assert "1600000000.123456789 on the volume, 1600000000.123456790 in the replica" in found[1].detail
    assert diffs(a, b, times=False) == []


def test_root_mode_mtime_owner_and_xattrs(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.chmod(b, 0o700)
    os.chown(b, 7, 8)
    os.setxattr(b, "user.root", b"1")
    os.utime(b, ns=(T0, T0 + 3))
    found = diffs(a, b)
    assert [(d.path, d.what) for d in found] == [
        (ROOT, "mode"), (ROOT, "owner"), (ROOT, "mtime"), (ROOT, "xattr")]
    assert ROOT == "."
    assert "user.root" in found[3].detail
    assert diffs(a, b, modes=False, owners=False, times=False, xattrs=False) == []


def test_root_differences_come_first(tmp_path: Path) -> None:
    a, b = build(tmp_path / "vol"), build(tmp_path / "rep")
    (a / "-early").write_bytes(b"")  # "-" sorts before "."
    os.utime(b, ns=(T0, T0 + 1))
    os.utime(a, ns=(T0, T0))
    assert kinds(a, b) == [(ROOT, "mtime"), ("-early", "missing")]


def test_xattrs_user_and_trusted(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.setxattr(a / "d" / "f", "user.same", b"v")
    os.setxattr(b / "d" / "f", "user.same", b"v")
    assert diffs(a, b) == []
    os.setxattr(a / "d" / "f", "user.only_volume", b"\x00\x01")
    os.setxattr(b / "d" / "f", "trusted.only_replica", b"x")
    os.setxattr(a / "d", "trusted.v", b"old")
    os.setxattr(b / "d", "trusted.v", b"new")
    os.setxattr(a / "l", "trusted.link", b"1", follow_symlinks=False)  # on the symlink itself
    found = diffs(a, b)
    assert [(d.path, d.what) for d in found] == [("d", "xattr"), ("d/f", "xattr"), ("l", "xattr")]
    assert found[0].detail == "values differ: trusted.v"
    assert found[1].detail == ("missing in the replica: user.only_volume; "
                               "not on the volume: trusted.only_replica")
    assert found[2].detail == "missing in the replica: trusted.link"
    assert diffs(a, b, xattrs=False) == []


def test_xattr_through_a_symlink_is_not_followed(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.setxattr(b / "d" / "f", "user.target", b"1")  # l points to d/f: only d/f differs
    assert kinds(a, b) == [("d/f", "xattr")]


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as the kernel stores it in system.posix_acl_*: (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_posix_acl_is_an_xattr(pair: tuple[Path, Path]) -> None:
    a, b = pair
    undefined = 0xFFFFFFFF
    # user::rw- user:1234:r-- group::r-- mask::r-- other::r-- (the mode stays 644)
    os.setxattr(b / "d" / "f", "system.posix_acl_access", acl(
        (0x01, 6, undefined), (0x02, 4, 1234), (0x04, 4, undefined), (0x10, 4, undefined),
        (0x20, 4, undefined)))
    os.setxattr(b / "d", "system.posix_acl_default", acl(
        (0x01, 7, undefined), (0x04, 5, undefined), (0x20, 5, undefined)))
    for root in (a, b):
        freeze(root)
    found = {(d.path, d.what): d.detail for d in diffs(a, b)}
    assert set(found) == {("d", "xattr"), ("d/f", "xattr")}
    assert "system.posix_acl_access" in found[("d/f", "xattr")]
    assert "system.posix_acl_default" in found[("d", "xattr")]


def test_hard_links_split_in_the_replica(tmp_path: Path) -> None:
    a, b = build(tmp_path / "vol"), tmp_path / "rep"
    b.mkdir()
    (b / "d").mkdir()
    (b / "d" / "f").write_bytes(b"hello")
    (b / "g").write_bytes(b"world")
    (b / "h").write_bytes(b"world")  # a copy, not a link
    os.symlink("d/f", b / "l")
    freeze(a)
    freeze(b)
    found = diffs(a, b)
    assert [(d.path, d.what) for d in found] == [("g", "links")]  # once for the group
    assert found[0].detail == "inodes on the volume: g = h; in the replica: g; h"
    assert diffs(a, b, links=False) == []


def test_hard_links_only_in_the_replica(tmp_path: Path) -> None:
    a, b = tmp_path / "vol", tmp_path / "rep"
    for root in (a, b):
        root.mkdir()
        for name in "abcd":
            (root / name).write_bytes(b"same")
    os.link(a / "a", a / "x")
    os.link(b / "a", b / "x")  # same on both sides
    os.unlink(b / "b")
    os.link(b / "a", b / "b")  # b joins a in the replica
    os.unlink(a / "d")
    os.link(a / "c", a / "d")  # c = d only on the volume
    freeze(a)
    freeze(b)
    found = diffs(a, b)
    assert [(d.path, d.what) for d in found] == [("a", "links"), ("c", "links")]
    assert found[0].detail == "inodes on the volume: a = x; b; in the replica: a = b = x"
    assert found[1].detail == "inodes on the volume: c = d; in the replica: c; d"


def test_hard_linked_file_read_once(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import clusterrep.verify as verify

    a, b = pair
    with open(b / "g", "r+b") as f:  # same size, different content, through both links
        f.write(b"W")
    os.utime(b / "g", ns=(T0, T0))
    reads: list[str] = []
    real = verify._first_difference

    def counting(x: tuple[str, str], y: tuple[str, str]) -> int | None:
        reads.append(x[1])
        return real(x, y)

    monkeypatch.setattr(verify, "_first_difference", counting)
    assert kinds(a, b) == [("g", "content"), ("h", "content")]
    assert sorted(reads) == ["d/f", "g"]


def test_fifo_versus_regular_file(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.mkfifo(a / "p")
    (b / "p").write_bytes(b"")
    os.mkfifo(a / "q")
    os.mkfifo(b / "q")
    for root in (a, b):
        for name in ("p", "q"):
            os.utime(root / name, ns=(T0, T0))
        os.utime(root, ns=(T0, T0))
    found = diffs(a, b)
    assert [(d.path, d.what) for d in found] == [("p", "type")]
    assert found[0].detail == "fifo on the volume, file in the replica"


def test_special_file_types_are_named(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.mknod(a / "s", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(b / "s", 0o600 | stat.S_IFBLK, os.makedev(1, 3))
    os.mknod(a / "t", 0o600 | stat.S_IFSOCK)
    os.mkfifo(b / "t", 0o600)
    found = diffs(a, b, times=False)
    assert [d.detail for d in found] == ["character device on the volume, block device in the replica",
                                         "socket on the volume, fifo in the replica"]


def test_device_numbers(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.mknod(a / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(b / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.mknod(a / "same", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mknod(b / "same", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    found = diffs(a, b, times=False)
    assert [(d.path, d.what) for d in found] == [("null", "rdev")]
    assert found[0].detail == "device 1:3 on the volume, 1:5 in the replica"


def test_non_utf8_names_and_xattr_names(pair: tuple[Path, Path]) -> None:
    a, b = pair
    name = os.fsdecode(b"caf\xe9")
    for root in (a, b):
        (root / name).write_bytes(b"x")
    os.setxattr(a / name, os.fsdecode(b"user.\xff"), b"1")
    for root in (a, b):
        os.utime(root / name, ns=(T0, T0))
        os.utime(root, ns=(T0, T0))
    found = diffs(a, b)
    assert [(d.path, d.what) for d in found] == [(name, "xattr")]
    found[0].detail.encode()  # printable: the xattr name is shown escaped
    assert "'user.\\udcff'" in found[0].detail


def test_paths_longer_than_path_max(pair: tuple[Path, Path]) -> None:
    a, b = pair
    for root in (a, b):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(30):  # 30 * 200 bytes > PATH_MAX (4096)
            os.mkdir("n" * 200, dir_fd=fd)
            nxt = os.open("n" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("deep", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"x")
        if root == b:
            os.setxattr(f"/proc/self/fd/{fd}", "user.deep", b"1")
        os.close(fd)
    found = diffs(a, b, times=False)
    assert [(d.path.count("/"), d.what) for d in found] == [(29, "xattr")]
