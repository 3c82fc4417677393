"""Everything a file system holds, through real node mounts, replicated (issue 9).

Each test names one input that failed before: names that are not UTF-8, fallocate in every mode
the kernel passes on, holes and SEEK_HOLE/SEEK_DATA, owners, extended attributes and POSIX
ACLs, modification times set implicitly by writes (also of a file held open), new inodes owned
by the calling user with its umask, a set-group-ID directory's group and a default ACL, hard
links, FIFOs, sockets, device nodes, RENAME_EXCHANGE, O_TMPFILE, and users other than root on
an ``--allow-other`` mount. Every test ends by comparing volume and replica with
`compare_trees`, which checks owners, times, xattrs and link structure too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterrep.localcluster import LocalCluster

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20
RENAME_EXCHANGE = 2
MIB = 1 << 20
USER, OTHER = 4242, 4243  # numeric users without a passwd entry (only their numbers matter)

# POSIX ACL xattr layout (linux/posix_acl_xattr.h): version 2, then (tag, perm, id) entries
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in sorted(entries))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(src: str, dst: str, flags: int) -> None:
    if libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def as_user(uid: int, script: str, *, umask: int = 0o022,
            gid: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run a shell script as ``uid`` (group ``gid`` or the same number, no other groups)."""
    return subprocess.run(["/bin/sh", "-c", script], user=uid, group=uid if gid is None else gid,
                          extra_groups=[], umask=umask, capture_output=True, text=True, timeout=60,
                          cwd="/")


