"""What the replica must do to become identical to the volume: a streaming merge-join of two walks.

``compare(ours, theirs)`` takes the volume's walk (``ours``) and the replica target's walk
(``theirs``), both in `clusterrep.snapshot.order_key` order as `clusterrep.snapshot.walk` yields
them, root first, and yields `Action` objects that, applied one after another in the order given,
make the target identical in everything ``rsync -aHAX --numeric-ids`` keeps (what
`clusterrep.verify.compare_trees` checks). Neither input is ever held whole.

Actions (paths relative to the roots, ``""`` the root, surrogateescape as in `clusterrep.events`):

- `Remove(path, kind)`: unlink, or rmdir (a directory is empty by then: see the order below);
- `Create(entry)`: make ``entry.path`` (free by then) as ``entry.kind``: ``mkdir``; ``symlink`` to
  ``entry.target``; ``mknod`` of a fifo, socket or device ``entry.rdev``; or an empty regular file
  extended to ``entry.size`` with ``ftruncate`` (a hole). Its mode and owner are provisional
  (owner-only) until the `SetAttr` that always follows it (for a directory: after its subtree);
- `Content(entry, fresh)`: make the regular file's blocks equal to the volume's (see
  `blocks_to_send`; ``fresh``: the replica's file was just created, holds only a hole, so the sender
  sends every data block without asking for the replica's manifest). Always followed by a `SetAttr`,
  because writing changes the file's mtime;
- `Link(path, to)`: make ``path`` (free by then) a hard link to ``to``, which is complete (content
  and attributes done) by then;
- `SetAttr(attr, kind)`: set an `clusterrep.events.Attr`: the *full* mode, owner and mtime (so an
  action is idempotent and can be re-applied after a crash), plus the full set of extended
  attributes when they differ or the entry is new (``None``: leave them, they are equal). Full
  state rather than a delta costs 20 bytes and needs no read-modify-write on the replica; xattrs
  are sent only when they differ because they can be 64 KiB each. The applier
  (`confined.Target.apply_attr`) does, in order: ``lchown`` (it clears set-user-ID bits), the
  xattrs (set each listed, remove the others; an access ACL sets mode bits), ``chmod`` (not for
  a symlink), ``utime`` (``follow_symlinks=False``) last.

Order (why each action can be applied as it arrives):

1. Actions follow the walk order of the paths they concern, except those on directories, below.
2. A directory present only in the replica is removed depth-first: its contents' `Remove` come
   first (they follow it in the walk) and its own `Remove` when the merge leaves its subtree. The
   same when a directory must become another type: the `Create` of the new entry follows.
3. A directory's `SetAttr` (also the root's) comes when the merge leaves its subtree, after every
   action inside it, so the directory's mtime, which creating or removing a name in it changes,
   is set last, and a read-only mode never blocks its own contents. It is emitted if the
   directory is new, its attributes differ, or a name was created, linked or removed directly in
   it. Memory: one frame (an `Entry`) per level of the current path.
4. A regular file: `Create`, `Content`, `SetAttr`, in that order, mtime last.
5. Hard links. The first name of a volume inode with ``nlink > 1`` (its *leader*, in walk order) is
   created or updated like any file; each later name becomes a `Link` to the leader (after removing
   what the replica has there), unless the replica's entry already is the leader's inode. A replica
   inode shared by several names is updated in place through the first of its names only; any
   other name of it that must be a different inode is removed and recreated (whatever it held,
   so updating one name never changes another's content). Memory: one record per inode with
   ``nlink > 1`` on either side of which some but not all names have been passed (a path and
   three integers each); the worst case is an inode whose names lie at opposite ends of the tree,
   and inodes with names outside the tree (or whose names vanished) stay until the end.

Regular files on both sides are given a `Content` when their sizes or mtimes differ, or always with
``content=True`` (then the manifests decide; identical trees give no action only without it). A
symlink whose target differs, or a device whose number differs, is removed and created again.

Errors: `InvalidWalk` (a ``ValueError``) when an input is not in strict walk order or does not
start with its root directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from clusterrep.blocks import HOLE, InvalidManifest, Manifest, ManifestBuilder, block_count, diff_blocks
from clusterrep.errors import ClusterrepError
from clusterrep.events import Attr
from clusterrep.snapshot import Entry, Kind, order_key


class InvalidWalk(ClusterrepError, ValueError):
    """A walk that is not in strict ``order_key`` order, or does not start with its root directory."""

    exit_code = 3
    hint = "a structure snapshot arrived damaged or out of order; nothing was planned from it"


@dataclass(frozen=True, slots=True)
class Remove:
    path: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class Create:
    entry: Entry


@dataclass(frozen=True, slots=True)
class Content:
    entry: Entry
    fresh: bool


@dataclass(frozen=True, slots=True)
class Link:
    path: str
    to: str


@dataclass(frozen=True, slots=True)
class SetAttr:
    attr: Attr
    kind: Kind


Action = Remove | Create | Content | Link | SetAttr


def attrs_differ(a: Entry, b: Entry) -> bool:
    """Whether ``a`` and ``b`` (same kind) differ in mode (not for symlinks), owner, mtime or xattrs."""
    return ((a.kind is not Kind.SYMLINK and a.mode != b.mode) or a.uid != b.uid or a.gid != b.gid
            or a.mtime_ns != b.mtime_ns or a.xattrs != b.xattrs)


def attr_of(entry: Entry, *, xattrs: bool = True) -> Attr:
    """``entry``'s full `Attr`; its xattrs only if ``xattrs`` (else None: leave them)."""
    return Attr(entry.path, entry.mode, entry.uid, entry.gid, entry.mtime_ns,
                entry.xattrs if xattrs else None)


