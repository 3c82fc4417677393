"""The structure snapshot (`snapshot.walk`) and its comparison (`treediff.compare`, `blocks_to_send`).

Trees are built on disk (files, directories, symlinks, fifos, sockets, devices, hard links, user.*
and trusted.* xattrs, owners, nanosecond mtimes, names that are not UTF-8, a sparse file), a second
tree is perturbed, and the planned actions are applied by a small applier written here with plain
os calls (content: the blocks `blocks_to_send` names, copied from the first tree); then
`verify.compare_trees` must find nothing. These tests run as root.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterrep.blockread import Hasher
from clusterrep.blocks import BLOCK_SIZE, HOLE, Manifest, block_count, diff_blocks
from clusterrep.confined import fallocate
from clusterrep.events import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from clusterrep.snapshot import FORMAT, Entry, Kind, order_key, walk
from clusterrep.treediff import (
    Action,
    Content,
    Create,
    InvalidWalk,
    Link,
    Remove,
    SetAttr,
    blocks_to_send,
    compare,
)
from clusterrep.verify import compare_trees

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown, mknod and trusted.* need root")

OWNERS = (0, 1000, 1234, 65534)
RECENT_NS = 1_600_000_000 * 10**9  # the trees' own mtimes are older; what a test touches is newer
BAD_NAME = b"caf\xe9-\xff"  # not UTF-8


# ---------------------------------------------------------------------------------------------
# The test applier: plain os calls on bytes paths.


def at(root: bytes, path: str) -> bytes:
    return os.path.join(root, os.fsencode(path)) if path else root


def copy_content(src: bytes, dst: bytes, action: Content) -> list[int]:
    """Make ``dst``'s file equal to ``src``'s by the blocks `blocks_to_send` names; returns them."""
    size = action.entry.size
    sfd = os.open(at(src, action.entry.path), os.O_RDONLY)
    dfd = os.open(at(dst, action.entry.path), os.O_RDWR)
    try:
        with Hasher(threads=2, in_flight=4) as hasher:
            ours = [r.manifest for r in hasher.manifests([(0, sfd, size)])]
            theirs = None if action.fresh else [
                r.manifest for r in hasher.manifests([(1, dfd, os.fstat(dfd).st_size)])]
        assert all(m is not None for m in ours) and (theirs is None or all(m is not None for m in theirs))
        holes = {i for m in ours if m is not None for i, block in m.items() if block == HOLE}
        indexes = list(blocks_to_send(ours, theirs))  # type: ignore[arg-type]
        os.ftruncate(dfd, size)
        for index in indexes:
            offset = index * BLOCK_SIZE
            length = min(BLOCK_SIZE, size - offset)
            if index in holes:
                fallocate(dfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                os.pwrite(dfd, os.pread(sfd, length, offset), offset)
        return indexes
    finally:
        os.close(sfd)
        os.close(dfd)


def apply(actions: Iterable[Action], src: bytes, dst: bytes) -> list[Action]:
    """Apply ``actions`` (planned from ``src``'s walk against ``dst``'s) to ``dst``; strict: a
    Create on a taken name, an rmdir of a non-empty directory or a Link to nothing fails."""
    done = []
    for action in actions:
        done.append(action)
        if isinstance(action, Remove):
            path = at(dst, action.path)
            (os.rmdir if action.kind is Kind.DIR else os.unlink)(path)
        elif isinstance(action, Create):
            e = action.entry
            path = at(dst, e.path)
            if e.kind is Kind.DIR:
                os.mkdir(path, 0o700)
            elif e.kind is Kind.SYMLINK:
                assert e.target is not None
                os.symlink(os.fsencode(e.target), path)
            elif e.kind is Kind.FILE:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, e.size)
                os.close(fd)
            else:
                os.mknod(path, 0o600 | FORMAT[e.kind], e.rdev)
        elif isinstance(action, Content):
            copy_content(src, dst, action)
        elif isinstance(action, Link):
            os.link(at(dst, action.to), at(dst, action.path), follow_symlinks=False)
        else:
            assert isinstance(action, SetAttr)
            a, path = action.attr, at(dst, action.attr.path)
            os.chown(path, a.uid, a.gid, follow_symlinks=False)
            if action.kind is not Kind.SYMLINK:
                os.chmod(path, a.mode)
            if a.xattrs is not None:
                want = dict(a.xattrs)
                for name in os.listxattr(path, follow_symlinks=False):
                    if name not in want:
                        os.removexattr(path, name, follow_symlinks=False)
                for name, value in a.xattrs:
                    os.setxattr(path, name, value, follow_symlinks=False)
            assert a.mtime_ns is not None
            os.utime(path, ns=(a.mtime_ns, a.mtime_ns), follow_symlinks=False)
    return done


def sync(src: bytes, dst: bytes, *, content: bool = False) -> list[Action]:
    return apply(list(compare(walk(src), walk(dst), content=content)), src, dst)


def differences(a: bytes, b: bytes) -> list[str]:
    return [str(d) for d in compare_trees(os.fsdecode(a), os.fsdecode(b))]


# ---------------------------------------------------------------------------------------------
# Random trees.


def all_paths(root: bytes) -> list[bytes]:
    """Every path below ``root`` (not ``root``), sorted, never through a symlink."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return sorted(out)