@contextlib.contextmanager
def reachable_dir() -> Iterator[Path]:
    """A work directory other users can enter (pytest's own are mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="clusterrep-fs-"))
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with reachable_dir() as workdir, LocalCluster(workdir, node_args=["--allow-other"]).start() as c:
        yield c


def settled(c: LocalCluster) -> None:
    """The replica has everything, and holds exactly what the volume holds."""
    ok, why, _ = c.wait(90)
    assert ok, why
    diffs = c.verify()
    assert not diffs, "\n".join(map(str, diffs[:20]))


def test_names_that_are_not_utf8_work_for_every_operation(cluster: LocalCluster) -> None:
    def at(mount: Path, raw: bytes) -> str:
        return os.path.join(str(mount), os.fsdecode(b"names-\xff\xfe/" + raw))

    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    long = b"\xe9" * 255  # the longest name the kernel takes, not UTF-8
    os.mkdir(os.path.dirname(at(m1, b"x")))
    with open(at(m1, long), "wb") as f:
        f.write(b"x" * 100)
    os.chmod(at(m2, long), 0o600)
    os.chown(at(m2, long), USER, USER)
    os.utime(at(m1, long), ns=(5, 123_456_789))
    os.setxattr(at(m2, long), os.fsdecode(b"user.\xff"), b"v")
    os.link(at(m2, long), at(m2, b"link-\x80"))
    os.symlink(os.fsdecode(b"\xc3(target"), at(m1, b"sym-\xa0"))
    os.mkfifo(at(m2, b"fifo-\xc0"))
    os.mkdir(at(m1, b"sub-\xf0"))
    with open(at(m1, b"other-\xf1"), "wb") as f:
        f.write(b"o")
    renameat2(at(m2, b"sub-\xf0"), at(m2, b"other-\xf1"), RENAME_EXCHANGE)
    os.rename(at(m1, b"link-\x80"), at(m1, b"moved-\x81"))
    os.unlink(at(m2, b"fifo-\xc0"))
    settled(cluster)
    top = os.fsencode(str(cluster.target)) + b"/names-\xff\xfe"
    assert sorted(os.listdir(top)) == sorted(
        [long, b"moved-\x81", b"sym-\xa0", b"sub-\xf0", b"other-\xf1"])
    assert os.readlink(top + b"/sym-\xa0") == b"\xc3(target"


def test_fallocate_modes_are_replicated_and_holes_stay_holes(cluster: LocalCluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    fd = os.open(f"{m1}/disk.img", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, b"\x11" * (8 * MIB), 0)
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 1 * MIB, 2 * MIB)  # a guest's discard
        fallocate(fd, ZERO_RANGE, 4 * MIB, MIB)  # a guest's write-zeroes
        fallocate(fd, ZERO_RANGE | KEEP_SIZE, 7 * MIB, 4 * MIB)
        fallocate(fd, KEEP_SIZE, 8 * MIB, 4 * MIB)  # preallocate beyond the end
        fallocate(fd, 0, 8 * MIB, MIB)  # grow by allocating
    finally:
        os.close(fd)
    # the migrated VM punches more on the other host
    fd = os.open(f"{m2}/disk.img", os.O_RDWR)
    try:
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 5 * MIB, MIB)
    finally:
        os.close(fd)
    settled(cluster)
    vol, rep = os.stat(cluster.volume / "disk.img"), os.stat(cluster.target / "disk.img")
    assert rep.st_size == vol.st_size == 9 * MIB
    assert rep.st_blocks * 512 <= vol.st_blocks * 512 + MIB, "the replica lost the holes"
    data = (cluster.target / "disk.img").read_bytes()
    assert data[MIB:3 * MIB] == bytes(2 * MIB) and data[:MIB] == b"\x11" * MIB


def test_a_sparse_image_stays_sparse_and_seek_hole_works_on_the_mount(cluster: LocalCluster) -> None:
    m1 = cluster.mount("h1")
    fd = os.open(f"{m1}/sparse.img", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 1 << 30)  # 1 GiB, nearly all hole
        os.pwrite(fd, b"data" * 1024, 512 * MIB)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 512 * MIB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 512 * MIB, os.SEEK_HOLE) >= 512 * MIB + 4096
        with pytest.raises(OSError) as info:
            os.lseek(fd, 600 * MIB, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    settled(cluster)
    rep = os.stat(cluster.target / "sparse.img")
    assert rep.st_size == 1 << 30 and rep.st_blocks * 512 <= 2 * MIB


def test_the_kernel_refuses_collapse_and_insert_range_on_fuse(cluster: LocalCluster) -> None:
    """Measured on this kernel and documented: FUSE passes only allocate, keep size, punch hole
    and zero range; collapse, insert and unshare range fail before reaching the node."""
    fd = os.open(f"{cluster.mount('h1')}/refused.img", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, b"z" * (2 * MIB), 0)
        for mode in (COLLAPSE_RANGE, INSERT_RANGE):
            with pytest.raises(OSError) as info:
                fallocate(fd, mode, 0, MIB)
            assert info.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    settled(cluster)


def test_copy_file_range_keeps_working(cluster: LocalCluster) -> None:
    m1 = cluster.mount("h1")
    Path(f"{m1}/src.bin").write_bytes(os.urandom(3 * MIB))
    src = os.open(f"{m1}/src.bin", os.O_RDONLY)
    dst = os.open(f"{m1}/dst.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        copied = 0
        while copied < 3 * MIB:
            n = os.copy_file_range(src, dst, 3 * MIB - copied)
            assert n > 0
            copied += n
    finally:
        os.close(src)
        os.close(dst)
    settled(cluster)
    assert (cluster.target / "dst.bin").read_bytes() == (cluster.volume / "src.bin").read_bytes()


def test_owners_xattrs_acls_and_explicit_times_are_replicated(cluster: LocalCluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    os.mkdir(f"{m1}/meta")
    Path(f"{m1}/meta/f").write_bytes(b"f")
    os.symlink("f", f"{m1}/meta/l")
    os.chown(f"{m2}/meta/f", USER, OTHER)
    os.chown(f"{m2}/meta/l", OTHER, USER, follow_symlinks=False)
    os.chown(f"{m1}/meta", USER, USER)
    for path in (f"{m1}/meta/f", f"{m1}/meta", str(m1)):  # the volume's root too
        os.setxattr(path, "user.checksum", os.urandom(64))
        os.setxattr(path, "trusted.overlay", b"\x00\x01")
        os.setxattr(path, "security.label", b"s0")
    os.setxattr(f"{m2}/meta/l", "trusted.on-a-symlink", b"yes", follow_symlinks=False)
    os.setxattr(f"{m2}/meta/f", "user.checksum", b"replaced", os.XATTR_REPLACE)
    with pytest.raises(FileExistsError):
        os.setxattr(f"{m2}/meta/f", "user.checksum", b"x", os.XATTR_CREATE)
    os.removexattr(f"{m2}/meta/f", "trusted.overlay")
    with pytest.raises(OSError) as info:
        os.getxattr(f"{m1}/meta/f", "trusted.overlay")
    assert info.value.errno == errno.ENODATA
    os.setxattr(f"{m1}/meta/f", "system.posix_acl_access", acl(
        (ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, OTHER), (ACL_GROUP_OBJ, 4, NO_ID),
        (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID)))
    os.setxattr(f"{m1}/meta", "system.posix_acl_default", acl(
        (ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 5, OTHER), (ACL_GROUP_OBJ, 5, NO_ID),
        (ACL_MASK, 5, NO_ID), (ACL_OTHER, 0, NO_ID)))
    os.utime(f"{m2}/meta/f", ns=(1_000_000_001, 2_000_000_002))
    os.utime(f"{m2}/meta/l", ns=(3, 4_000_000_004), follow_symlinks=False)
    os.chmod(m2, 0o751)
    os.utime(m2, ns=(7, 8_000_000_009))
    settled(cluster)
    f = os.stat(cluster.target / "meta/f")
    assert (f.st_uid, f.st_gid, f.st_mtime_ns) == (USER, OTHER, 2_000_000_002)
    assert os.getxattr(cluster.target / "meta/f", "user.checksum") == b"replaced"
    assert os.getxattr(cluster.target, "security.label") == b"s0"
    assert os.stat(cluster.target).st_mtime_ns == os.stat(cluster.volume).st_mtime_ns


def test_times_left_by_writes_are_replicated_also_of_a_file_held_open(cluster: LocalCluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    os.makedirs(f"{m1}/times/sub")
    Path(f"{m2}/times/sub/closed").write_bytes(b"written and closed")
    fd = os.open(f"{m1}/times/vm.img", os.O_CREAT | os.O_RDWR, 0o600)  # a running VM's image
    try:
        for i in range(20):
            os.pwrite(fd, os.urandom(4096), i * 8192)
        os.ftruncate(fd, 1 << 20)
        settled(cluster)  # while it is still open, idle
        assert os.stat(cluster.target / "times/vm.img").st_mtime_ns == os.fstat(fd).st_mtime_ns
        os.pwrite(fd, b"later", 0)  # written again: the new time follows
        settled(cluster)
    finally:
        os.close(fd)
    for p in ("times", "times/sub", "times/sub/closed", "times/vm.img"):
        assert os.lstat(cluster.target / p).st_mtime_ns == os.lstat(cluster.volume / p).st_mtime_ns, p


def test_a_new_inode_belongs_to_its_caller_with_umask_setgid_group_and_default_acl(
        cluster: LocalCluster) -> None:
    m1 = cluster.mount("h1")
    os.mkdir(f"{m1}/home")
    os.chown(f"{m1}/home", USER, USER)
    r = as_user(USER, f"mkdir {m1}/home/d && echo hi > {m1}/home/d/f && mkfifo {m1}/home/p "
                      f"&& ln -s d {m1}/home/s", umask=0o027)
    assert r.returncode == 0, r.stderr
    st = os.stat(cluster.volume / "home/d/f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o640)
    assert stat.S_IMODE(os.stat(cluster.volume / "home/d").st_mode) == 0o750
    assert os.lstat(cluster.volume / "home/s").st_uid == USER
    # a set-group-ID directory passes its group on (and, to a directory, the bit)
    os.mkdir(f"{m1}/shared")
    os.chown(f"{m1}/shared", 0, 777)
    os.chmod(f"{m1}/shared", 0o2777)
    r = as_user(USER, f"mkdir {m1}/shared/sub && touch {m1}/shared/file")
    assert r.returncode == 0, r.stderr
    sub, file = os.stat(cluster.volume / "shared/sub"), os.stat(cluster.volume / "shared/file")
    assert (sub.st_gid, file.st_gid, sub.st_uid) == (777, 777, USER)
    assert sub.st_mode & stat.S_ISGID
    # a default ACL replaces the umask
    os.mkdir(f"{m1}/acl")
    os.chmod(f"{m1}/acl", 0o777)
    os.setxattr(f"{m1}/acl", "system.posix_acl_default", acl(
        (ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 6, OTHER), (ACL_GROUP_OBJ, 7, NO_ID),
        (ACL_MASK, 7, NO_ID), (ACL_OTHER, 5, NO_ID)))
    r = as_user(USER, f"touch {m1}/acl/f && mkdir {m1}/acl/d", umask=0o077)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(cluster.volume / "acl/f").st_mode) == 0o664
    assert os.getxattr(cluster.volume / "acl/f", "system.posix_acl_access")
    assert os.getxattr(cluster.volume / "acl/d", "system.posix_acl_default")
    settled(cluster)


def test_hard_links_fifos_sockets_devices_and_exchange(cluster: LocalCluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    os.mkdir(f"{m1}/links")
    Path(f"{m1}/links/a").write_bytes(b"shared inode")
    os.link(f"{m1}/links/a", f"{m1}/links/b")
    os.link(f"{m2}/links/b", f"{m2}/links/c")
    with open(f"{m2}/links/c", "r+b") as f:  # written through one name, seen through all
        f.write(b"SHARED")
    os.unlink(f"{m1}/links/a")  # the inode keeps its other names
    with open(f"{m1}/links/b", "ab") as f:
        f.write(b" after unlink")
    assert Path(f"{m2}/links/c").read_bytes() == b"SHARED inode after unlink"
    os.mkfifo(f"{m1}/links/fifo", 0o620)
    os.mknod(f"{m2}/links/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(f"{m1}/links/sock")
    finally:
        sock.close()
    Path(f"{m1}/links/x").write_bytes(b"x")
    os.mkdir(f"{m1}/links/y")
    Path(f"{m1}/links/y/inside").write_bytes(b"in y")
    renameat2(f"{m2}/links/x", f"{m2}/links/y", RENAME_EXCHANGE)  # a file and a directory
    assert Path(f"{m1}/links/x/inside").read_bytes() == b"in y"
    assert Path(f"{m1}/links/y").read_bytes() == b"x"
    with pytest.raises(OSError) as info:
        renameat2(f"{m1}/links/x", f"{m1}/links/missing", RENAME_EXCHANGE)
    assert info.value.errno == errno.ENOENT
    settled(cluster)
    rb, rc = os.stat(cluster.target / "links/b"), os.stat(cluster.target / "links/c")
    assert rb.st_ino == rc.st_ino and rb.st_nlink == 2
    assert stat.S_ISFIFO(os.stat(cluster.target / "links/fifo").st_mode)
    assert stat.S_ISSOCK(os.stat(cluster.target / "links/sock").st_mode)
    assert os.stat(cluster.target / "links/null").st_rdev == os.makedev(1, 3)


def test_what_is_refused_is_refused_the_same_way_every_time(cluster: LocalCluster) -> None:
    """docs/operations.md lists these with their reasons."""
    m1 = cluster.mount("h1")
    Path(f"{m1}/refused-a").write_text("a")
    Path(f"{m1}/refused-b").write_text("b")
    for _ in range(3):
        with pytest.raises(OSError) as info:
            os.open(str(m1), os.O_TMPFILE | os.O_RDWR, 0o600)
        assert info.value.errno == errno.EOPNOTSUPP
        for flags in (4, 1 | RENAME_EXCHANGE):  # RENAME_WHITEOUT; NOREPLACE with EXCHANGE
            with pytest.raises(OSError) as info:
                renameat2(f"{m1}/refused-a", f"{m1}/refused-b", flags)
            assert info.value.errno == errno.EINVAL
    assert Path(f"{m1}/refused-a").read_text() == "a"


def test_other_users_use_the_mount_and_modes_and_acls_are_enforced(cluster: LocalCluster) -> None:
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    os.mkdir(f"{m1}/users")
    os.chmod(f"{m1}/users", 0o1777)
    r = as_user(USER, f"echo private > {m1}/users/mine && chmod 600 {m1}/users/mine && "
                      f"cat {m2}/users/mine")
    assert r.returncode == 0 and r.stdout == "private\n", r.stderr
    r = as_user(OTHER, f"cat {m2}/users/mine")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_user(OTHER, f"rm -f {m1}/users/mine")  # the sticky bit protects it
    assert r.returncode != 0
    # an ACL entry lets OTHER read it: enforced by the kernel on both mounts
    os.setxattr(f"{m1}/users/mine", "system.posix_acl_access", acl(
        (ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, OTHER), (ACL_GROUP_OBJ, 0, NO_ID),
        (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID)))
    r = as_user(OTHER, f"cat {m2}/users/mine")
    assert r.returncode == 0 and r.stdout == "private\n", r.stderr
    r = as_user(OTHER, f"echo more >> {m2}/users/mine")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    settled(cluster)


def test_without_allow_other_other_users_are_kept_out() -> None:
    with reachable_dir() as workdir, LocalCluster(workdir, nodes=("h1",)).start() as c:
        os.chmod(c.mount("h1"), 0o777)
        r = as_user(USER, f"ls {c.mount('h1')}")
        assert r.returncode != 0 and "Permission denied" in r.stderr


def test_rsync_as_referee_finds_nothing_after_a_workload_using_everything() -> None:
    """The independent referee: ``rsync -aHAXn --numeric-ids --delete --itemize-changes``
    from the volume to the replica prints nothing once `wait` says the replica caught up."""
    rsync = shutil.which("rsync")
    assert rsync, "rsync is needed as the referee: apt-get install rsync (scripts/install-deps)"
    setfacl = shutil.which("setfacl")
    assert setfacl, "setfacl is needed: apt-get install acl (scripts/install-deps)"
    with reachable_dir() as workdir, LocalCluster(workdir, node_args=["--allow-other"]).start() as c:
        m1, m2 = str(c.mount("h1")), str(c.mount("h2"))
        odd = os.fsdecode(b"caf\xe9-\xff")
        os.makedirs(f"{m1}/vms/{odd}")
        os.chmod(m1, 0o755)
        os.setxattr(m1, "user.volume", b"root attribute")
        # a VM image written on h1, discarded into, migrated to h2 and written there, held open
        fd1 = os.open(f"{m1}/vms/vm1.img", os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd1, 64 * MIB)
        for i in range(64):
            os.pwrite(fd1, os.urandom(4096), i * MIB)
        fallocate(fd1, PUNCH_HOLE | KEEP_SIZE, 8 * MIB, 8 * MIB)
        os.close(fd1)
        held = os.open(f"{m2}/vms/vm1.img", os.O_RDWR)
        os.pwrite(held, b"migrated", 3)
        fallocate(held, ZERO_RANGE, 20 * MIB, MIB)
        # owners, modes, set-group-ID, xattrs, ACLs (setfacl through the mount)
        os.makedirs(f"{m2}/srv/www")
        os.chown(f"{m2}/srv", 0, 33)
        os.chmod(f"{m2}/srv", 0o2775)
        r = as_user(USER, f"mkdir {m1}/srv/sub && echo page > {m1}/srv/index.html",
                    umask=0o002, gid=33)
        assert r.returncode == 0, r.stderr
        subprocess.run([setfacl, "-m", f"u:{OTHER}:rx", "-d", "-m", f"u:{OTHER}:rwx",
                        f"{m1}/srv/www"], check=True)
        Path(f"{m2}/srv/www/inherits").write_text("acl")
        os.setxattr(f"{m2}/srv/index.html", "user.mime_type", b"text/html")
        os.setxattr(f"{m1}/srv/index.html", "trusted.md5", b"0" * 32)
        os.chmod(f"{m1}/srv/index.html", 0o4750)
        # hard links, a symlink owned by someone, FIFO, socket, device node
        Path(f"{m1}/vms/{odd}/config").write_text("cpu=2\n")
        os.link(f"{m1}/vms/{odd}/config", f"{m1}/vms/config.hard")
        os.link(f"{m2}/vms/config.hard", f"{m2}/srv/config.hard2")
        os.symlink(f"../vms/{odd}/config", f"{m2}/srv/link")
        os.chown(f"{m2}/srv/link", USER, USER, follow_symlinks=False)
        os.mkfifo(f"{m1}/srv/fifo")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(f"{m2}/srv/sock")
        sock.close()
        os.mknod(f"{m1}/srv/zero", 0o640 | stat.S_IFCHR, os.makedev(1, 5))
        # renames, an exchange, unlinks, truncates, explicit and implicit times, appends
        Path(f"{m1}/a.tmp").write_text("new version")
        Path(f"{m2}/a").write_text("old version")
        renameat2(f"{m1}/a.tmp", f"{m1}/a", RENAME_EXCHANGE)
        os.unlink(f"{m2}/a.tmp")
        os.rename(f"{m1}/vms/config.hard", f"{m1}/config.moved")
        with open(f"{m1}/log", "a") as f:
            f.write("h1\n")
        with open(f"{m2}/log", "a") as f:
            f.write("h2\n")
        os.truncate(f"{m2}/log", 5)
        os.utime(f"{m1}/srv/www", ns=(0, 1_234_567_891))
        try:
            ok, why, _ = c.wait(120)
            assert ok, why
            out = subprocess.run([rsync, "-aHAXn", "--numeric-ids", "--delete", "--itemize-changes",
                                  f"{c.volume}/", f"{c.target}/"],
                                 capture_output=True, text=True, check=True)
            assert out.stdout == "", f"rsync sees differences:\n{out.stdout}"
            assert not c.verify()
        finally:
            os.close(held)


def test_an_open_hard_linked_file_whose_name_another_host_removed_keeps_working(
        cluster: LocalCluster) -> None:
    """The node knows the inode by the name it was opened through; once another host unlinks
    that name, the other link is the file's name (before: EIO after 1000 stale retries)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    os.mkdir(f"{m1}/relink")
    Path(f"{m1}/relink/a").write_bytes(b"linked")
    os.link(f"{m1}/relink/a", f"{m1}/relink/b")
    fd = os.open(f"{m1}/relink/a", os.O_RDWR)
    try:
        os.unlink(f"{m2}/relink/a")
        os.fchmod(fd, 0o640)
        os.setxattr(fd, "user.after", b"unlink")
        os.ftruncate(fd, 3)
        os.pwrite(fd, b"LIN", 0)
    finally:
        os.close(fd)
    assert Path(f"{m2}/relink/b").read_bytes() == b"LIN"
    settled(cluster)
    assert os.getxattr(cluster.target / "relink/b", "user.after") == b"unlink"