@dataclass(slots=True)
class _Frame:
    """A directory on the current path: kept (``keep``) or being removed (``keep is None``)."""

    key: tuple[bytes, ...]
    path: str
    keep: Entry | None
    theirs: Entry | None  # the replica's directory there (None: created by this plan)
    dirty: bool = False  # a name was created, linked or removed directly inside
    then: Entry | None = None  # a removed directory's replacement (a non-directory of the volume)


@dataclass(slots=True)
class _Group:
    """A volume inode with several names: its leader's path and the replica inode it kept."""

    path: str
    theirs: tuple[int, int] | None
    remaining: int


@dataclass(slots=True)
class _Shared:
    """A replica inode with several names: whether one of them was kept in place, names to come."""

    claimed: bool
    remaining: int


class _Planner:
    def __init__(self, content: bool) -> None:
        self.content = content
        self.out: list[Action] = []
        self.stack: list[_Frame] = []
        self.groups: dict[tuple[int, int], _Group] = {}
        self.shared: dict[tuple[int, int], _Shared] = {}

    def step(self, key: tuple[bytes, ...], a: Entry | None, b: Entry | None) -> list[Action]:
        while self.stack and not (len(key) > len(self.stack[-1].key)
                                  and key[:len(self.stack[-1].key)] == self.stack[-1].key):
            self._close(self.stack.pop())
        if a is None:
            assert b is not None
            self._only_theirs(key, b)
        elif b is None:
            self._only_ours(key, a)
        else:
            self._both(key, a, b)
        return self._take()

    def finish(self) -> list[Action]:
        while self.stack:
            self._close(self.stack.pop())
        return self._take()

    def _take(self) -> list[Action]:
        out, self.out = self.out, []
        return out

    def _dirty(self) -> None:
        if self.stack:
            self.stack[-1].dirty = True

    def _close(self, frame: _Frame) -> None:
        if frame.keep is None:
            assert frame.theirs is not None
            self.out.append(Remove(frame.path, Kind.DIR))
            if frame.then is not None:
                self._create(frame.then)
            return
        keep, theirs = frame.keep, frame.theirs
        if theirs is None:
            self.out.append(SetAttr(attr_of(keep), Kind.DIR))
        elif frame.dirty or attrs_differ(keep, theirs):
            self.out.append(SetAttr(attr_of(keep, xattrs=keep.xattrs != theirs.xattrs), Kind.DIR))

    def _only_theirs(self, key: tuple[bytes, ...], b: Entry) -> None:
        self._seen_theirs(b)
        self._dirty()
        if b.kind is Kind.DIR:
            self.stack.append(_Frame(key, b.path, None, b))
        else:
            self.out.append(Remove(b.path, b.kind))

    def _only_ours(self, key: tuple[bytes, ...], a: Entry) -> None:
        if a.kind is Kind.DIR:
            self._dirty()
            self.out.append(Create(a))
            self.stack.append(_Frame(key, a.path, a, None))
        else:
            self._create(a)

    def _both(self, key: tuple[bytes, ...], a: Entry, b: Entry) -> None:
        if a.kind is Kind.DIR and b.kind is Kind.DIR:
            self.stack.append(_Frame(key, a.path, a, b))
        elif b.kind is Kind.DIR:
            self._dirty()
            self.stack.append(_Frame(key, b.path, None, b, then=a))
        elif a.kind is Kind.DIR:
            self._seen_theirs(b)
            self.out.append(Remove(b.path, b.kind))
            self._only_ours(key, a)
        else:
            self._update(a, b)

    def _seen_theirs(self, b: Entry) -> _Shared | None:
        """Count one name of ``b``'s replica inode; its record if it has several names."""
        if b.nlink <= 1 or b.kind is Kind.DIR:
            return None
        shared = self.shared.get(b.inode)
        if shared is None:
            shared = self.shared[b.inode] = _Shared(False, b.nlink)
        shared.remaining -= 1
        if shared.remaining <= 0:
            del self.shared[b.inode]
        return shared

    def _later_name(self, a: Entry) -> _Group | None:
        """The group ``a`` is a later name of (counted as passed), or None if ``a`` leads or is alone."""
        group = self.groups.get(a.inode) if a.nlink > 1 else None
        if group is not None:
            group.remaining -= 1
            if group.remaining <= 0:
                del self.groups[a.inode]
        return group

    def _update(self, a: Entry, b: Entry) -> None:
        """Both sides hold a non-directory at the path."""
        shared = self._seen_theirs(b)
        group = self._later_name(a)
        if group is not None:
            if group.theirs is None or b.inode != group.theirs:
                self._dirty()
                self.out += [Remove(b.path, b.kind), Link(a.path, group.path)]
            return
        if (a.kind is not b.kind or a.target != b.target or a.rdev != b.rdev
                or (shared is not None and shared.claimed)):
            self.out.append(Remove(b.path, b.kind))
            self._create(a)
            return
        if shared is not None:
            shared.claimed = True
        if a.nlink > 1:
            self.groups[a.inode] = _Group(a.path, b.inode, a.nlink - 1)
        if a.kind is Kind.FILE and (self.content or a.size != b.size or a.mtime_ns != b.mtime_ns):
            self.out += [Content(a, False), SetAttr(attr_of(a, xattrs=a.xattrs != b.xattrs), a.kind)]
        elif attrs_differ(a, b):
            self.out.append(SetAttr(attr_of(a, xattrs=a.xattrs != b.xattrs), a.kind))

    def _create(self, a: Entry) -> None:
        """Make the volume's non-directory ``a`` at its path, which the replica holds free."""
        self._dirty()
        group = self._later_name(a)
        if group is not None:
            self.out.append(Link(a.path, group.path))
            return
        self.out.append(Create(a))
        if a.kind is Kind.FILE and a.size:
            self.out.append(Content(a, True))
        self.out.append(SetAttr(attr_of(a), a.kind))
        if a.nlink > 1:
            self.groups[a.inode] = _Group(a.path, None, a.nlink - 1)