def dirs_of(root: bytes) -> list[bytes]:
    return [root] + [p for p in all_paths(root) if stat.S_ISDIR(os.lstat(p).st_mode)]


def set_attrs(rng: random.Random, path: bytes) -> None:
    st_ = os.lstat(path)
    os.chown(path, rng.choice(OWNERS), rng.choice(OWNERS), follow_symlinks=False)
    if not stat.S_ISLNK(st_.st_mode):
        os.chmod(path, rng.choice((0o644, 0o600, 0o755, 0o4755, 0o2775, 0o1777, 0o000)))
    if rng.random() < 0.3:
        os.setxattr(path, b"trusted.t" + bytes([rng.randrange(97, 100)]), rng.randbytes(rng.randrange(0, 40)),
                    follow_symlinks=False)
    if rng.random() < 0.3 and (stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode)):
        os.setxattr(path, b"user.u", rng.randbytes(rng.randrange(1, 300)), follow_symlinks=False)


def freeze_times(rng: random.Random, root: bytes, only: set[bytes] | None = None) -> None:
    """Random nanosecond mtimes, deepest first, so a directory's is set after its contents'."""
    for path in [*sorted(all_paths(root), key=lambda p: -p.count(b"/")), root]:
        if only is None or path in only:
            t = rng.randrange(0, RECENT_NS)
            os.utime(path, ns=(t, t), follow_symlinks=False)


def write_file(rng: random.Random, path: bytes) -> None:
    size = rng.choice((0, 1, 100, BLOCK_SIZE - 1, BLOCK_SIZE, 2 * BLOCK_SIZE + 17, 3 * BLOCK_SIZE))
    with open(path, "wb") as f:
        f.write(rng.randbytes(size))


def new_entry(rng: random.Random, parent: bytes, name: bytes) -> bytes:
    """Create one random entry ``name`` in ``parent``; its path."""
    path = os.path.join(parent, name)
    kind = rng.choice(("file", "file", "file", "dir", "dir", "symlink", "fifo", "socket", "char"))
    if kind == "file":
        write_file(rng, path)
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "symlink":
        os.symlink(rng.choice((b"f0", b"../x", b"/etc/passwd", BAD_NAME, b"d0/f1")), path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        os.mknod(path, 0o600 | stat.S_IFSOCK)
    else:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(rng.randrange(1, 9), rng.randrange(0, 9)))
    set_attrs(rng, path)
    return path