def test_the_replica_root_takes_the_volume_roots_state_before_any_operation(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, nodes=("h1",))
    os.chmod(c.volume, 0o750)
    os.chown(c.volume, USER, OTHER)
    os.setxattr(c.volume, "user.site", b"csv-1")
    with c.start():
        settled(c)
        root = os.stat(c.target)
        assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (0o750, USER, OTHER)


@pytest.mark.parametrize("seconds", [-0.5, -2_147_483_648, 9_224_000_000, 15_032_385_535, 99_999_999_999],
                         ids=["1969", "1901", "after-2262", "2446", "touch-far"])
def test_times_before_1970_and_after_2262_work_and_are_replicated(
        cluster: LocalCluster, seconds: float) -> None:
    """tar and rsync restore archives with such times (before: EIO, or EINVAL after 2262)."""
    path = cluster.mount("h1") / f"time-{seconds}"
    path.write_bytes(b"t")
    ns = int(seconds * 10**9)
    os.utime(path, ns=(ns, ns))
    local = cluster.workdir / "local-reference"  # what the volume's own file system makes of it
    local.write_bytes(b"t")
    os.utime(local, ns=(ns, ns))
    assert os.stat(path).st_mtime_ns == os.stat(local).st_mtime_ns
    settled(cluster)
    assert os.stat(cluster.target / path.name).st_mtime_ns == os.stat(local).st_mtime_ns


