"""Applying a sync plan on the replica: `clusterrep.treediff` actions made real in the target.

``SyncApplier(target).apply(action, payload_source)`` carries out one `clusterrep.treediff.Action`
(``Remove``, ``Create``, ``Content``, ``Link``, ``SetAttr``) in the order ``treediff.compare``
yields them, entirely through `clusterrep.confined.Target`: every path is checked first
(`clusterrep.events.check_path`; ``check_any_path`` for a ``SetAttr``, whose path may be ``""``,
the root) and then resolved one component at a time from directory descriptors with
``O_NOFOLLOW``, so a hostile or buggy plan can never touch anything outside the target (a symlink
or file standing where a directory must be raises `TargetEscape`; a ``..`` raises `UnsafePath`).

What each action does:

- ``Remove(path, kind)``: unlinks the non-directory at ``path``, or removes the (empty) directory.
  Every Remove is logged at INFO with its path (``--adopt-target`` promises to log every file
  the sync deletes), as is every name a Create or Link replaces.
- ``Create(entry)``: ``mkdir``; ``symlink``; ``mknod`` (fifo, socket, device ``entry.rdev``); or an
  empty regular file extended to ``entry.size`` with ``ftruncate`` (one hole). Mode ``0o700`` /
  ``0o600`` and the replica's own owner are provisional until the ``SetAttr`` that follows.
- ``Content(entry, fresh)``: ``payload_source`` is an iterable of `Block` (``index``, ``codec`` and
  ``payload`` as `clusterrep.blocks.compress` made them, optionally the block's BLAKE3
  ``digest``) and `Hole` (a block to punch), in strictly increasing block order. The file's size
  is set first (``ftruncate`` to ``entry.size``: a longer file is cut, a shorter one extended by a
  hole), then each block is decompressed (`clusterrep.blocks.decompress`, bounded by the block's
  length ``block_length(entry.size, index)``), checked against its digest when one is given,
  and written; a hole is punched with ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` (zeros are
  written instead where the target's file system refuses, `Target.fallocate`). A block that does
  not decode to its length or does not match its digest raises `CorruptBlock` before anything of
  that block is written. Memory: one block at a time.
- ``Link(path, to)``: gives the inode at ``to`` the further name ``path`` (never following a
  symlink: a hard link to a symlink links the symlink).
- ``SetAttr(attr, kind)``: checks that ``attr.path`` holds a ``kind``, then sets its full state
  (`Target.apply_attr`: owner, the exact set of extended attributes when listed, mode except for
  symlinks, modification time last).

Replay (a resumed sync re-applies actions after a crash): applying an action again, or a whole
plan again on top of any prefix of it, gives the same tree. Per action:

- ``Remove`` of a missing entry (or one beneath a missing directory, a symlink or a file: there
  is nothing in the target there, and nothing is followed) is accepted; a non-directory of
  another kind than announced is removed all the same (a later ``Create`` of the plan put it
  there); a *directory* where a non-directory was to be removed is left, since only a later
  ``Create`` of the same plan can have made it (that ``Create`` accepts it again);
- ``Create`` of an existing entry of the same kind is accepted: a directory is kept, a regular
  file is emptied and set to its size (``O_TRUNC``, then ``ftruncate``; one that has other names
  is replaced by a new inode instead, so no other name's content changes), a symlink or special
  file is made again (its target or device may differ). An existing entry of another kind means
  the target diverged: `ApplyError`;
- ``Content`` sets the size and writes the same blocks at the same places: the last write of a
  block decides it, and a ``fresh`` file's ``Create`` is replayed before it;
- ``Link`` where the name already is that inode is accepted; another non-directory there is
  replaced (it was a replayed ``Create``'s new inode, or the name the plan removed before);
- ``SetAttr`` sets the full state, whatever was there.

A plan interrupted inside a ``Content`` (a corrupt block, a broken stream) leaves the file with a
new modification time, so the next comparison sends its content again.

Durability: `SyncApplier.checkpoint` syncs the target's file system (``syncfs``); everything
applied before it survives a crash, so the caller may record its progress after it returns.

Errors: `UnsafePath` and `InvalidEvent` (a path or field the plan must never hold),
`InvalidSyncAction` (a malformed action or block list), `CorruptBlock` (a damaged block),
`TargetEscape` (the target holds a symlink or file where a directory must be), `ApplyError`
(the target refused or holds something the plan did not expect; its ``errno`` gives the reason).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import NamedTuple

from ..blocks import BLOCK_SIZE, DIGEST_SIZE, CorruptBlock, block_count, block_length, decompress, hash_block
from ..confined import Target
from ..errors import ApplyError, ClusterrepError, TargetEscape
from ..events import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Attr, check_any_path, check_path
from ..snapshot import FORMAT, Entry, Kind
from ..treediff import Action, Content, Create, Link, Remove, SetAttr

log = logging.getLogger("clusterrep.replica.sync")

MAX_FILE_SIZE = (1 << 63) - 1
MAX_SYMLINK_BYTES = 4095  # PATH_MAX less the terminating NUL
MAX_RDEV = (1 << 64) - 1
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class InvalidSyncAction(ClusterrepError, ValueError):
    """A sync action or block list that is malformed: a wrong type or kind, a size or block index
    out of range, blocks out of order, a Content without blocks or blocks for another action."""

    exit_code = 3
    hint = "the coordinator sent a malformed sync step; nothing of that step was applied"


class Block(NamedTuple):
    """Block ``index`` of a file: ``payload`` encoded with ``codec`` (`clusterrep.blocks.Codec`),
    and its BLAKE3 ``digest`` of the decoded bytes, checked before writing when given."""

    index: int
    codec: int
    payload: bytes
    digest: bytes | None = None


class Hole(NamedTuple):
    """Block ``index`` of a file is a hole: punch it (``PUNCH_HOLE | KEEP_SIZE``)."""

    index: int


@dataclass(slots=True)
class SyncStats:
    """What a `SyncApplier` did so far (counts; bytes are decoded file bytes unless named wire)."""

    removed: int = 0  # names removed (Remove actions that found something)
    absent: int = 0  # Remove actions that found nothing to remove (replays)
    replaced: int = 0  # names a Create or Link replaced
    created: int = 0
    linked: int = 0
    attrs: int = 0
    files: int = 0  # Content actions
    blocks: int = 0  # data blocks written
    bytes_written: int = 0
    wire_bytes: int = 0  # payload bytes received for them
    holes: int = 0  # blocks punched
    emulated: int = 0  # punches the target's file system refused, done by writing zeros

    def summary(self) -> str:
        return (f"sync applied: {self.removed} removed ({self.absent} already absent), {self.created}"
                f" created, {self.replaced} replaced, {self.linked} linked, {self.attrs} attributes set,"
                f" content of {self.files} files: {self.blocks} blocks ({self.bytes_written} bytes,"
                f" {self.wire_bytes} on the wire), {self.holes} holes punched"
                + (f" ({self.emulated} written as zeros)" if self.emulated else ""))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def describe(action: Action) -> str:
    """One line naming ``action`` for logs and errors."""
    if isinstance(action, Remove):
        return f"remove {action.kind} {action.path!r}"
    if isinstance(action, Create):
        return f"create {action.entry.kind} {action.entry.path!r}"
    if isinstance(action, Content):
        return f"content of {action.entry.path!r} ({action.entry.size} bytes)"
    if isinstance(action, Link):
        return f"link {action.path!r} to {action.to!r}"
    if isinstance(action, SetAttr):
        return f"set attributes of {action.kind} {action.attr.path!r}"
    return f"unknown action {type(action).__name__}"


_KIND_OF = {fmt: kind for kind, fmt in FORMAT.items()}


def _kind_of(st: os.stat_result) -> Kind | None:
    return _KIND_OF.get(stat.S_IFMT(st.st_mode))


def _check_kind(kind: object, what: str) -> Kind:
    if not isinstance(kind, Kind):
        raise InvalidSyncAction(f"{what}: {kind!r} is not a kind of entry")
    return kind


def _check_int(value: object, what: str, high: int) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise InvalidSyncAction(f"{what} must be an integer in 0..{high}, got {value!r}")
    return value


def _check_entry(entry: object, what: str) -> Entry:
    if not isinstance(entry, Entry):
        raise InvalidSyncAction(f"{what} carries {type(entry).__name__}, not an Entry")
    check_path(entry.path, f"{what} path")
    kind = _check_kind(entry.kind, f"{what} {entry.path!r}")
    _check_int(entry.size, f"{what} {entry.path!r} size", MAX_FILE_SIZE if kind is Kind.FILE else 0)
    if kind in (Kind.CHAR, Kind.BLOCK):
        _check_int(entry.rdev, f"{what} {entry.path!r} rdev", MAX_RDEV)
    if kind is Kind.SYMLINK:
        target = entry.target
        if not isinstance(target, str):
            raise InvalidSyncAction(f"{what} {entry.path!r}: a symlink without a target")
        try:
            raw = os.fsencode(target)
        except UnicodeEncodeError:
            raise InvalidSyncAction(f"{what} {entry.path!r}: symlink target {target!r} cannot be"
                                    " encoded as bytes") from None
        if not raw or b"\0" in raw or len(raw) > MAX_SYMLINK_BYTES:
            raise InvalidSyncAction(f"{what} {entry.path!r}: a symlink target must be 1.."
                                    f"{MAX_SYMLINK_BYTES} bytes without NUL")
    return entry


class SyncApplier:
    """Applies a sync plan's actions to ``target`` (see the module docstring for each action,
    replay and errors). The caller owns ``target`` (and closes it); ``stats`` counts what was done.
    """

    def __init__(self, target: Target, *, logger: logging.Logger | None = None,
                 before_removal: Callable[[str], None] | None = None) -> None:
        self.target = target
        self.log = logger if logger is not None else log
        self.stats = SyncStats()
        # called with a path just before its name is removed from the target (the history keeps
        # the inode of a file losing its last name: `clusterrep.history.recorder`)
        self.before_removal = before_removal

    # -- the entry point -----------------------------------------------------------------------

    def apply(self, action: Action, payload_source: Iterable[Block | Hole] | None = None) -> None:
        """Carry out ``action``; ``payload_source`` (only, and always, for a
        ``Content``) its blocks to write or punch."""
        if isinstance(action, Content):
            if payload_source is None:
                raise InvalidSyncAction(f"{describe(action)}: no blocks given")
        elif payload_source is not None:
            raise InvalidSyncAction(f"{describe(action)}: only a Content carries blocks")
        try:
            if isinstance(action, Remove):
                self._remove(check_path(action.path, "Remove path"), _check_kind(action.kind, "Remove"))
            elif isinstance(action, Create):
                self._create(_check_entry(action.entry, "Create"))
            elif isinstance(action, Content):
                entry = _check_entry(action.entry, "Content")
                if entry.kind is not Kind.FILE:
                    raise InvalidSyncAction(f"{describe(action)}: content of a {entry.kind}")
                assert payload_source is not None
                self._content(entry, payload_source)
            elif isinstance(action, Link):
                self._link(check_path(action.path, "Link path"), check_path(action.to, "Link to"))
            elif isinstance(action, SetAttr):
                if not isinstance(action.attr, Attr):
                    raise InvalidSyncAction(f"SetAttr carries {type(action.attr).__name__}, not an Attr")
                check_any_path(action.attr.path, "SetAttr path")
                action.attr.check("SetAttr")  # mode, owner, time and xattrs in range (InvalidEvent)
                self._setattr(action)
            else:
                raise InvalidSyncAction(f"{type(action).__name__} is not a sync action")
        except OSError as exc:
            raise ApplyError(f"{describe(action)} failed in the target: {exc}",
                             errno=exc.errno or errno.EIO) from None

    def checkpoint(self) -> None:
        """Make everything applied so far durable (``syncfs`` of the target's file system)."""
        self.target.sync()

    def log_summary(self) -> None:
        self.log.info("%s", self.stats.summary())

    # -- lookups -------------------------------------------------------------------------------

    def _lookup(self, path: str) -> os.stat_result | None:
        """``lstat`` of ``path`` in the target, None if it is not there (its parents must be)."""
        try:
            return self.target.lstat(path)
        except FileNotFoundError:
            return None

    # -- the actions ---------------------------------------------------------------------------

    def _remove(self, path: str, kind: Kind) -> None:
        try:
            st = self.target.lstat(path)
        except FileNotFoundError:
            st = None
        except TargetEscape:
            self.stats.absent += 1
            self.log.info("sync: nothing to remove at %r (%s): a symlink or file stands where a "
                          "directory above it must be, and is not followed", path, kind)
            return
        except ApplyError as exc:
            if exc.errno != errno.ENOENT:
                raise
            st = None
        if st is None:
            self.stats.absent += 1
            self.log.info("sync: %s %r to remove is already absent", kind, path)
            return
        found = _kind_of(st)
        if found is Kind.DIR:
            if kind is not Kind.DIR:
                self.stats.absent += 1
                self.log.info("sync: %s %r to remove is a directory now (made by this plan before a "
                              "restart); left for the plan's Create", kind, path)
                return
            self.log.info("sync removes directory %r", path)
            if self.before_removal is not None:
                self.before_removal(path)
            self.target.rmdir(path, missing_ok=False)
        else:
            if found is not kind:
                self.log.info("sync removes %s %r (announced as %s: made by this plan before a restart)",
                              found, path, kind)
            else:
                self.log.info("sync removes %s %r", kind, path)
            if self.before_removal is not None:
                self.before_removal(path)
            self.target.unlink(path, missing_ok=False)
        self.stats.removed += 1

    def _replace(self, path: str, found: Kind | None, why: str) -> None:
        self.log.info("sync replaces %s %r (%s)", found, path, why)
        if self.before_removal is not None and found is not None:
            self.before_removal(path)
        self.target.unlink(path, missing_ok=True)
        self.stats.replaced += 1

    def _create(self, entry: Entry) -> None:
        t, path, kind = self.target, entry.path, entry.kind
        st = self._lookup(path)
        found = None if st is None else _kind_of(st)
        if st is not None and found is not kind:
            raise ApplyError(f"cannot create {kind} {path!r}: a {found} stands there in the target",
                             hint="the target changed during the sync; run the sync again",
                             errno=errno.EEXIST)
        if kind is Kind.DIR:
            t.mkdir(path, 0o700, exist_ok=True)
        elif kind is Kind.FILE:
            if st is not None and st.st_nlink > 1:
                self._replace(path, found, "it has other names, which keep their content")
                st = None
            t.create(path, 0o600, exist_ok=st is not None)
            if entry.size:
                t.truncate(path, entry.size)
        else:
            if st is not None:
                self._replace(path, found, "made again, as the plan says")
            if kind is Kind.SYMLINK:
                assert entry.target is not None
                t.symlink(path, entry.target, replace=False)
            else:
                t.mknod(path, FORMAT[kind] | 0o600, entry.rdev, replace=False)
        self.stats.created += 1

    def _content(self, entry: Entry, blocks: Iterable[Block | Hole]) -> None:
        self.apply_blocks(entry.path, entry.size, blocks)

    def apply_blocks(self, path: str, size: int, blocks: Iterable[Block | Hole]) -> None:
        """Set regular file ``path``'s size to ``size``, then write or punch ``blocks`` (strictly
        increasing indexes below the block count), each checked as for a ``Content``."""
        check_path(path, "blocks path")
        t = self.target
        count = block_count(size)
        t.truncate(path, size)  # a regular file, opened without following a symlink, or refused
        self.stats.files += 1
        last = -1
        for item in blocks:
            if not isinstance(item, Block | Hole):
                raise InvalidSyncAction(f"content of {path!r}: {type(item).__name__} is not a Block or Hole")
            index = item.index
            if type(index) is not int or not last < index < count:
                raise InvalidSyncAction(f"content of {path!r}: block {index!r} after block {last}, in a"
                                        f" file of {count} blocks (indexes must increase, below the count)")
            last = index
            offset, length = index * BLOCK_SIZE, block_length(size, index)
            if isinstance(item, Hole):
                if not t.fallocate(path, PUNCH, offset, length):
                    if not self.stats.emulated:
                        self.log.warning("the target's file system cannot punch holes: they are written"
                                         " as zeros (the replica may use more space than the volume)")
                    self.stats.emulated += 1
                self.stats.holes += 1
                continue
            if not isinstance(item.payload, bytes | bytearray | memoryview):
                raise InvalidSyncAction(f"content of {path!r}: block {index}'s payload is not bytes")
            try:
                data = decompress(item.codec, bytes(item.payload), length)
            except CorruptBlock as exc:
                raise CorruptBlock(f"block {index} of {path!r}: {exc.args[0]}; nothing of it written"
                                   ) from None
            if item.digest is not None:
                if type(item.digest) is not bytes or len(item.digest) != DIGEST_SIZE:
                    raise InvalidSyncAction(f"content of {path!r}: block {index}'s digest is not"
                                            f" {DIGEST_SIZE} bytes")
                if hash_block(data) != item.digest:
                    raise CorruptBlock(f"block {index} of {path!r} does not match its BLAKE3 digest;"
                                       " nothing of it written")
            t.write(path, offset, data)
            self.stats.blocks += 1
            self.stats.bytes_written += length
            self.stats.wire_bytes += len(item.payload)

    def _link(self, path: str, to: str) -> None:
        t = self.target
        source = self._lookup(to)
        if source is None:
            raise ApplyError(f"cannot link {path!r} to {to!r}: {to!r} is missing in the target",
                             hint="the plan links a later name to its group's first, which it made"
                                  " before; the target changed during the sync", errno=errno.ENOENT)
        st = self._lookup(path)
        if st is not None:
            if (st.st_dev, st.st_ino) == (source.st_dev, source.st_ino):
                self.stats.linked += 1
                return
            found = _kind_of(st)
            if found is Kind.DIR:
                raise ApplyError(f"cannot link {path!r}: a directory stands there in the target",
                                 hint="the target changed during the sync; run the sync again",
                                 errno=errno.EISDIR)
            self._replace(path, found, f"linked to {to!r} instead")
        t.link(to, path, replace=False)
        self.stats.linked += 1

    def _setattr(self, action: SetAttr) -> None:
        attr, kind = action.attr, _check_kind(action.kind, "SetAttr")
        st = os.fstat(self.target.root_fd) if attr.path == "" else self._lookup(attr.path)
        if st is None:
            raise ApplyError(f"cannot set attributes of {attr.path!r}: missing in the target",
                             errno=errno.ENOENT)
        found = _kind_of(st)
        if found is not kind:
            raise ApplyError(f"cannot set attributes of {kind} {attr.path!r}: a {found} stands there"
                             " in the target", hint="the target changed during the sync; run the sync"
                             " again", errno=errno.EINVAL)
        self.target.apply_attr(attr)
        self.stats.attrs += 1


__all__ = ["Block", "CorruptBlock", "Hole", "InvalidSyncAction", "SyncApplier", "SyncStats", "describe"]