def build_tree(root: bytes, seed: int, n: int = 18) -> None:
    """A random tree: names that sort differently by component than as whole paths ("a" "a-b"
    "a.b" "a0"), a name that is not UTF-8, an empty directory, a sparse file, hard links."""
    rng = random.Random(seed)
    os.mkdir(root)
    for name in (b"a", b"a-b", b"empty"):
        os.mkdir(os.path.join(root, name))
    with open(os.path.join(root, b"a.b"), "wb") as f:  # sparse: data at block 5 of 40
        f.truncate(40 * BLOCK_SIZE)
        f.seek(5 * BLOCK_SIZE + 3)
        f.write(rng.randbytes(1000))
    for i in range(n):
        parent = rng.choice(dirs_of(root))
        name = rng.choice((b"f%d" % i, b"d%d" % i, BAD_NAME + b"%d" % i, b"a0%d" % i))
        if not os.path.lexists(os.path.join(parent, name)):
            new_entry(rng, parent, name)
    files = [p for p in all_paths(root) if stat.S_ISREG(os.lstat(p).st_mode)]
    for k in range(3):  # hard links, some far apart in walk order, one of them to a symlink
        src = rng.choice(files)
        dst = os.path.join(rng.choice(dirs_of(root)), b"h%d" % k)
        if not os.path.lexists(dst):
            os.link(src, dst)
    links = [p for p in all_paths(root) if stat.S_ISLNK(os.lstat(p).st_mode)]
    if links:
        os.link(links[0], os.path.join(root, b"zlink"), follow_symlinks=False)
    for path in [root, *all_paths(root)]:
        if rng.random() < 0.5:
            set_attrs(rng, path)
    freeze_times(rng, root)


PERTURBATIONS = ("delete", "add", "mode", "owner", "mtime", "xattr", "blocks", "resize", "file_to_dir",
                 "dir_to_file", "split_link", "join_link", "retarget")


def perturb(root: bytes, op: str, seed: int) -> None:
    """Change ``root`` by ``op`` at a randomly chosen place (nothing if no place fits), then give
    what it touched a random old mtime: two files written in one clock tick (~4 ms) on both sides
    would otherwise keep equal sizes and mtimes with different contents, which only ``content=True``
    finds (rsync's quick check has the same blind spot; a test of its own covers it)."""
    _perturb(root, op, random.Random(seed))
    rng = random.Random(f"{seed}:{os.path.basename(root)!r}")  # not the same times on both sides
    freeze_times(rng, root, {p for p in [root, *all_paths(root)] if os.lstat(p).st_mtime_ns >= RECENT_NS})