def test_a_hard_linked_fifo_or_symlink_whose_known_name_went_keeps_working(
        cluster: LocalCluster) -> None:
    """Before: the coordinator's search accepted regular files only and recursed ~1000 deep."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    os.mkdir(f"{m1}/speciallinks")
    os.mkfifo(f"{m1}/speciallinks/a")
    os.symlink("target", f"{m1}/speciallinks/s")
    os.link(f"{m1}/speciallinks/a", f"{m1}/speciallinks/b")
    os.link(f"{m1}/speciallinks/s", f"{m1}/speciallinks/t", follow_symlinks=False)
    os.lstat(f"{m1}/speciallinks/a")  # h1's kernel knows each inode by its first name
    os.lstat(f"{m1}/speciallinks/s")
    os.unlink(f"{m2}/speciallinks/a")
    os.unlink(f"{m2}/speciallinks/s")
    os.chown(f"{m1}/speciallinks/b", USER, USER)
    os.utime(f"{m1}/speciallinks/b", ns=(1, 2))
    os.chown(f"{m1}/speciallinks/t", OTHER, OTHER, follow_symlinks=False)
    os.link(f"{m1}/speciallinks/b", f"{m1}/speciallinks/c")
    settled(cluster)


def test_a_fifo_made_by_a_user_takes_the_directorys_default_acl(cluster: LocalCluster) -> None:
    m1 = cluster.mount("h1")
    os.mkdir(f"{m1}/aclfifo")
    os.chmod(f"{m1}/aclfifo", 0o777)
    os.setxattr(f"{m1}/aclfifo", "system.posix_acl_default", acl(
        (ACL_USER_OBJ, 7, NO_ID), (ACL_GROUP_OBJ, 5, NO_ID), (ACL_OTHER, 0, NO_ID)))
    local = cluster.workdir / "aclfifo-local"  # the same on the volume's own file system
    local.mkdir(mode=0o777)
    os.chmod(local, 0o777)
    os.setxattr(local, "system.posix_acl_default",
                os.getxattr(f"{m1}/aclfifo", "system.posix_acl_default"))
    for where in (f"{m1}/aclfifo", str(local)):
        r = as_user(USER, f"mkfifo {where}/p", umask=0)
        assert r.returncode == 0, r.stderr
    assert os.stat(f"{m1}/aclfifo/p").st_mode == os.stat(local / "p").st_mode == stat.S_IFIFO | 0o640
    settled(cluster)


def test_an_append_by_another_user_clears_set_user_id_bits(cluster: LocalCluster) -> None:
    m1 = cluster.mount("h1")
    os.mkdir(f"{m1}/suid")
    os.chmod(f"{m1}/suid", 0o777)
    for name, script in (("appended", "echo y >> {p}"),
                         ("written", "printf y | dd of={p} conv=notrunc 2>/dev/null")):
        path = f"{m1}/suid/{name}"
        Path(path).write_text("x\n")
        os.chown(path, USER, USER)
        os.chmod(path, 0o6777)
        r = as_user(OTHER, script.format(p=path))
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o777, name  # as ext4 does
    settled(cluster)
