"""The target directory is a jail: `Target` and `Applier` never touch anything outside it.

Also the applier's exactly-once basics: a re-run skips what was checkpointed, a crash at any
event followed by a re-run converges to the tree of an uncrashed run.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clusterrep.confined import Target
from clusterrep.errors import ApplyError, InvalidEvent, SimulatedCrash, TargetEscape
from clusterrep.events import (
    Attr,
    Close,
    Create,
    Event,
    Exchange,
    Fallocate,
    Join,
    MetaEvent,
    Mkdir,
    Mknod,
    Open,
    Rename,
    Rmdir,
    SetAttr,
    Symlink,
    Tick,
    Truncate,
    Unlink,
    Write,
)
from clusterrep.replica.applier import Applier
from clusterrep.sim.volume import Volume, read_tree

COORD = "coordinator"


def meta(cls: type[MetaEvent], g: int, **fields: Any) -> MetaEvent:
    """Metadata event number ``g`` executed by the coordinator on behalf of node h1."""
    return cls(source=COORD, seq=g, gseq=g, op_id=f"h1-{g}", origin="h1", **fields)


def write(seq: int, after: int, path: str, offset: int, data: bytes) -> Write:
    """Data event ``seq`` of node h1, recorded when it knew gseq ``after``."""
    return Write(source="h1", seq=seq, after=after, path=path, offset=offset, data=data)


def full_stat(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Mode, inode, size and mtime of ``root`` and of everything below it (links not followed)."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(path)
        out[str(path.relative_to(root))] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


@dataclass
class World:
    target: Path
    outside: Path
    state: Path

    def snapshot_outside(self) -> tuple[dict[str, tuple], dict[str, tuple[int, int, int, int]]]:
        return read_tree(self.outside), full_stat(self.outside)


@pytest.fixture
def world(tmp_path: Path) -> World:
    """target/ holds symlinks into outside/; outside/ holds things worth protecting."""
    target, outside, state = tmp_path / "target", tmp_path / "outside", tmp_path / "state"
    target.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"do not touch\n")
    (outside / "victim").chmod(0o640)
    (outside / "sub").mkdir()
    (outside / "sub").chmod(0o750)
    (outside / "sub" / "deep").write_bytes(b"deep secret")
    (outside / "sub" / "deep").chmod(0o600)
    outside.chmod(0o751)
    os.utime(outside / "victim", ns=(1_000_000_000, 2_000_000_000))
    os.symlink(outside, target / "link")  # absolute: target/link -> /.../outside
    os.symlink("../outside/victim", target / "flink")  # relative: target/flink -> outside file
    (target / "inside").write_bytes(b"inside")
    (target / "scratch").write_bytes(b"")
    return World(target, outside, state)


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail instead of hanging if an open() blocks (a FIFO without a peer)."""

    def timeout(signum: int, frame: Any) -> None:
        raise TimeoutError("the operation blocked")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(5)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_one(world: World, event: Event, *, replaying: bool) -> Applier:
    """A fresh applier; outside the replay window unless ``replaying``; then ``event`` (g3)."""
    app = Applier(world.target, world.state)
    prefix: list[Event] = [meta(Join, 1)]
    prefix.append(meta(Open, 2, path="scratch") if replaying else meta(Unlink, 2, path="scratch"))
    app.apply(prefix)
    assert app.replaying is replaying
    try:
        app.apply([event])
    except BaseException:
        app.target.close()
        raise
    return app


# ---------------------------------------------------------------------------------------------
# A symlink to a directory outside the target

E, A = TargetEscape, ApplyError

