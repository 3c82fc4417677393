"""The product applier of a sync plan (`replica.syncapply.SyncApplier`), through the confined `Target`.

Random trees (the builders of ``test_snapshot``) are synchronised by planning with
``treediff.compare(walk(volume), walk(target))`` and applying with `SyncApplier`, the content
given as the blocks ``blocks_to_send`` names, compressed with ``blocks.compress`` and digested;
then ``verify.compare_trees`` must find nothing. Also: replays (an action twice, a plan applied
again on top of any prefix of it), plans that try to leave the target, corrupt blocks, sparse
files, logging. These tests run as root.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_snapshot import BAD_NAME, PERTURBATIONS, all_paths, build_tree, differences, perturb

from clusterrep import confined
from clusterrep.blockread import Hasher
from clusterrep.blocks import (
    BLOCK_SIZE,
    HOLE,
    Codec,
    CorruptBlock,
    block_length,
    compress,
    hash_block,
)
from clusterrep.confined import Target
from clusterrep.errors import ApplyError, InvalidEvent, TargetEscape, UnsafePath
from clusterrep.events import Attr
from clusterrep.replica.syncapply import Block, Hole, InvalidSyncAction, SyncApplier
from clusterrep.snapshot import Entry, Kind, walk
from clusterrep.treediff import Action, Content, Create, Link, Remove, SetAttr, compare

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown, mknod and trusted.* need root")


def at(root: bytes, path: str) -> bytes:
    return os.path.join(root, os.fsencode(path)) if path else root


def blocks_for(src: bytes, dst: bytes, action: Content) -> Iterator[Block | Hole]:
    """What a sender sends for ``action``: the blocks ``blocks_to_send`` names, as `Block` (compressed
    where it pays, with its digest) or `Hole`; read lazily, one block at a time."""
    from clusterrep.treediff import blocks_to_send

    size = action.entry.size
    sfd = os.open(at(src, action.entry.path), os.O_RDONLY)
    try:
        with Hasher(threads=2, in_flight=4) as hasher:
            ours = [r.manifest for r in hasher.manifests([(0, sfd, size)])]
            theirs = None
            if not action.fresh:
                dfd = os.open(at(dst, action.entry.path), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    theirs = [r.manifest for r in hasher.manifests([(1, dfd, os.fstat(dfd).st_size)])]
                finally:
                    os.close(dfd)
        holes = {i for m in ours if m is not None for i, b in m.items() if b == HOLE}
        for index in blocks_to_send(ours, theirs):  # type: ignore[arg-type]
            if index in holes:
                yield Hole(index)
                continue
            data = os.pread(sfd, block_length(size, index), index * BLOCK_SIZE)
            codec, payload = compress(data)
            yield Block(index, codec, payload, hash_block(data))
    finally:
        os.close(sfd)


class Sync:
    """A volume ``src`` and a replica ``dst`` (a `Target`), synchronised by `SyncApplier`; each
    Content's blocks are recorded by the action's index in its plan, so that a replay resends
    exactly what was sent the first time (as a resumed stream would)."""

    def __init__(self, src: bytes, dst: bytes) -> None:
        self.src, self.dst = src, dst
        self.target = Target(os.fsdecode(dst))
        self.applier = SyncApplier(self.target)
        self.sent: dict[int, list[Block | Hole]] = {}

    def plan(self, *, content: bool = False) -> list[Action]:
        return list(compare(walk(self.src), walk(self.dst), content=content))

    def apply(self, plan: list[Action], upto: int | None = None, *, twice: bool = False) -> None:
        for i, action in enumerate(plan[:upto]):
            for _ in range(2 if twice else 1):
                blocks = None
                if isinstance(action, Content):
                    if i not in self.sent:
                        self.sent[i] = list(blocks_for(self.src, self.dst, action))
                    blocks = self.sent[i]
                self.applier.apply(action, blocks)

    def run(self, *, content: bool = False) -> list[Action]:
        self.sent = {}
        plan = self.plan(content=content)
        self.apply(plan)
        self.applier.checkpoint()
        return plan

    def close(self) -> None:
        self.target.close()


@pytest.fixture
def trees(tmp_path: Path) -> tuple[bytes, bytes]:
    return os.fsencode(tmp_path / "vol"), os.fsencode(tmp_path / "rep")


def snapshot_of(root: bytes) -> list[tuple[object, ...]]:
    """Everything about a tree a test must see unchanged (names, types, content, attributes)."""
    out: list[tuple[object, ...]] = []
    for entry in walk(root):
        data = b""
        if entry.kind is Kind.FILE:
            with open(at(root, entry.path), "rb") as f:
                data = f.read()
        st_ = os.lstat(at(root, entry.path))
        out.append((entry.path, entry.kind, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs,
                    entry.target, data, st_.st_ino, st_.st_nlink, st_.st_ctime_ns))
    return out


# ---------------------------------------------------------------------------------------------
# Whole trees


def test_random_tree_into_an_empty_replica(trees: tuple[bytes, bytes],
                                           caplog: pytest.LogCaptureFixture) -> None:
    a, b = trees
    build_tree(a, 7, n=30)
    os.mkdir(b)
    sync = Sync(a, b)
    try:
        with caplog.at_level(logging.INFO, logger="clusterrep.replica.sync"):
            plan = sync.run()
            sync.applier.log_summary()
        assert differences(a, b) == []
        assert sync.plan() == []
        assert any(isinstance(x, Link) for x in plan)
        stats = sync.applier.stats
        assert stats.created == sum(isinstance(x, Create) for x in plan) and stats.removed == 0
        assert stats.blocks > 0 and stats.wire_bytes <= stats.bytes_written
        assert any("sync applied:" in r.getMessage() for r in caplog.records)
        sparse = os.lstat(os.path.join(b, b"a.b"))  # 40 blocks, data in block 5 only
        assert sparse.st_size == 40 * BLOCK_SIZE and sparse.st_blocks * 512 <= BLOCK_SIZE
    finally:
        sync.close()


@given(seed=st.integers(0, 2**32), cut=st.integers(0, 10**6), ops=st.lists(
    st.tuples(st.sampled_from(PERTURBATIONS), st.booleans(), st.integers(0, 2**32)), min_size=1, max_size=8))
def test_any_perturbation_is_repaired_and_a_replayed_plan_changes_nothing(
        seed: int, cut: int, ops: list[tuple[str, bool, int]]) -> None:
    """A stale replica is made identical; a crash after any prefix of the plan followed by the whole
    plan again (the resumed sync) ends identical too, and so does the plan applied a third time."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(os.fsencode(tmp), b"vol"), os.path.join(os.fsencode(tmp), b"rep")
        build_tree(a, seed)
        os.mkdir(b)
        sync = Sync(a, b)
        try:
            sync.run()
            assert differences(a, b) == []
            for op, on_volume, op_seed in ops:
                perturb(a if on_volume else b, op, op_seed)
            sync.target.forget()  # (the perturbation replaced directories behind the Target's back)
            sync.sent = {}
            plan = sync.plan()
            sync.apply(plan, cut % (len(plan) + 1))  # the crash
            sync.apply(plan)  # the resumed sync replays the plan from its start
            assert differences(a, b) == [], plan
            sync.apply(plan)
            assert differences(a, b) == [], plan
            assert sync.plan() == []
        finally:
            sync.close()