def _perturb(root: bytes, op: str, rng: random.Random) -> None:
    paths = all_paths(root)
    kinds = {p: stat.S_IFMT(os.lstat(p).st_mode) for p in paths}
    files = [p for p in paths if kinds[p] == stat.S_IFREG]
    dirs = [p for p in paths if kinds[p] == stat.S_IFDIR]
    pick = rng.choice
    if op == "delete" and paths:
        p = pick(paths)
        (shutil.rmtree if kinds[p] == stat.S_IFDIR else os.unlink)(p)
    elif op == "add":
        parent = pick([root, *dirs])
        name = b"new%d" % rng.randrange(5)
        if not os.path.lexists(os.path.join(parent, name)):
            new_entry(rng, parent, name)
    elif op in ("mode", "owner", "xattr", "mtime"):
        p = pick([root, *paths])
        if op == "mode" and kinds.get(p) != stat.S_IFLNK:
            os.chmod(p, rng.choice((0o640, 0o711, 0o6755)))
        elif op == "owner":
            os.chown(p, rng.choice(OWNERS), rng.choice(OWNERS), follow_symlinks=False)
        elif op == "xattr":
            names = os.listxattr(p, follow_symlinks=False)
            if names and rng.random() < 0.5:
                os.removexattr(p, pick(names), follow_symlinks=False)
            else:
                os.setxattr(p, "trusted.p", rng.randbytes(8), follow_symlinks=False)
        elif op == "mtime":
            os.utime(p, ns=(1, rng.randrange(RECENT_NS)), follow_symlinks=False)
    elif op in ("blocks", "resize") and files:
        p = pick(files)
        with open(p, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if op == "resize":
                f.truncate(rng.choice((0, size // 2, size + 5, size + 3 * BLOCK_SIZE)))
            for _ in range(rng.randrange(1, 3)):
                f.seek(rng.randrange(size + 1))
                f.write(rng.randbytes(rng.choice((1, 100, 4096))))
    elif op == "file_to_dir" and files:
        p = pick(files)
        os.unlink(p)
        os.mkdir(p)
        new_entry(rng, p, b"inner")
    elif op == "dir_to_file" and dirs:
        p = pick(dirs)
        shutil.rmtree(p)
        write_file(rng, p)
    elif op == "split_link":
        linked = [p for p in files if os.lstat(p).st_nlink > 1]
        if linked:
            p = pick(linked)
            with open(p, "rb") as f:
                data = f.read()
            os.unlink(p)
            with open(p, "wb") as f:
                f.write(data)
    elif op == "join_link" and len(files) > 1:
        a, b = rng.sample(files, 2)
        if os.lstat(a).st_ino != os.lstat(b).st_ino:
            os.unlink(b)
            os.link(a, b)
    elif op == "retarget":
        links = [p for p in paths if kinds[p] == stat.S_IFLNK]
        if links:
            p = pick(links)
            os.unlink(p)
            os.symlink(b"elsewhere", p)


@pytest.fixture
def trees(tmp_path: Path) -> tuple[bytes, bytes]:
    return os.fsencode(tmp_path / "vol"), os.fsencode(tmp_path / "rep")


# ---------------------------------------------------------------------------------------------
# walk


def test_walk_order_is_by_raw_name_bytes_directory_first(trees: tuple[bytes, bytes]) -> None:
    a, _ = trees
    build_tree(a, 1)
    paths = [e.path for e in walk(a)]
    assert paths[0] == "" and len(paths) == len(set(paths)) == len(all_paths(a)) + 1
    assert paths == sorted(paths, key=order_key)
    assert paths.index("a") < paths.index("a-b") < paths.index("a.b")
    assert all(paths.index(p.rpartition("/")[0]) < paths.index(p) for p in paths if "/" in p)
    assert os.fsdecode(BAD_NAME + b"0") in paths or any("\udcff" in p for p in paths)


def test_walk_reads_every_attribute_and_never_follows_a_symlink(trees: tuple[bytes, bytes]) -> None:
    a, _ = trees
    os.mkdir(a)
    os.mkdir(os.path.join(a, b"outside"))
    open(os.path.join(a, b"outside", b"secret"), "wb").close()
    os.symlink(b"outside", os.path.join(a, b"l\xff"))
    os.setxattr(os.path.join(a, b"l\xff"), "trusted.s", b"on the link", follow_symlinks=False)
    os.lchown(os.path.join(a, b"l\xff"), 1234, 65534)
    os.mknod(os.path.join(a, b"dev"), 0o640 | stat.S_IFBLK, os.makedev(7, 3))
    with open(os.path.join(a, b"f"), "wb") as f:
        f.write(b"x" * 10)
    os.setxattr(os.path.join(a, b"f"), "user.z", b"2")
    os.setxattr(os.path.join(a, b"f"), "user.a", b"1")
    os.link(os.path.join(a, b"f"), os.path.join(a, b"g"))
    os.utime(os.path.join(a, b"f"), ns=(5, 1_234_567_891))
    by = {e.path: e for e in walk(a)}
    link = by[os.fsdecode(b"l\xff")]
    assert (link.kind, link.target, link.uid, link.gid) == (Kind.SYMLINK, "outside", 1234, 65534)
    assert link.xattrs == (("trusted.s", b"on the link"),)
    assert os.fsdecode(b"l\xff/secret") not in by and "outside/secret" in by
    assert (by["dev"].kind, by["dev"].rdev, by["dev"].mode) == (Kind.BLOCK, os.makedev(7, 3), 0o640)
    f = by["f"]
    assert (f.size, f.mtime_ns, f.nlink) == (10, 1_234_567_891, 2)
    assert f.xattrs == (("user.a", b"1"), ("user.z", b"2"))
    assert f.inode == by["g"].inode and by[""].kind is Kind.DIR and by["outside"].size == 0


def test_walk_handles_paths_longer_than_path_max(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    while depth * 201 < 5000:
        os.mkdir("d" * 200, dir_fd=fd)
        nxt = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd, depth = nxt, depth + 1
    os.close(os.open("deep", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    os.close(fd)
    entries = list(walk(tmp_path))
    assert entries[-1].path.endswith("/deep") and len(entries[-1].path) > 4096
    assert len(entries) == depth + 2


def test_walk_skips_entries_that_vanish(trees: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = trees
    os.makedirs(os.path.join(a, b"d", b"sub"))
    for name in (b"gone", b"kept", b"sub/x"):
        open(os.path.join(a, b"d", name), "wb").close()
    real_open = os.open

    def flaky_open(path: object, *args: object, **kw: object) -> int:
        if path == "gone":
            raise FileNotFoundError(errno.ENOENT, "vanished", path)
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", flaky_open)
    vanished: list[str] = []
    assert [e.path for e in walk(a, vanished=vanished.append)] == ["", "d", "d/kept", "d/sub", "d/sub/x"]
    assert vanished == ["d/gone"]


def test_walk_survives_real_removals_while_walking(trees: tuple[bytes, bytes]) -> None:
    a, _ = trees
    os.makedirs(os.path.join(a, b"d", b"sub"))
    for name in (b"a", b"b", b"sub/x"):
        open(os.path.join(a, b"d", name), "wb").close()
    seen = []
    for entry in walk(a):
        seen.append(entry.path)
        if entry.path == "d/a":  # the listing of d is taken: remove what follows, type-change one
            os.unlink(os.path.join(a, b"d", b"b"))
            shutil.rmtree(os.path.join(a, b"d", b"sub"))
            open(os.path.join(a, b"d", b"sub"), "wb").close()
    assert seen == ["", "d", "d/a", "d/sub"]


def test_walk_closes_its_descriptors_when_abandoned(trees: tuple[bytes, bytes]) -> None:
    a, _ = trees
    build_tree(a, 2)
    before = len(os.listdir("/proc/self/fd"))
    it = walk(a)
    for _ in range(6):
        next(it)
    it.close()
    assert len(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------------------------------------
# compare, applied


def test_sync_into_an_empty_replica_then_identical_trees_give_no_action(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    build_tree(a, 3, n=30)
    os.mkdir(b)
    actions = sync(a, b)
    assert differences(a, b) == []
    assert isinstance(actions[-1], SetAttr) and actions[-1].attr.path == ""
    assert any(isinstance(x, Link) for x in actions)
    assert list(compare(walk(a), walk(b))) == []
    assert [e.path for e in walk(a)] == [e.path for e in walk(b)]
    sparse = os.lstat(os.path.join(b, b"a.b"))
    assert sparse.st_blocks * 512 < 2 * BLOCK_SIZE  # the holes stayed holes


@given(seed=st.integers(0, 2**32), ops=st.lists(
    st.tuples(st.sampled_from(PERTURBATIONS), st.booleans(), st.integers(0, 2**32)), min_size=1, max_size=8))
def test_any_perturbation_is_repaired(seed: int, ops: list[tuple[str, bool, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(os.fsencode(tmp), b"vol"), os.path.join(os.fsencode(tmp), b"rep")
        build_tree(a, seed)
        os.mkdir(b)
        sync(a, b)
        assert differences(a, b) == []
        for op, on_volume, op_seed in ops:
            perturb(a if on_volume else b, op, op_seed)
        actions = sync(a, b)
        assert differences(a, b) == [], actions
        assert list(compare(walk(a), walk(b))) == []


def test_changed_blocks_move_and_only_they(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    os.mkdir(a)
    with open(os.path.join(a, b"img"), "wb") as f:
        f.write(os.urandom(40 * BLOCK_SIZE))
    os.mkdir(b)
    sync(a, b)
    with open(os.path.join(b, b"img"), "r+b") as f:
        for block in (3, 17):
            f.seek(block * BLOCK_SIZE + 100)
            f.write(b"changed")
    os.utime(os.path.join(b, b"img"), ns=(0, 0))
    actions = list(compare(walk(a), walk(b)))
    assert [type(x) for x in actions] == [Content, SetAttr]
    assert copy_content(a, b, actions[0]) == [3, 17]  # type: ignore[arg-type]
    apply(actions[1:], a, b)
    assert differences(a, b) == []


def test_content_flag_finds_changes_that_keep_size_and_mtime(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    build_tree(a, 4)
    os.mkdir(b)
    sync(a, b)
    victim = next(p for p in all_paths(b) if stat.S_ISREG(os.lstat(p).st_mode) and os.lstat(p).st_size > 10)
    st_ = os.lstat(victim)
    with open(victim, "r+b") as f:
        f.write(b"\x00changed!")
    os.utime(victim, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert list(compare(walk(a), walk(b))) == []  # by size and mtime, as rsync without -c
    assert differences(a, b) != []
    sync(a, b, content=True)
    assert differences(a, b) == []


def test_removals_depth_first_and_directory_attrs_after_their_subtree(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    os.makedirs(os.path.join(a, b"x"))
    open(os.path.join(a, b"x", b"new"), "wb").close()
    with open(os.path.join(a, b"t"), "wb") as f:
        f.write(b"now a file")
    os.makedirs(os.path.join(b, b"t", b"deep"))
    open(os.path.join(b, b"t", b"deep", b"f"), "wb").close()
    os.makedirs(os.path.join(b, b"x"))
    got = [(type(x).__name__, getattr(x, "path", None) or getattr(getattr(x, "entry", None), "path", None)
            or x.attr.path) for x in compare(walk(a), walk(b))]  # type: ignore[union-attr]
    assert got == [
        ("Remove", "t/deep/f"), ("Remove", "t/deep"), ("Remove", "t"),
        ("Create", "t"), ("Content", "t"), ("SetAttr", "t"),
        ("Create", "x/new"), ("SetAttr", "x/new"), ("SetAttr", "x"),
        ("SetAttr", ""),
    ]


def test_hard_link_groups_far_apart_and_a_shared_replica_inode(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    for root in (a, b):
        os.makedirs(os.path.join(root, b"a"))
        os.makedirs(os.path.join(root, b"z"))
    with open(os.path.join(a, b"a", b"one"), "wb") as f:
        f.write(b"1" * 100)
    os.link(os.path.join(a, b"a", b"one"), os.path.join(a, b"z", b"one"))
    with open(os.path.join(a, b"m"), "wb") as f:
        f.write(b"2" * 100)
    # the replica: one inode under all three names, so updating "m" in place would change "a/one"
    with open(os.path.join(b, b"a", b"one"), "wb") as f:
        f.write(b"old")
    os.link(os.path.join(b, b"a", b"one"), os.path.join(b, b"m"))
    os.link(os.path.join(b, b"a", b"one"), os.path.join(b, b"z", b"one"))
    actions = sync(a, b)
    assert differences(a, b) == []
    assert Link("z/one", "a/one") not in actions  # z/one already was a/one's inode
    assert Remove("m", Kind.FILE) in actions


def test_compare_refuses_walks_out_of_order() -> None:
    root = Entry("", Kind.DIR, 0, 0o755, 0, 0, 0)
    f = Entry("b", Kind.FILE, 0, 0o644, 0, 0, 0)
    g = Entry("a", Kind.FILE, 0, 0o644, 0, 0, 0)
    with pytest.raises(InvalidWalk):
        list(compare([root, f, g], [root]))
    with pytest.raises(InvalidWalk):
        list(compare([f], [root]))
    with pytest.raises(InvalidWalk):
        list(compare([root], []))


# ---------------------------------------------------------------------------------------------
# blocks_to_send against diff_blocks of whole files, with windows cut anywhere


def windows(size: int, blocks: list[bytes], cuts: Iterator[int]) -> list[Manifest]:
    out, first = [], 0
    while True:
        count = min(next(cuts), len(blocks) - first)
        out.append(Manifest.build(size, blocks[first:first + count], first))
        first += count
        if first >= len(blocks):
            return out


def digest(n: int) -> bytes:
    return bytes([n]) * 32


block_lists = st.integers(0, 30).flatmap(lambda n: st.tuples(
    st.integers(max(0, (n - 1) * BLOCK_SIZE + 1) if n else 0, n * BLOCK_SIZE),
    st.lists(st.sampled_from([HOLE, digest(1), digest(2)]), min_size=n, max_size=n)))


@given(ours=block_lists, theirs=block_lists, our_cut=st.integers(1, 9), their_cut=st.integers(1, 9),
       fresh=st.booleans())
def test_blocks_to_send_equals_diff_of_whole_files(ours: tuple[int, list[bytes]],
                                                   theirs: tuple[int, list[bytes]],
                                                   our_cut: int, their_cut: int, fresh: bool) -> None:
    (size_a, a), (size_b, b) = ours, theirs
    assert block_count(size_a) == len(a)
    whole_b = Manifest.build(size_b, b) if not fresh else Manifest(0, 0, 0, b"", b"")
    expected = diff_blocks(Manifest.build(size_a, a), whole_b)
    ours_w = windows(size_a, a, iter(lambda: our_cut, None))
    theirs_w = None if fresh else windows(size_b, b, iter(lambda: their_cut, None))
    assert list(blocks_to_send(ours_w, theirs_w)) == expected