# (id, event, error when replaying, error outside the replay window). The error is the exact
# class raised: TargetEscape when a symlink or non-directory stands in the way of a path,
# plain ApplyError when the target refuses for another reason (the name exists, ...).
THROUGH_LINK: list[tuple[str, Event, type[Exception], type[Exception]]] = [
    ("write link/x", write(1, 2, "link/x", 0, b"pwned"), E, E),
    ("write link/victim", write(1, 2, "link/victim", 0, b"pwned"), E, E),
    ("write link/sub/deep", write(1, 2, "link/sub/deep", 0, b"pwned"), E, E),
    ("create link/new", meta(Create, 3, path="link/new", mode=0o777), E, E),
    ("create link/victim", meta(Create, 3, path="link/victim"), E, E),
    ("mkdir link/d", meta(Mkdir, 3, path="link/d", mode=0o777), E, E),
    ("mkdir link/sub", meta(Mkdir, 3, path="link/sub", mode=0o777), E, E),
    ("mkdir link (the link itself)", meta(Mkdir, 3, path="link", mode=0o777), E, A),
    ("unlink link/victim", meta(Unlink, 3, path="link/victim"), E, E),
    ("unlink link/sub/deep", meta(Unlink, 3, path="link/sub/deep"), E, E),
    ("rmdir link/sub", meta(Rmdir, 3, path="link/sub"), E, E),
    ("rmdir link (the link itself)", meta(Rmdir, 3, path="link"), A, A),
    ("rename link/victim to moved", meta(Rename, 3, path="link/victim", dst="moved"), E, E),
    ("rename inside to link/stolen", meta(Rename, 3, path="inside", dst="link/stolen"), E, E),
    ("rename inside over link/victim", meta(Rename, 3, path="inside", dst="link/victim"), E, E),
    ("truncate link/victim", meta(Truncate, 3, path="link/victim", size=0), E, E),
    ("setattr mode link/victim", meta(SetAttr, 3, path="link/victim", mode=0o777), E, E),
    ("setattr mode link/sub", meta(SetAttr, 3, path="link/sub", mode=0o777), E, E),
    ("setattr mtime link/victim", meta(SetAttr, 3, path="link/victim", mtime_ns=5), E, E),
    ("symlink link/evil", meta(Symlink, 3, path="link/evil", target="/etc/passwd"), E, E),
    ("symlink over link/victim", meta(Symlink, 3, path="link/victim", target="x"), E, E),
    # a symlink to a file outside, where the event expects a regular file
    ("write flink", write(1, 2, "flink", 0, b"pwned"), E, E),
    ("write flink past end", write(1, 2, "flink", 1 << 20, b"pwned"), E, E),
    ("truncate flink", meta(Truncate, 3, path="flink", size=0), E, E),
    ("create flink", meta(Create, 3, path="flink", mode=0o777), E, A),
    ("mkdir flink/d", meta(Mkdir, 3, path="flink/d"), E, E),
    ("write flink/x", write(1, 2, "flink/x", 0, b"pwned"), E, E),
]


@pytest.mark.parametrize("replaying", [True, False], ids=["replay-window", "after-barrier"])
@pytest.mark.parametrize(("event", "in_replay", "after_barrier"),
                         [pytest.param(*case[1:], id=case[0]) for case in THROUGH_LINK])
def test_nothing_outside_is_touched_through_a_symlink(
    world: World, event: Event, in_replay: type[Exception], after_barrier: type[Exception],
    replaying: bool,
) -> None:
    expected = in_replay if replaying else after_barrier
    before = world.snapshot_outside()
    with pytest.raises(ApplyError) as info:
        run_one(world, event, replaying=replaying)
    assert type(info.value) is expected, f"got {type(info.value).__name__}: {info.value}"
    assert world.snapshot_outside() == before
    # the links themselves are still there, unchanged
    assert os.readlink(world.target / "link") == str(world.outside)
    assert os.readlink(world.target / "flink") == "../outside/victim"
    assert (world.target / "inside").read_bytes() == b"inside"


def test_escape_message_names_the_offending_component(world: World) -> None:
    target = Target(world.target)
    try:
        with pytest.raises(TargetEscape, match=r"'link' in the target is not a directory"):
            target.write("link/x", 0, b"x")
        with pytest.raises(TargetEscape, match=r"'flink' in the target is a symlink"):
            target.write("flink", 0, b"x")
    finally:
        target.close()