@given(seed=st.integers(0, 2**32), ops=st.lists(
    st.tuples(st.sampled_from(PERTURBATIONS), st.booleans(), st.integers(0, 2**32)), min_size=1, max_size=6))
def test_every_action_applied_twice_in_a_row(seed: int, ops: list[tuple[str, bool, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(os.fsencode(tmp), b"vol"), os.path.join(os.fsencode(tmp), b"rep")
        build_tree(a, seed)
        os.mkdir(b)
        sync = Sync(a, b)
        try:
            sync.apply(sync.plan(), twice=True)
            assert differences(a, b) == []
            for op, on_volume, op_seed in ops:
                perturb(a if on_volume else b, op, op_seed)
            sync.target.forget()
            sync.sent = {}
            plan = sync.plan()
            sync.apply(plan, twice=True)
            assert differences(a, b) == [], plan
        finally:
            sync.close()


def test_content_flag_repairs_changes_that_keep_size_and_mtime(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    build_tree(a, 4)
    os.mkdir(b)
    sync = Sync(a, b)
    try:
        sync.run()
        victim = next(p for p in all_paths(b)
                      if stat.S_ISREG(os.lstat(p).st_mode) and os.lstat(p).st_size > 10)
        st_ = os.lstat(victim)
        with open(victim, "r+b") as f:
            f.write(b"\x00changed!")
        os.utime(victim, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        assert differences(a, b) != []
        sync.run(content=True)
        assert differences(a, b) == []
    finally:
        sync.close()


def test_every_remove_is_logged_with_its_path(trees: tuple[bytes, bytes],
                                              caplog: pytest.LogCaptureFixture) -> None:
    a, b = trees
    os.mkdir(a)
    os.makedirs(os.path.join(b, b"old", b"deep"))
    for name in (b"old/deep/f", b"old/g", BAD_NAME):
        open(os.path.join(b, name), "wb").close()
    os.symlink(b"/etc", os.path.join(b, b"s"))
    sync = Sync(a, b)
    try:
        with caplog.at_level(logging.INFO, logger="clusterrep.replica.sync"):
            plan = sync.run()
        removed = [x.path for x in plan if isinstance(x, Remove)]
        assert sorted(removed) == sorted(["old/deep/f", "old/deep", "old/g", "old", os.fsdecode(BAD_NAME),
                                          "s"])
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        for path in removed:
            assert any("sync removes" in m and repr(path) in m for m in messages), path
        assert os.listdir(b) == [] and sync.applier.stats.removed == 6
        assert os.path.isdir("/etc")
    finally:
        sync.close()


# ---------------------------------------------------------------------------------------------
# Confinement


def test_paths_that_leave_the_target_are_refused(tmp_path: Path) -> None:
    outside = os.fsencode(tmp_path / "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, b"secret"), "wb") as f:
        f.write(b"keep me")
    os.mkdir(os.path.join(outside, b"dir"))
    rep = os.fsencode(tmp_path / "rep")
    os.mkdir(rep)
    os.symlink(outside, os.path.join(rep, b"sub"))  # a symlink where the plan expects a directory
    os.symlink(os.path.join(outside, b"secret"), os.path.join(rep, b"lnk"))
    with open(os.path.join(rep, b"f"), "wb") as f:
        f.write(b"x")
    before = snapshot_of(outside)
    target = Target(os.fsdecode(rep))
    applier = SyncApplier(target)
    file_ = Entry("sub/secret", Kind.FILE, 7, 0o644, 0, 0, 0)
    attr = Attr("sub/secret", 0o777, 1234, 1234, 5, (("user.x", b"1"),))
    refused: list[tuple[Action, type[Exception]]] = [
        (Create(Entry("../x", Kind.FILE, 1, 0o644, 0, 0, 0)), UnsafePath),
        (Create(Entry("/tmp/x", Kind.DIR, 0, 0o755, 0, 0, 0)), UnsafePath),
        (Create(Entry("a/./b", Kind.DIR, 0, 0o755, 0, 0, 0)), UnsafePath),
        (Remove("../outside/secret", Kind.FILE), UnsafePath),
        (Remove("", Kind.DIR), UnsafePath),
        (Link("x", "../outside/secret"), UnsafePath),
        (SetAttr(Attr("..", 0o777, 0, 0, 0), Kind.DIR), InvalidEvent),
        (Create(Entry("sub/new", Kind.FILE, 10, 0o644, 0, 0, 0)), TargetEscape),
        (Create(Entry("sub/dir/new", Kind.DIR, 0, 0o755, 0, 0, 0)), TargetEscape),
        (Create(Entry("sub/fifo", Kind.FIFO, 0, 0o644, 0, 0, 0)), TargetEscape),
        (Create(Entry("sub/l", Kind.SYMLINK, 0, 0o777, 0, 0, 0, target="/")), TargetEscape),
        (Create(file_), TargetEscape),
        (Content(file_, False), TargetEscape),
        (Content(Entry("lnk", Kind.FILE, 7, 0o644, 0, 0, 0), False), TargetEscape),  # the link itself
        (SetAttr(attr, Kind.FILE), TargetEscape),
        (Link("sub/x", "f"), TargetEscape),
        (Link("stolen", "sub/secret"), TargetEscape),
        (Create(Entry("f/x", Kind.FILE, 0, 0o644, 0, 0, 0)), TargetEscape),  # a file where a dir must be
    ]
    try:
        for action, error in refused:
            blocks = [Block(0, Codec.RAW, b"pwned!!")] if isinstance(action, Content) else None
            with pytest.raises(error):
                applier.apply(action, blocks)
        # a Remove beneath a symlink: nothing of the target is there, and nothing is followed
        applier.apply(Remove("sub/secret", Kind.FILE))
        applier.apply(Remove("sub/dir", Kind.DIR))
        # the symlink itself is the target's to change, and its outside target stays
        applier.apply(SetAttr(Attr("lnk", 0o777, 1234, 1234, 5, (("trusted.x", b"1"),)), Kind.SYMLINK))
        assert os.lstat(os.path.join(rep, b"lnk")).st_uid == 1234
        applier.apply(Remove("lnk", Kind.SYMLINK))
        assert not os.path.lexists(os.path.join(rep, b"lnk"))
    finally:
        target.close()
    assert snapshot_of(outside) == before


def test_a_directory_swapped_for_a_symlink_after_planning(trees: tuple[bytes, bytes], tmp_path: Path) -> None:
    """The plan was made when ``d`` was a directory; then ``d`` became a symlink to a directory outside
    holding the same names: applying the plan stops at the first action that would go through it."""
    a, b = trees
    for root in (a, b):
        os.makedirs(os.path.join(root, b"d"))
    for name in (b"same", b"changed"):
        with open(os.path.join(a, b"d", name), "wb") as f:
            f.write(b"volume " + name)
    with open(os.path.join(b, b"d", b"changed"), "wb") as f:
        f.write(b"old")
    open(os.path.join(b, b"d", b"extra"), "wb").close()
    sync = Sync(a, b)
    plan = sync.plan()
    outside = os.fsencode(tmp_path / "outside")
    os.rename(os.path.join(b, b"d"), outside)
    os.symlink(outside, os.path.join(b, b"d"))
    before = snapshot_of(outside)
    try:
        with pytest.raises(TargetEscape):
            sync.apply(plan)
    finally:
        sync.close()
    assert snapshot_of(outside) == before


# ---------------------------------------------------------------------------------------------
# Content: corrupt blocks, holes


def one_file(root: bytes, name: bytes, data: bytes) -> None:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, name), "wb") as f:
        f.write(data)


def test_a_corrupt_block_is_refused_before_anything_of_it_is_written(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    rng = random.Random(3)
    new, old = rng.randbytes(4 * BLOCK_SIZE), rng.randbytes(4 * BLOCK_SIZE)
    one_file(a, b"img", new)
    one_file(b, b"img", old)
    entry = Entry("img", Kind.FILE, len(new), 0o644, 0, 0, 0)
    target = Target(os.fsdecode(b))
    applier = SyncApplier(target)

    def good(index: int) -> Block:
        data = new[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]
        return Block(index, *compress(data), hash_block(data))

    zeros = bytes(BLOCK_SIZE)
    flipped = bytearray(new[BLOCK_SIZE:2 * BLOCK_SIZE])
    flipped[100] ^= 1
    corrupt = [
        Block(1, Codec.RAW, bytes(flipped), hash_block(new[BLOCK_SIZE:2 * BLOCK_SIZE])),  # digest mismatch
        Block(1, *compress(zeros), hash_block(new[BLOCK_SIZE:2 * BLOCK_SIZE])),  # ditto, compressed
        Block(1, Codec.RAW, new[BLOCK_SIZE:2 * BLOCK_SIZE - 1]),  # short
        Block(1, Codec.ZSTD, compress(zeros + zeros)[1]),  # declares twice the length
        Block(1, Codec.ZSTD, compress(zeros)[1][:-3]),  # truncated frame
        Block(1, 7, new[BLOCK_SIZE:2 * BLOCK_SIZE]),  # unknown codec
    ]
    try:
        for bad in corrupt:
            with pytest.raises(CorruptBlock) as info:
                applier.apply(Content(entry, False), [good(0), bad, good(2)])
            assert "block 1 of 'img'" in str(info.value)
            with open(os.path.join(b, b"img"), "rb") as f:
                got = f.read()
            assert got[:BLOCK_SIZE] == new[:BLOCK_SIZE]  # the block before it was written
            assert got[BLOCK_SIZE:] == old[BLOCK_SIZE:]  # nothing of the bad block, nothing after
        applier.apply(Content(entry, False), [good(i) for i in range(4)])
        with open(os.path.join(b, b"img"), "rb") as f:
            assert f.read() == new
    finally:
        target.close()


def test_malformed_block_lists_are_refused(trees: tuple[bytes, bytes]) -> None:
    _, b = trees
    one_file(b, b"f", bytes(3 * BLOCK_SIZE))
    target = Target(os.fsdecode(b))
    applier = SyncApplier(target)
    entry = Entry("f", Kind.FILE, 3 * BLOCK_SIZE, 0o644, 0, 0, 0)
    raw = Block(0, Codec.RAW, bytes(BLOCK_SIZE))
    try:
        for blocks in ([raw, raw], [Hole(2), Hole(1)], [Hole(3)], [Hole(-1)], [(0, Codec.RAW, b"")],
                       [Block(0, Codec.RAW, bytes(BLOCK_SIZE), b"short digest")]):
            with pytest.raises(InvalidSyncAction):
                applier.apply(Content(entry, False), blocks)  # type: ignore[arg-type]
        with pytest.raises(InvalidSyncAction):
            applier.apply(Content(entry, False))
        with pytest.raises(InvalidSyncAction):
            applier.apply(Remove("f", Kind.FILE), [])
        with pytest.raises(InvalidSyncAction):
            applier.apply(Content(Entry("f", Kind.DIR, 0, 0o755, 0, 0, 0), False), [])
        with pytest.raises(InvalidSyncAction):
            applier.apply(Create(Entry("s", Kind.SYMLINK, 0, 0o777, 0, 0, 0)))  # no target
        with pytest.raises(InvalidSyncAction):
            applier.apply(Create(Entry("g", Kind.FILE, -1, 0o644, 0, 0, 0)))
        with pytest.raises(InvalidSyncAction):
            applier.apply("remove everything")  # type: ignore[arg-type]
        with pytest.raises(InvalidEvent):
            applier.apply(SetAttr(Attr("f", 0o17777, 0, 0, 0), Kind.FILE))
    finally:
        target.close()


def sparse_image(path: bytes, size: int, data_blocks: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for index, data in data_blocks.items():
            f.seek(index * BLOCK_SIZE)
            f.write(data)


def test_holes_are_punched_so_sparse_files_stay_sparse(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    size = 1024 * BLOCK_SIZE + 123  # 64 MiB and a bit
    os.mkdir(a)
    os.mkdir(b)
    data = {3: os.urandom(BLOCK_SIZE), 700: os.urandom(BLOCK_SIZE), 1024: os.urandom(123)}
    sparse_image(os.path.join(a, b"img"), size, data)
    sparse_image(os.path.join(a, b"fresh"), size, data)
    with open(os.path.join(b, b"img"), "wb") as f:  # the replica's copy: fully allocated, longer
        for _ in range(1100):
            f.write(os.urandom(BLOCK_SIZE))
    os.utime(os.path.join(b, b"img"), ns=(0, 0))
    sync = Sync(a, b)
    try:
        plan = sync.run()
        assert Content(next(x.entry for x in plan if isinstance(x, Content) and x.entry.path == "img"),
                       False) in plan
        assert differences(a, b) == []
        for name in (b"img", b"fresh"):
            ours, theirs = os.lstat(os.path.join(a, name)), os.lstat(os.path.join(b, name))
            assert theirs.st_size == size
            assert theirs.st_blocks <= ours.st_blocks + 8  # (a block is at most 8 KiB more than its data)
            assert theirs.st_blocks * 512 <= 3 * BLOCK_SIZE + 8192
        assert sync.applier.stats.holes == 1024 - 2
    finally:
        sync.close()


def test_hole_punching_refused_by_the_file_system_writes_zeros(
        trees: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = trees
    os.mkdir(a)
    sparse_image(os.path.join(a, b"img"), 8 * BLOCK_SIZE, {2: os.urandom(BLOCK_SIZE)})
    one_file(b, b"img", os.urandom(8 * BLOCK_SIZE))
    os.utime(os.path.join(b, b"img"), ns=(0, 0))

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(confined, "fallocate", refuse)
    sync = Sync(a, b)
    try:
        with caplog.at_level(logging.WARNING, logger="clusterrep.replica.sync"):
            sync.run()
        assert differences(a, b) == []
        assert sync.applier.stats.emulated == 7
        assert sum("cannot punch holes" in r.getMessage() for r in caplog.records) == 1
    finally:
        sync.close()


def test_a_shorter_file_is_cut_and_a_longer_one_extended(trees: tuple[bytes, bytes]) -> None:
    a, b = trees
    for name, ours, theirs in ((b"short", 100, 5 * BLOCK_SIZE), (b"long", 3 * BLOCK_SIZE + 5, 10)):
        one_file(a, name, os.urandom(ours))
        one_file(b, name, os.urandom(theirs))
    sync = Sync(a, b)
    try:
        sync.run()
        assert differences(a, b) == []
    finally:
        sync.close()


# ---------------------------------------------------------------------------------------------
# Replay rules, one by one


def test_replay_rules(trees: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture) -> None:
    _, b = trees
    os.mkdir(b)
    target = Target(os.fsdecode(b))
    applier = SyncApplier(target)
    path = os.path.join
    try:
        with caplog.at_level(logging.INFO, logger="clusterrep.replica.sync"):
            applier.apply(Remove("gone", Kind.FILE))
            applier.apply(Remove("nodir/gone", Kind.FILE))
        assert applier.stats.absent == 2 and applier.stats.removed == 0
        assert any("'gone'" in r.getMessage() and "already absent" in r.getMessage() for r in caplog.records)
        # Create of an existing file: emptied and set to its size, a hole
        one_file(b, b"f", b"data" * 100)
        f = Entry("f", Kind.FILE, 3 * BLOCK_SIZE, 0o644, 0, 0, 0)
        applier.apply(Create(f))
        applier.apply(Create(f))
        with open(path(b, b"f"), "rb") as fh:
            assert fh.read() == bytes(3 * BLOCK_SIZE)
        assert os.lstat(path(b, b"f")).st_blocks == 0
        # one with another name: replaced by a new inode, the other name keeps its content
        one_file(b, b"shared", b"mine")
        os.link(path(b, b"shared"), path(b, b"other"))
        applier.apply(Create(Entry("shared", Kind.FILE, 0, 0o644, 0, 0, 0)))
        with open(path(b, b"other"), "rb") as fh:
            assert fh.read() == b"mine"
        assert os.lstat(path(b, b"other")).st_nlink == 1 and os.lstat(path(b, b"shared")).st_size == 0
        # directories, symlinks (retargeted), devices (renumbered)
        d = Entry("d", Kind.DIR, 0, 0o755, 0, 0, 0)
        applier.apply(Create(d))
        applier.apply(Create(d))
        applier.apply(Create(Entry("d/l", Kind.SYMLINK, 0, 0o777, 0, 0, 0, target="x")))
        applier.apply(Create(Entry("d/l", Kind.SYMLINK, 0, 0o777, 0, 0, 0, target="y")))
        assert os.readlink(path(b, b"d/l")) == b"y"
        applier.apply(Create(Entry("c", Kind.CHAR, 0, 0o600, 0, 0, 0, rdev=os.makedev(1, 3))))
        applier.apply(Create(Entry("c", Kind.CHAR, 0, 0o600, 0, 0, 0, rdev=os.makedev(1, 5))))
        assert os.lstat(path(b, b"c")).st_rdev == os.makedev(1, 5)
        # another kind where the plan creates: the target diverged
        with pytest.raises(ApplyError, match="a dir stands there"):
            applier.apply(Create(Entry("d", Kind.FILE, 0, 0o644, 0, 0, 0)))
        # Link: the same inode is accepted, another non-directory replaced, a directory refused
        applier.apply(Link("g", "f"))
        applier.apply(Link("g", "f"))
        assert os.lstat(path(b, b"g")).st_ino == os.lstat(path(b, b"f")).st_ino
        one_file(b, b"h", b"stale")
        applier.apply(Link("h", "f"))
        assert os.lstat(path(b, b"h")).st_ino == os.lstat(path(b, b"f")).st_ino
        with pytest.raises(ApplyError):
            applier.apply(Link("d", "f"))
        with pytest.raises(ApplyError, match="missing"):
            applier.apply(Link("k", "nothing"))
        # SetAttr: full state, twice; the kind must match
        attr = Attr("f", 0o4750, 1234, 65534, 1_234_567_891, (("user.a", b"1"),))
        os.setxattr(path(b, b"f"), "user.old", b"x")
        applier.apply(SetAttr(attr, Kind.FILE))
        applier.apply(SetAttr(attr, Kind.FILE))
        st_ = os.lstat(path(b, b"f"))
        assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid, st_.st_mtime_ns) == (0o4750, 1234, 65534,
                                                                                        1_234_567_891)
        assert os.listxattr(path(b, b"f")) == ["user.a"]
        with pytest.raises(ApplyError, match="a file stands there"):
            applier.apply(SetAttr(attr, Kind.DIR))
        # Remove of a directory where a file was announced (made by the plan's later Create): left
        applier.apply(Remove("d", Kind.FILE))
        assert os.path.isdir(path(b, b"d"))
        # a non-directory of another kind than announced: removed all the same
        applier.apply(Remove("c", Kind.FILE))
        assert not os.path.lexists(path(b, b"c"))
        with pytest.raises(ApplyError):
            applier.apply(Remove("d", Kind.DIR))  # not empty
    finally:
        target.close()


def test_checkpoint_syncs_the_target(trees: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    _, b = trees
    os.mkdir(b)
    target = Target(os.fsdecode(b))
    synced: list[int] = []
    monkeypatch.setattr(confined, "syncfs", synced.append)
    try:
        SyncApplier(target).checkpoint()
    finally:
        target.close()
    assert synced == [target.root_fd]