def _ordered(entries: Iterable[Entry], side: str) -> Iterator[tuple[tuple[bytes, ...], Entry]]:
    last: tuple[bytes, ...] | None = None
    for entry in entries:
        key = order_key(entry.path)
        if last is None and (key != () or entry.kind is not Kind.DIR):
            raise InvalidWalk(f"{side}'s walk starts with {entry.path!r} ({entry.kind}),"
                              " not its root directory")
        if last is not None and key <= last:
            raise InvalidWalk(f"{side}'s walk is out of order at {entry.path!r}")
        last = key
        yield key, entry
    if last is None:
        raise InvalidWalk(f"{side}'s walk is empty: it has no root directory")


def compare(ours: Iterable[Entry], theirs: Iterable[Entry], *, content: bool = False) -> Iterator[Action]:
    """The actions that make the tree walked as ``theirs`` identical to ``ours`` (module docstring)."""
    planner = _Planner(content)
    a_it, b_it = _ordered(ours, "ours"), _ordered(theirs, "theirs")
    a, b = next(a_it, None), next(b_it, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            yield from planner.step(a[0], a[1], None)
            a = next(a_it, None)
        elif a is None or b[0] < a[0]:
            yield from planner.step(b[0], None, b[1])
            b = next(b_it, None)
        else:
            yield from planner.step(a[0], a[1], b[1])
            a, b = next(a_it, None), next(b_it, None)
    yield from planner.finish()


# ---------------------------------------------------------------------------------------------
# Block-level content: which blocks of one file to send.


class _TheirWindows:
    """The replica's windows of one file, consumed in order, re-cut to our windows' bounds."""

    def __init__(self, windows: Iterable[Manifest]) -> None:
        self._it = iter(windows)
        self._current: Manifest | None = next(self._it, None)
        if self._current is not None and self._current.first != 0:
            raise InvalidManifest(f"the replica's windows start at block {self._current.first}, not 0")
        self.total = block_count(self._current.size) if self._current is not None else 0

    def _advance(self) -> None:
        assert self._current is not None
        nxt = next(self._it, None)
        if nxt is not None and (nxt.first != self._current.end or nxt.size != self._current.size):
            raise InvalidManifest(f"the replica's windows jump from block {self._current.end} to {nxt.first}"
                                  f" or change size")
        self._current = nxt

    def cover(self, first: int, end: int) -> Manifest | None:
        """Their blocks ``first .. min(end, total) - 1`` as one window; None if their file ends before."""
        if first >= self.total:
            return None
        while self._current is not None and self._current.end <= first:
            self._advance()
        stop = min(end, self.total)
        current = self._current
        if current is None:
            raise InvalidManifest(f"the replica's windows end before block {first} of {self.total}")
        if current.first == first and current.end >= stop:
            return current
        builder = ManifestBuilder(current.size, first)
        while builder.count < stop - first:
            if self._current is None:
                raise InvalidManifest(f"the replica's windows end before block {stop} of {self.total}")
            for index, block in self._current.items():
                if first + builder.count <= index < stop:
                    if block == HOLE:
                        builder.add_holes(1)
                    else:
                        builder.add_digests([block])
            if self._current.end <= stop:
                self._advance()
            else:
                break
        return builder.finish()


def blocks_to_send(ours: Iterable[Manifest], theirs: Iterable[Manifest] | None, *,
                   allocation: bool = True) -> Iterator[int]:
    """Indexes of the volume file's blocks the replica lacks, in increasing order.

    ``ours``: the volume file's windows from block 0 (``blockread.Hasher``); ``theirs``: the
    replica file's windows from block 0 (``Hasher``, or ``hashcache.CachedFile.windows``), or None
    for a ``fresh`` file (a hole of the right size: every data block is listed). Both are consumed
    window by window, in step, so memory is one window of each (two of theirs when their windows
    are cut at other blocks than ours and must be re-cut). The receiver first sets its file's size
    to ours with ``ftruncate``, then for each index writes our block, or punches a hole where ours
    is ``HOLE`` (``diff_blocks``'s contract). ``allocation=False`` counts a hole and zeros as equal.
    ``InvalidManifest`` when either side's windows are not contiguous from block 0 of one size.
    """
    their = _TheirWindows(theirs if theirs is not None else ())
    at, size = 0, None
    for window in ours:
        if window.first != at or (size is not None and window.size != size):
            raise InvalidManifest(f"our windows jump from block {at} to {window.first} or change size")
        at, size = window.end, window.size
        other = their.cover(window.first, window.end)
        if other is None:
            yield from (index for index, block in window.items() if block != HOLE)
        else:
            yield from diff_blocks(window, other, allocation=allocation)