def test_a_symlink_standing_deeper_in_the_path_is_refused(world: World) -> None:
    (world.target / "a" / "b").mkdir(parents=True)
    os.symlink(world.outside / "sub", world.target / "a" / "b" / "c")
    before = world.snapshot_outside()
    target = Target(world.target)
    try:
        with pytest.raises(TargetEscape, match=r"'a/b/c' in the target is not a directory"):
            target.write("a/b/c/deep", 0, b"pwned")
        with pytest.raises(TargetEscape):
            target.create("a/b/c/new", 0o644, exist_ok=True)
        with pytest.raises(TargetEscape):
            target.exists("a/b/c/deep")
        with pytest.raises(TargetEscape):
            target.unlink("a/b/c/deep", missing_ok=True)
        # the directories in front of the link were usable, and still are
        target.create("a/b/ok", 0o644, exist_ok=False)
        target.write("a/b/ok", 0, b"fine")
    finally:
        target.close()
    assert (world.target / "a" / "b" / "ok").read_bytes() == b"fine"
    assert world.snapshot_outside() == before


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(meta(Unlink, 3, path="link"), id="unlink"),
        pytest.param(meta(Rename, 3, path="link", dst="renamed"), id="rename"),
        pytest.param(meta(SetAttr, 3, path="link", mode=0o700, mtime_ns=7), id="setattr"),
    ],
)
def test_operations_on_the_link_itself_act_on_the_link(world: World, event: Event) -> None:
    before = world.snapshot_outside()
    run_one(world, event, replaying=False).close()
    assert world.snapshot_outside() == before


# ---------------------------------------------------------------------------------------------
# A symlink to a file outside


@pytest.mark.parametrize("replaying", [True, False], ids=["replay-window", "after-barrier"])
def test_writing_to_a_symlink_to_an_outside_file_is_refused(world: World, replaying: bool) -> None:
    victim = world.outside / "victim"
    st = os.stat(victim)
    with pytest.raises(TargetEscape, match="is a symlink; refusing to write through it"):
        run_one(world, write(1, 2, "flink", 0, b"overwritten"), replaying=replaying)
    assert victim.read_bytes() == b"do not touch\n"
    after = os.stat(victim)
    assert (after.st_ino, after.st_mode, after.st_size, after.st_mtime_ns) == (
        st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    assert os.readlink(world.target / "flink") == "../outside/victim"


# ---------------------------------------------------------------------------------------------
# A FIFO where a regular file is expected


@pytest.fixture
def fifo(world: World) -> Path:
    path = world.target / "pipe"
    os.mkfifo(path, 0o644)
    return path


@pytest.mark.usefixtures("no_hang")
@pytest.mark.parametrize(
    ("event", "replaying", "error"),
    [
        # opened read-write (which never blocks on a FIFO), then refused as not a regular file
        pytest.param(write(1, 2, "pipe", 0, b"data"), False, TargetEscape, id="write"),
        pytest.param(meta(Truncate, 3, path="pipe", size=0), False, TargetEscape, id="truncate"),
        pytest.param(meta(Create, 3, path="pipe"), True, TargetEscape, id="create-replaying"),
        pytest.param(meta(Create, 3, path="pipe"), False, ApplyError, id="create"),
        # as a directory: O_DIRECTORY refuses it -> TargetEscape
        pytest.param(write(1, 2, "pipe/x", 0, b"data"), False, TargetEscape, id="write-below"),
        pytest.param(meta(Mkdir, 3, path="pipe"), True, TargetEscape, id="mkdir-replaying"),
    ],
)
def test_a_fifo_is_refused_without_blocking(
    world: World, fifo: Path, event: Event, replaying: bool, error: type[Exception]
) -> None:
    with pytest.raises(ApplyError) as info:
        run_one(world, event, replaying=replaying)
    assert type(info.value) is error, f"got {type(info.value).__name__}: {info.value}"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.usefixtures("no_hang")
@pytest.mark.parametrize(
    "event",
    [
        pytest.param(write(1, 2, "pipe", 0, b"data"), id="write"),
        pytest.param(meta(Truncate, 3, path="pipe", size=0), id="truncate"),
        pytest.param(meta(Create, 3, path="pipe"), id="create-replaying"),
    ],
)
def test_a_fifo_with_a_reader_is_refused_as_not_a_regular_file(
    world: World, fifo: Path, event: Event
) -> None:
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(TargetEscape, match="is not a regular file"):
            run_one(world, event, replaying=True)
        try:
            leaked = os.read(reader, 100)
        except BlockingIOError:
            leaked = b""
        assert leaked == b""
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.usefixtures("no_hang")
def test_setattr_on_a_fifo_does_not_open_it(world: World, fifo: Path) -> None:
    run_one(world, meta(SetAttr, 3, path="pipe", mode=0o600, mtime_ns=123), replaying=False).close()
    st = os.lstat(fifo)
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == 123


# ---------------------------------------------------------------------------------------------
# SetAttr on a symlink


@pytest.mark.parametrize(
    ("link", "pointee"),
    [("ilink", "inner"), ("flink", "../outside/victim"), ("link", "../outside")],
    ids=["to-inside-file", "to-outside-file", "to-outside-dir"],
)
def test_setattr_mode_on_a_symlink_leaves_its_target_alone(
    world: World, link: str, pointee: str
) -> None:
    inner = world.target / "inner"
    inner.write_bytes(b"inner")
    inner.chmod(0o600)
    os.symlink("inner", world.target / "ilink")
    pointee_path = world.target / pointee
    before_outside = world.snapshot_outside()
    content = os.readlink(world.target / link)
    st = os.stat(pointee_path)
    app = run_one(world, meta(SetAttr, 3, path=link, mode=0o777, atime_ns=11, mtime_ns=22),
                  replaying=False)
    app.close()
    after = os.stat(pointee_path)
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(st.st_mode)
    assert (after.st_mtime_ns, after.st_atime_ns) == (st.st_mtime_ns, st.st_atime_ns)
    # the times went to the link itself, its content is unchanged
    lst = os.lstat(world.target / link)
    assert stat.S_ISLNK(lst.st_mode)
    assert lst.st_mtime_ns == 22
    assert os.readlink(world.target / link) == content
    assert world.snapshot_outside() == before_outside
    assert stat.S_IMODE(os.stat(inner).st_mode) == 0o600


# ---------------------------------------------------------------------------------------------
# Symlink events: the target string is stored, never followed

LINK_TARGETS = ["/etc/passwd", "/", "../../../../etc/shadow", "/nonexistent/dir/x", "loop",
                "caf\udce9/☃", "a" * 4095]  # 4095 bytes: the most a Linux symlink can hold


@pytest.mark.parametrize("replaying", [True, False], ids=["replay-window", "after-barrier"])
@pytest.mark.parametrize("link_target", LINK_TARGETS, ids=lambda t: t[:20])
def test_symlink_event_stores_the_target_string(
    world: World, link_target: str, replaying: bool
) -> None:
    before = world.snapshot_outside()
    app = run_one(world, meta(Symlink, 3, path="loop", target=link_target), replaying=replaying)
    app.close()
    path = world.target / "loop"
    assert stat.S_ISLNK(os.lstat(path).st_mode)
    assert os.readlink(path) == link_target
    assert read_tree(world.target)["loop"] == ("l", link_target)
    assert world.snapshot_outside() == before


def test_symlink_longer_than_linux_allows_is_refused_by_the_model(world: World) -> None:
    # Linux stores at most 4095 bytes in a symlink; the event model refuses more
    with pytest.raises(InvalidEvent, match=r"Symlink\.target must be 1\.\.4095 bytes"):
        meta(Symlink, 3, path="long", target="a" * 4096)
    assert not os.path.lexists(world.target / "long")


def test_symlink_to_an_absolute_outside_path_is_never_followed(world: World) -> None:
    victim = str(world.outside / "victim")
    before = world.snapshot_outside()
    events: list[Event] = [
        meta(Join, 1),
        meta(Unlink, 2, path="scratch"),
        meta(Symlink, 3, path="abs", target=victim),
        meta(Symlink, 4, path="absdir", target=str(world.outside)),
        meta(SetAttr, 5, path="abs", mode=0o777),
    ]
    app = Applier(world.target, world.state)
    app.apply(events)
    for bad in (write(1, 5, "abs", 0, b"pwned"), meta(Truncate, 6, path="abs", size=0),
                meta(Create, 6, path="absdir/new"), meta(Unlink, 6, path="absdir/victim")):
        with pytest.raises(TargetEscape):
            app.apply([bad])
    app.close()
    assert os.readlink(world.target / "abs") == victim
    assert os.readlink(world.target / "absdir") == str(world.outside)
    assert world.snapshot_outside() == before


def test_symlink_replayed_over_an_existing_link_replaces_the_link(world: World) -> None:
    # in the replay window a Symlink finds its own earlier result, or (here) a stale link
    before = world.snapshot_outside()
    app = run_one(world, meta(Symlink, 3, path="flink", target="/etc/passwd"), replaying=True)
    app.close()
    assert os.readlink(world.target / "flink") == "/etc/passwd"
    assert world.snapshot_outside() == before


def test_symlink_over_an_existing_name_outside_the_replay_window_is_refused(world: World) -> None:
    with pytest.raises(ApplyError, match="exists in the target") as info:
        run_one(world, meta(Symlink, 3, path="flink", target="/etc/passwd"), replaying=False)
    assert type(info.value) is ApplyError
    assert os.readlink(world.target / "flink") == "../outside/victim"


# ---------------------------------------------------------------------------------------------
# Applier: exactly once

ODD = "caf\udce9"  # a non-UTF-8 name

EVENTS: list[Event] = [
    meta(Join, 1),
    meta(Mkdir, 2, path="d", mode=0o750),
    meta(Create, 3, path="d/f", mode=0o640),
    write(1, 3, "d/f", 0, b"hello"),
    write(2, 3, "d/f", 5, b", world"),
    meta(Create, 4, path="d/tmp"),
    write(3, 4, "d/tmp", 0, b"scratch data"),
    meta(Open, 5, path="d/f"),
    write(4, 5, "d/f", 0, b"H"),
    meta(Rename, 6, path="d/f", dst="d/g"),
    write(5, 6, "d/g", 12, b"!"),
    meta(Unlink, 7, path="d/tmp"),
    meta(Create, 8, path=ODD, mode=0o600),
    write(6, 8, ODD, 3, b"\xff\x00"),
    meta(Truncate, 9, path="d/g", size=20),
    meta(SetAttr, 10, path="d/g", mode=0o604),
    meta(Symlink, 11, path="d/l", target="/etc/passwd"),
    meta(Close, 12, path="d/g"),
    Tick(source="h1", seq=7, after=12),
    meta(Mkdir, 13, path="d/e"),
    meta(Rmdir, 14, path="d/e"),
    meta(Create, 15, path="d/tmp", mode=0o644),
    write(8, 15, "d/tmp", 0, b"second life"),
]


def expected_tree() -> dict[str, tuple]:
    """What the events mean, according to the simulator's independent in-memory volume."""
    volume = Volume()
    for ev in EVENTS:
        volume.apply(ev)
    return volume.snapshot()


def test_events_are_a_consistent_stream() -> None:
    metas = [ev for ev in EVENTS if isinstance(ev, MetaEvent)]
    assert [ev.gseq for ev in metas] == list(range(1, len(metas) + 1))
    assert all(ev.seq == ev.gseq and ev.source == COORD for ev in metas)
    data = [ev for ev in EVENTS if not isinstance(ev, MetaEvent)]
    assert [ev.seq for ev in data] == list(range(1, len(data) + 1))
    for ev in data:  # placed right after the metadata event its stamp names
        prev = [m for m in EVENTS[: EVENTS.index(ev)] if isinstance(m, MetaEvent)]
        assert ev.after == prev[-1].gseq  # type: ignore[attr-defined]


def apply_all(target: Path, state: Path, events: list[Event], **kwargs: Any) -> Applier:
    app = Applier(target, state, **kwargs)
    app.apply(events)
    app.close()
    return app


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    target, state = tmp_path / "target", tmp_path / "state"
    target.mkdir()
    return target, state


def test_applier_builds_the_expected_tree(dirs: tuple[Path, Path]) -> None:
    target, state = dirs
    app = apply_all(target, state, EVENTS)
    assert app.skipped == 0
    assert read_tree(target) == expected_tree()
    assert read_tree(target)["d/l"] == ("l", "/etc/passwd")


def test_a_second_applier_skips_everything(dirs: tuple[Path, Path]) -> None:
    target, state = dirs
    apply_all(target, state, EVENTS)
    tree = read_tree(target)
    stats = full_stat(target)
    again = apply_all(target, state, EVENTS)
    assert again.skipped == len(EVENTS)
    assert again.checkpoints == 0
    assert read_tree(target) == tree
    assert full_stat(target) == stats  # not even rewritten with the same bytes
    # and the same again, one event at a time, duplicates included
    app = Applier(target, state)
    for ev in EVENTS + EVENTS[::-1]:
        app.apply([ev])
    app.close()
    assert app.skipped == 2 * len(EVENTS)
    assert full_stat(target) == stats


def test_a_resumed_applier_applies_only_the_rest(dirs: tuple[Path, Path]) -> None:
    target, state = dirs
    half = len(EVENTS) // 2
    apply_all(target, state, EVENTS[:half])
    rest = apply_all(target, state, EVENTS)
    assert rest.skipped == half
    assert read_tree(target) == expected_tree()


def _crash_at(n: int) -> Callable[[Event], None]:
    def fault(ev: Event) -> None:
        if ev is EVENTS[n]:
            raise SimulatedCrash(f"crash before event {n}")
    return fault


@pytest.mark.parametrize("n", range(len(EVENTS)))
def test_crash_at_any_event_then_rerun_converges(tmp_path: Path, n: int) -> None:
    ref_target, ref_state = tmp_path / "ref", tmp_path / "ref-state"
    ref_target.mkdir()
    apply_all(ref_target, ref_state, EVENTS)
    reference = read_tree(ref_target)

    target, state = tmp_path / "target", tmp_path / "state"
    target.mkdir()
    crashed = Applier(target, state, fault=_crash_at(n))
    with pytest.raises(SimulatedCrash):
        crashed.apply(EVENTS)
    crashed.target.close()  # the process dies: descriptors go, no final checkpoint

    recovered = apply_all(target, state, EVENTS)
    assert recovered.skipped <= n  # nothing past the crash point was recorded as applied
    assert read_tree(target) == reference == expected_tree()
    assert apply_all(target, state, EVENTS).skipped == len(EVENTS)


@pytest.mark.parametrize("every", [1, 2, 3, 50_000])
def test_crash_at_any_checkpoint_then_rerun_converges(tmp_path: Path, every: int) -> None:
    """A crash after an event was applied but before its checkpoint was written."""
    reference = expected_tree()
    k = 0
    while True:
        target, state = tmp_path / f"t{k}", tmp_path / f"s{k}"
        target.mkdir()
        app = Applier(target, state, checkpoint_every=every)
        calls = 0
        real = app.checkpoint

        def checkpoint(real: Callable[[], None] = real, k: int = k) -> None:
            nonlocal calls
            calls += 1
            if calls > k:
                raise SimulatedCrash(f"crash instead of checkpoint {k}")
            real()

        app.checkpoint = checkpoint  # type: ignore[method-assign]
        try:
            app.apply(EVENTS)
            app.close()
        except SimulatedCrash:
            app.target.close()
        else:
            break  # k is past the last checkpoint: every crash point has been tried
        apply_all(target, state, EVENTS, checkpoint_every=every)
        assert read_tree(target) == reference, f"crash at checkpoint {k}"
        k += 1
    assert k > 5


# ---------------------------------------------------------------------------------------------
# Outside the replay window, an unexpected name is divergence


@pytest.mark.parametrize(
    "barrier",
    [meta(Unlink, 2, path="scratch"), meta(Rename, 2, path="scratch", dst="scratch2")],
    ids=["unlink", "rename"],
)
def test_mkdir_of_an_existing_directory_after_a_barrier_is_an_error(
    dirs: tuple[Path, Path], barrier: Event
) -> None:
    target, state = dirs
    (target / "d").mkdir(mode=0o700)
    (target / "scratch").write_bytes(b"")
    app = Applier(target, state)
    app.apply([meta(Join, 1)])
    assert app.replaying
    app.apply([barrier])
    assert not app.replaying
    with pytest.raises(ApplyError, match=r"cannot create directory 'd': it exists in the target") \
            as info:
        app.apply([meta(Mkdir, 3, path="d", mode=0o755)])
    assert type(info.value) is ApplyError
    assert stat.S_IMODE(os.stat(target / "d").st_mode) == 0o700  # not even chmod-ed
    app.close()


def test_mkdir_of_an_existing_directory_in_the_replay_window_is_accepted(
    dirs: tuple[Path, Path],
) -> None:
    target, state = dirs
    (target / "d").mkdir(mode=0o700)
    app = apply_all(target, state, [meta(Join, 1), meta(Mkdir, 2, path="d", mode=0o755)])
    assert app.skipped == 0
    assert stat.S_IMODE(os.stat(target / "d").st_mode) == 0o755


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (meta(Create, 3, path="f"), r"cannot create 'f': it exists"),
        (meta(Symlink, 3, path="f", target="x"), r"cannot create symlink 'f': it exists"),
        (meta(Unlink, 3, path="missing"), r"cannot remove 'missing': missing"),
        (meta(Rmdir, 3, path="missing"), r"cannot remove directory 'missing': missing"),
        (meta(Rename, 3, path="missing", dst="x"), r"cannot rename 'missing' to 'x'"),
        (write(1, 2, "missing", 0, b"x"), r"file 'missing' is missing in the target"),
        (meta(Create, 3, path="nodir/f"), r"directory 'nodir' is missing in the target"),
    ],
    ids=["create", "symlink", "unlink", "rmdir", "rename", "write", "create-in-missing-dir"],
)
def test_divergence_after_a_barrier_is_an_error(
    dirs: tuple[Path, Path], event: Event, message: str
) -> None:
    target, state = dirs
    (target / "f").write_bytes(b"keep")
    (target / "scratch").write_bytes(b"")
    app = Applier(target, state)
    app.apply([meta(Join, 1), meta(Unlink, 2, path="scratch")])
    with pytest.raises(ApplyError, match=message) as info:
        app.apply([event])
    assert type(info.value) is ApplyError
    assert (target / "f").read_bytes() == b"keep"
    app.close()


# ---------------------------------------------------------------------------------------------
# Issue 9: exchange, fallocate, attrs


def test_an_exchange_replayed_after_a_crash_is_not_done_twice(dirs: tuple[Path, Path]) -> None:
    """Both names exist before and after an exchange: a crash between applying it and its
    checkpoint must not swap them back on the re-run (the note written before it says)."""
    target, state = dirs
    events: list[Event] = [
        meta(Join, 1), meta(Create, 2, path="a"), write(1, 2, "a", 0, b"A"),
        meta(Create, 3, path="b"), write(2, 3, "b", 0, b"B"),
        meta(Exchange, 4, path="a", dst="b"), meta(Close, 5, path="a"),
    ]
    app = Applier(target, state)
    real = app.checkpoint
    calls = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 2:  # the one right after the exchange
            raise SimulatedCrash("crash after the exchange, before its checkpoint")
        real()
    app.checkpoint = checkpoint  # type: ignore[method-assign]
    with pytest.raises(SimulatedCrash):
        app.apply(events)
    app.target.close()
    assert (target / "a").read_bytes() == b"B"
    apply_all(target, state, events)
    assert (target / "a").read_bytes() == b"B" and (target / "b").read_bytes() == b"A"


def test_fallocate_is_emulated_where_the_target_refuses_it(
        dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno as errno_

    import clusterrep.confined as confined

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno_.EOPNOTSUPP, "not on this file system")
    monkeypatch.setattr(confined, "fallocate", refuse)
    target, state = dirs

    def falloc(seq: int, offset: int, length: int, mode: int) -> Fallocate:
        return Fallocate(source="h1", seq=seq, after=2, path="f", offset=offset, length=length,
                         mode=mode)
    app = apply_all(target, state, [
        meta(Join, 1), meta(Create, 2, path="f"), write(1, 2, "f", 0, b"\x11" * 8192),
        falloc(2, 1000, 2000, 0x03),  # punch hole, keep size
        falloc(3, 7000, 3000, 0x10),  # zero range, growing the file
        falloc(4, 11000, 1000, 0x00),  # allocate, growing it
        falloc(5, 0, 500, 0x11),  # zero range, keep size
        falloc(6, 20000, 5000, 0x01),  # keep size: nothing to see
    ])
    assert app.emulated == 5
    data = (target / "f").read_bytes()
    assert len(data) == 12000
    assert data == bytes(500) + b"\x11" * 500 + bytes(2000) + b"\x11" * 4000 + bytes(5000)


def test_attrs_set_exactly_what_the_volume_had(dirs: tuple[Path, Path]) -> None:
    """As the coordinator sends them: the new inode and its parent, after each operation."""
    target, state = dirs
    D = Attr("d", 0o2750, 4242, 777, 1_000_000_007)
    os.setxattr(target, "user.stale", b"gone after")
    apply_all(target, state, [
        meta(Join, 1),
        meta(Mkdir, 2, path="d", attrs=(
            Attr("d", 0o2750, 4242, 777, 1_000_000_007, (("user.a", b"1"), ("trusted.b", b""))),
            Attr("", 0o751, 1, 2, 2_000_000_009, (("user.root", b"r"),)))),
        meta(Symlink, 3, path="d/l", target="x", attrs=(Attr("d/l", 0o777, 5, 6, 3), D)),
        meta(Mknod, 4, path="d/p", mode=stat.S_IFIFO | 0o600, attrs=(Attr("d/p", 0o640, 7, 8, 9), D)),
    ])
    d = os.stat(target / "d")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid, d.st_mtime_ns) == (
        0o2750, 4242, 777, 1_000_000_007)
    assert sorted(os.listxattr(target / "d")) == ["trusted.b", "user.a"]
    root = os.stat(target)
    assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_mtime_ns) == (0o751, 1, 2_000_000_009)
    assert os.listxattr(target) == ["user.root"]
    link = os.lstat(target / "d/l")
    assert (link.st_uid, link.st_gid, link.st_mtime_ns) == (5, 6, 3)
    fifo = os.stat(target / "d/p")
    assert stat.S_ISFIFO(fifo.st_mode) and (stat.S_IMODE(fifo.st_mode), fifo.st_uid) == (0o640, 7)
