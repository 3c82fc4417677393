"""The event model: what nodes and the coordinator record, and its binary encoding.

Two classes of events exist:

* **Data events** (`Write`, `Fallocate`, `Stamp`, `Tick`) are recorded by a node. Each carries
  ``after``: the highest coordinator sequence number (``gseq``) the node knew when it recorded
  the event. That stamp, not any clock, places the event on the coordinator's timeline.
* **Metadata events** (`Create`, `Open`, `Close`, `Mkdir`, `Rmdir`, `Unlink`, `Rename`,
  `Exchange`, `Truncate`, `SetAttr`, `Symlink`, `Link`, `Mknod`, `SetXattr`, `RemoveXattr`,
  `Acquire`, `Join`, `Leave`, `Lock`) are executed by the coordinator,
  which numbers them with ``gseq``. The coordinator records one copy; the node that asked
  (``origin``) records another. Both copies carry the same ``op_id`` and ``gseq``: matching them
  is a *time mark*.

Every event carries its ``source`` (who recorded it), a gap-free per-source ``seq`` starting at
1, and ``wall``: the source's wall clock in nanoseconds. ``wall`` is untrusted and only shown to
people; nothing orders by it.

Metadata events that change the volume also carry ``attrs``: what the coordinator read from the
volume right after executing them (`Attr`: mode, owner, modification time, and for a new inode
its extended attributes) for each inode they touched, parent directories included. The replica
sets exactly that, so side effects of the volume's file system (a parent's time, a
set-group-ID directory's group, an inherited ACL) arrive as they happened instead of being
re-derived.

Paths are ``str`` relative to the volume root, normalised, never absolute, never containing
``.``/``..`` components or NUL; where an event may name the volume root itself (``SetAttr``,
``SetXattr``, ``RemoveXattr``, an `Attr`), the root is ``""``. Names that are not UTF-8 are
carried with ``surrogateescape`` (as ``os.fsdecode`` does) and encoded as raw bytes on the wire.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack

from .errors import DecodeError, InvalidEvent, UnsafePath

WIRE_VERSION = 1
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_WRITE_BYTES = 8 * 1024 * 1024
MAX_OFFSET = (1 << 63) - 1
MAX_SEQ = (1 << 63) - 1
MAX_OP_ID = 128
MAX_TARGET_BYTES = 4095  # what Linux stores in a symlink
MAX_XATTR_NAME = 255  # XATTR_NAME_MAX
MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX
MAX_XATTRS = 128  # extended attributes one `Attr` may list
MAX_ATTRS = 8  # inodes one event may describe
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
FALLOC_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
_OP_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_OP_ID}}}\Z")
MAX_ENCODED = MAX_WRITE_BYTES + 64 * 1024
_SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


_GOOD_PATHS: dict[str, None] = {}  # paths already found safe (they repeat: a VM's image)


def check_path(path: object, what: str = "path") -> str:
    """Return ``path`` if it is a safe, normalised relative path; raise `UnsafePath` if not."""
    if type(path) is str and path in _GOOD_PATHS:
        return path
    _check_path(path, what)
    if len(_GOOD_PATHS) >= 4096:
        _GOOD_PATHS.clear()
    _GOOD_PATHS[path] = None  # type: ignore[index]
    return path  # type: ignore[return-value]


def _check_path(path: object, what: str) -> None:
    if not isinstance(path, str):
        raise UnsafePath(f"{what} must be a string, got {type(path).__name__}")
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise UnsafePath(f"{what} {path!r} cannot be encoded as bytes: {exc.reason}") from None
    if not raw:
        raise UnsafePath(f"{what} is empty")
    if os.fsdecode(raw) != path:
        raise UnsafePath(f"{what} {path!r} is not in canonical form: escaped bytes that form "
                         "valid UTF-8 must be given as the characters they encode")
    if len(raw) > MAX_PATH_BYTES:
        raise UnsafePath(f"{what} is {len(raw)} bytes long, more than {MAX_PATH_BYTES}")
    if b"\0" in raw:
        raise UnsafePath(f"{what} {path!r} contains a NUL byte")
    if raw.startswith(b"/"):
        raise UnsafePath(f"{what} {path!r} is absolute")
    for part in raw.split(b"/"):
        if part in (b"", b".", b".."):
            shown = "an empty" if not part else repr(part.decode())
            raise UnsafePath(f"{what} {path!r} has {shown} component; it must be normalised")
        if len(part) > MAX_NAME_BYTES:
            raise UnsafePath(f"{what} {path!r} has a component longer than {MAX_NAME_BYTES} bytes")


def _check_int(value: object, name: str, low: int, high: int) -> None:
    if type(value) is not int:
        raise InvalidEvent(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidEvent(f"{name}={value} is outside {low}..{high}")


def _check_source(value: object, name: str) -> None:
    if not isinstance(value, str) or not _SOURCE_RE.match(value):
        raise InvalidEvent(
            f"{name} {value!r} is not a valid source name "
            "(1-64 characters: letters, digits, '.', '_', '-'; not starting with a symbol)"
        )


# Field kinds used by validation and encoding.
PATH, INT, OPT_INT, MODE = "path", "int", "opt_int", "mode"
OPT_MODE, DATA, TARGET = "opt_mode", "data", "target"
ANY_PATH = "any_path"  # a path, or "" for the volume root
XNAME, XVALUE = "xname", "xvalue"  # an extended attribute's name (str) and value (bytes)
NODE_MODE = "node_mode"  # file type and permission bits of a special file (FIFO, socket, device)
ATTRS = "attrs"  # a tuple of `Attr`
TIME, OPT_TIME = "time", "opt_time"
OPT_ID = "opt_id"  # a uid or gid, or None  # nanoseconds since the epoch, any time a time_t holds
NAMES = "names"  # a tuple of source names (node names)
FLAG = "flag"  # 0 or 1
MAX_NAMES = 256  # names one event may list
MAX_TIME_NS = (1 << 63) * 10**9
_I64 = 1 << 63


def _check_time(value: object, label: str) -> None:
    if type(value) is not int or not -MAX_TIME_NS <= value < MAX_TIME_NS:
        raise InvalidEvent(f"{label} must be an integer time in nanoseconds, got {value!r}")


def time_to_wire(ns: int | None) -> Any:
    """A time in nanoseconds as msgpack carries it: an integer while it fits 64 bits (until
    2262), else ``[seconds, nanoseconds]`` (ext4 holds times until 2446)."""
    if ns is None or -_I64 <= ns < _I64:
        return ns
    return [ns // 10**9, ns % 10**9]


def time_from_wire(value: Any, label: str) -> Any:
    if isinstance(value, list):
        if (len(value) != 2 or type(value[0]) is not int or type(value[1]) is not int
                or not 0 <= value[1] < 10**9):
            raise DecodeError(f"{label} must be nanoseconds or [seconds, nanoseconds]")
        return value[0] * 10**9 + value[1]
    return value
_ID_MAX = (1 << 32) - 2  # uid/gid (-1 means "unchanged" to chown, never an owner)


def _check_text(value: object, label: str, max_bytes: int) -> bytes:
    """A name carried as ``str`` (surrogateescape) and sent as bytes: 1..max_bytes, no NUL."""
    if not isinstance(value, str):
        raise InvalidEvent(f"{label} must be a string, got {type(value).__name__}")
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError as exc:
        raise InvalidEvent(f"{label} {value!r} cannot be encoded as bytes: {exc.reason}") from None
    if not raw or b"\0" in raw or len(raw) > max_bytes:
        raise InvalidEvent(f"{label} must be 1..{max_bytes} bytes without NUL")
    if os.fsdecode(raw) != value:
        raise InvalidEvent(f"{label} {value!r} is not in canonical form")
    return raw


def repath(paths: dict[Any, str], src: str, dst: str, *, exchange: bool = False) -> None:
    """Follow a rename of ``src`` to ``dst`` (with ``exchange``, a swap of the two) in a map of
    paths, in place: a path at or below a moved name moves with it."""
    moves = ((src, dst), (dst, src)) if exchange else ((src, dst),)
    for key, p in list(paths.items()):
        for a, b in moves:
            if p == a or p.startswith(a + "/"):
                paths[key] = b + p[len(a):]
                break


def check_any_path(path: object, what: str) -> str:
    """A path (`check_path`) or ``""``, the volume root."""
    if path == "":
        return ""
    return check_path(path, what)


@dataclass(frozen=True, slots=True)
class Attr:
    """An inode's metadata as the coordinator read it from the volume (see the module doc).

    ``path``: where (``""`` is the root); ``mode``: permission bits (0..0o7777); ``uid``,
    ``gid``: numeric owner; ``mtime_ns``: modification time, None when it is not the
    coordinator's to say (a regular file whose write token a node holds: that node records the
    time its writes left, as a `Stamp`); ``xattrs``: every extended attribute, as
    ``((name, value), ...)`` sorted by name, or None to leave them as they are.
    """

    path: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] | None = None

    def check(self, label: str) -> None:
        check_any_path(self.path, f"{label}.path")
        _check_int(self.mode, f"{label}.mode", 0, 0o7777)
        _check_int(self.uid, f"{label}.uid", 0, _ID_MAX)
        _check_int(self.gid, f"{label}.gid", 0, _ID_MAX)
        if self.mtime_ns is not None:
            _check_time(self.mtime_ns, f"{label}.mtime_ns")
        if self.xattrs is not None:
            if len(self.xattrs) > MAX_XATTRS:
                raise InvalidEvent(f"{label} lists more than {MAX_XATTRS} extended attributes")
            for name, value in self.xattrs:
                _check_text(name, f"{label} xattr name", MAX_XATTR_NAME)
                if type(value) is not bytes or len(value) > MAX_XATTR_VALUE:
                    raise InvalidEvent(f"{label} xattr {name!r} value must be at most "
                                       f"{MAX_XATTR_VALUE} bytes")

    def to_wire(self) -> list[Any]:
        xattrs = None if self.xattrs is None else [[os.fsencode(n), v] for n, v in self.xattrs]
        return [os.fsencode(self.path), self.mode, self.uid, self.gid, time_to_wire(self.mtime_ns),
                xattrs]

    @classmethod
    def from_wire(cls, item: Any) -> Attr:
        if not isinstance(item, (list, tuple)) or len(item) != 6:
            raise DecodeError("an attrs entry must be an array of 6 items")
        path, mode, uid, gid, mtime_ns, xattrs = item
        if not isinstance(path, bytes) or b"\0" in path:
            raise DecodeError("an attrs entry's path must be bytes without NUL")
        if xattrs is not None:
            if not isinstance(xattrs, list) or not all(
                    isinstance(x, list) and len(x) == 2 and isinstance(x[0], bytes) for x in xattrs):
                raise DecodeError("an attrs entry's xattrs must be [[name, value], ...]")
            xattrs = tuple((os.fsdecode(n), v) for n, v in xattrs)
        return cls(os.fsdecode(path), mode, uid, gid, time_from_wire(mtime_ns, "attrs mtime_ns"),
                   xattrs)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of all events: who recorded it, its place in that source's stream, its wall clock."""

    source: str
    seq: int
    wall: int = 0

    KIND: ClassVar[int] = 0
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __post_init__(self) -> None:
        _check_source(self.source, "source")
        _check_int(self.seq, "seq", 1, MAX_SEQ)
        _check_int(self.wall, "wall", -(1 << 63), (1 << 63) - 1)
        for name, kind in self.SPEC:
            _check_field(self, name, kind)

    @property
    def key(self) -> tuple[str, int]:
        """Identity of this copy: (source, seq)."""
        return (self.source, self.seq)


def _check_field(ev: Event, name: str, kind: str) -> None:
    value = getattr(ev, name)
    label = f"{type(ev).__name__}.{name}"
    if kind == PATH:
        check_path(value, label)
    elif kind == INT:
        _check_int(value, label, 0, MAX_OFFSET)
    elif kind == OPT_INT:
        if value is not None:
            _check_int(value, label, -(1 << 63), (1 << 63) - 1)
    elif kind == MODE:
        _check_int(value, label, 0, 0o7777)
    elif kind == OPT_MODE:
        if value is not None:
            _check_int(value, label, 0, 0o7777)
    elif kind == DATA:
        if type(value) is not bytes:
            raise InvalidEvent(f"{label} must be bytes, got {type(value).__name__}")
        if len(value) > MAX_WRITE_BYTES:
            raise InvalidEvent(f"{label} is {len(value)} bytes, more than {MAX_WRITE_BYTES}")
    elif kind == TARGET:
        _check_text(value, label, MAX_TARGET_BYTES)
    elif kind == ANY_PATH:
        check_any_path(value, label)
    elif kind == TIME:
        _check_time(value, label)
    elif kind == OPT_ID:
        if value is not None:
            _check_int(value, label, 0, _ID_MAX)
    elif kind == OPT_TIME:
        if value is not None:
            _check_time(value, label)
    elif kind == XNAME:
        _check_text(value, label, MAX_XATTR_NAME)
    elif kind == XVALUE:
        if type(value) is not bytes or len(value) > MAX_XATTR_VALUE:
            raise InvalidEvent(f"{label} must be at most {MAX_XATTR_VALUE} bytes")
    elif kind == NODE_MODE:
        _check_int(value, label, 0, 0o177777)
        if stat.S_IFMT(value) not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise InvalidEvent(f"{label} {value:o} is not a FIFO, socket or device")
    elif kind == NAMES:
        if isinstance(value, list):
            value = tuple(value)
            object.__setattr__(ev, name, value)
        if not isinstance(value, tuple) or len(value) > MAX_NAMES:
            raise InvalidEvent(f"{label} must be a list of at most {MAX_NAMES} names")
        for item in value:
            _check_source(item, f"{label} entry")
    elif kind == FLAG:
        if type(value) is not int or value not in (0, 1):
            raise InvalidEvent(f"{label} must be 0 or 1, got {value!r}")
    elif kind == ATTRS:
        if not isinstance(value, tuple):
            if not isinstance(value, list):
                raise InvalidEvent(f"{label} must be a sequence of Attr")
            value = tuple(value)
            object.__setattr__(ev, name, value)
        if len(value) > MAX_ATTRS:
            raise InvalidEvent(f"{label} describes more than {MAX_ATTRS} inodes")
        for i, item in enumerate(value):
            if not isinstance(item, Attr):
                raise InvalidEvent(f"{label}[{i}] must be an Attr")
            item.check(f"{label}[{i}]")
    else:  # pragma: no cover - programming error
        raise AssertionError(kind)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataEvent(Event):
    """An event a node records on its own: placed after metadata event ``after`` (a gseq)."""

    after: int

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _check_int(self.after, "after", 0, MAX_SEQ)


@dataclass(frozen=True, slots=True, kw_only=True)
class Write(DataEvent):
    """Bytes written at an offset of a file (direct I/O)."""

    path: str
    offset: int
    data: bytes

    KIND: ClassVar[int] = 1
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("offset", INT), ("data", DATA))

    def __post_init__(self) -> None:
        DataEvent.__post_init__(self)
        if self.offset + len(self.data) > MAX_OFFSET:
            raise InvalidEvent(f"Write.offset+len = {self.offset + len(self.data)} is too large")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fallocate(DataEvent):
    """``fallocate(2)`` on a file: ``mode`` is 0 (allocate, extending the size),
    ``FALLOC_FL_KEEP_SIZE``, ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` or
    ``FALLOC_FL_ZERO_RANGE`` (optionally with ``KEEP_SIZE``); ``offset``, ``length`` in bytes."""

    path: str
    offset: int
    length: int
    mode: int
    KIND: ClassVar[int] = 3
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = (
        (PATH, PATH), ("offset", INT), ("length", INT), ("mode", INT))

    def __post_init__(self) -> None:
        DataEvent.__post_init__(self)
        if self.mode & ~FALLOC_MODES:
            raise InvalidEvent(f"Fallocate.mode {self.mode:#x} has flags outside {FALLOC_MODES:#x}")
        if self.length < 1 or self.offset + self.length > MAX_OFFSET:
            raise InvalidEvent("Fallocate.length must be at least 1 and end within 2**63-1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Stamp(DataEvent):
    """The modification time a node's writes left on a file (read from the volume once its
    writes went quiet, or before it gave the file's write token away), in nanoseconds."""

    path: str
    mtime_ns: int
    KIND: ClassVar[int] = 4
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("mtime_ns", TIME))


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick(DataEvent):
    """A node's progress mark: 'I have recorded everything up to here, and I know gseq after'."""

    KIND: ClassVar[int] = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class MetaEvent(Event):
    """A metadata operation, executed by the coordinator as number ``gseq``.

    ``op_id`` is chosen by the node that asked (``origin``) and is unique per origin; the node's
    copy and the coordinator's copy carry the same ``op_id`` and ``gseq``.
    """

    gseq: int
    op_id: str
    origin: str

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _check_int(self.gseq, "gseq", 1, MAX_SEQ)
        _check_source(self.origin, "origin")
        if not isinstance(self.op_id, str) or not _OP_ID_RE.match(self.op_id):
            raise InvalidEvent(f"op_id {self.op_id!r} must be 1..{MAX_OP_ID} printable ASCII "
                               "characters without spaces")

    def payload(self) -> tuple[Any, ...]:
        """Everything that must agree between two copies of this operation."""
        extra = tuple(getattr(self, name) for name, _ in self.SPEC)
        return (self.KIND, self.gseq, self.op_id, self.origin, *extra)

    def paths(self) -> tuple[str, ...]:
        """The volume paths this operation touches ("" being the root)."""
        return tuple(getattr(self, name) for name, kind in self.SPEC if kind in (PATH, ANY_PATH))


_P = ((PATH, PATH),)
_PA = ((PATH, PATH), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class Create(MetaEvent):
    """Create a new, empty regular file (it did not exist). The creator holds its write token."""

    path: str
    mode: int = 0o644
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 10
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("mode", MODE), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class Open(MetaEvent):
    """A node opened a file for writing. Changes nothing on disk; it is a time mark."""

    path: str
    KIND: ClassVar[int] = 11
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = _P


@dataclass(frozen=True, slots=True, kw_only=True)
class Close(MetaEvent):
    """A node closed a file it had open for writing. A time mark."""

    path: str
    KIND: ClassVar[int] = 12
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = _P


@dataclass(frozen=True, slots=True, kw_only=True)
class Mkdir(MetaEvent):
    path: str
    mode: int = 0o755
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 13
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("mode", MODE), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class Rmdir(MetaEvent):
    path: str
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 14
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = _PA


@dataclass(frozen=True, slots=True, kw_only=True)
class Unlink(MetaEvent):
    """Remove a name of a file, symlink or special file (needs the file's write token)."""

    path: str
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 15
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = _PA


@dataclass(frozen=True, slots=True, kw_only=True)
class Rename(MetaEvent):
    """Atomically rename ``path`` to ``dst``, replacing ``dst`` if it exists."""

    path: str
    dst: str
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 16
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("dst", PATH), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange(MetaEvent):
    """Atomically swap the names ``path`` and ``dst`` (``renameat2(RENAME_EXCHANGE)``)."""

    path: str
    dst: str
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 24
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("dst", PATH), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class Link(MetaEvent):
    """Give the inode at ``path`` a further name ``dst`` (a hard link)."""

    path: str
    dst: str
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 25
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("dst", PATH), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class Mknod(MetaEvent):
    """Create a FIFO, socket or device node ``path``: ``mode`` holds its type and permission
    bits, ``rdev`` the device number (0 unless a device)."""

    path: str
    mode: int
    rdev: int = 0
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 26
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = (
        (PATH, PATH), ("mode", NODE_MODE), ("rdev", INT), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class SetXattr(MetaEvent):
    """Set extended attribute ``name`` of ``path`` ("" is the root) to ``value``."""

    path: str
    name: str
    value: bytes
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 27
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = (
        (PATH, ANY_PATH), ("name", XNAME), ("value", XVALUE), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveXattr(MetaEvent):
    """Remove extended attribute ``name`` of ``path`` ("" is the root)."""

    path: str
    name: str
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 28
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, ANY_PATH), ("name", XNAME), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class Truncate(MetaEvent):
    """Set a file's size (needs the file's write token)."""

    path: str
    size: int
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 17
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("size", INT), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class SetAttr(MetaEvent):
    """Change mode, times and/or owner of ``path`` ("" is the root); ``None`` leaves that
    attribute alone."""

    path: str
    mode: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    uid: int | None = None
    gid: int | None = None
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 18
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = (
        (PATH, ANY_PATH),
        ("mode", OPT_MODE),
        ("atime_ns", OPT_TIME),
        ("mtime_ns", OPT_TIME),
        ("uid", OPT_ID),
        ("gid", OPT_ID),
        ("attrs", ATTRS),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Symlink(MetaEvent):
    """Create symlink ``path`` whose content is ``target`` (never followed by the replica)."""

    path: str
    target: str
    attrs: tuple[Attr, ...] = ()
    KIND: ClassVar[int] = 19
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = ((PATH, PATH), ("target", TARGET), ("attrs", ATTRS))


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquire(MetaEvent):
    """The coordinator granted ``origin`` the write token of ``path``.

    The previous holder stopped writing the file before the grant, so its writes carry
    ``after < gseq`` and the new holder's carry ``after >= gseq``: a change of writer is a mark.
    """

    path: str
    KIND: ClassVar[int] = 20
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = _P


@dataclass(frozen=True, slots=True, kw_only=True)
class Join(MetaEvent):
    """Node ``origin`` joined the cluster; from here on the merger waits for its stream."""

    KIND: ClassVar[int] = 21


@dataclass(frozen=True, slots=True, kw_only=True)
class Leave(MetaEvent):
    """Node ``origin`` left the cluster cleanly; its copy is the last event of its stream."""

    KIND: ClassVar[int] = 22


@dataclass(frozen=True, slots=True, kw_only=True)
class Lock(MetaEvent):
    """The coordinator granted ``origin`` a file lock (POSIX or flock) on ``path`` that another
    node held or was the last to hold. Changes nothing on disk; it is a mark: the previous
    holder recorded what it did under its lock before releasing it (``after < gseq``), and
    ``origin`` stamps what it does under this one with ``after >= gseq``, so the replica applies
    them in that order, on every file (a database and its journal)."""

    path: str
    KIND: ClassVar[int] = 23
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = _P


@dataclass(frozen=True, slots=True, kw_only=True)
class Evict(MetaEvent):
    """Node ``origin`` was removed from the cluster by an operator (or after a configured
    silence) once its lease had run out: it holds no write token or lock any more. The replica
    stops waiting for its stream here; what it wrote and never shipped is put right from the
    volume by the synchronisation that follows. Its stream is refused from then on."""

    KIND: ClassVar[int] = 34


# -- the synchronisation (docs/architecture.md, "Synchronisation"): recorded by the coordinator
# only, in its stream; the replica applies them in the merged order like any metadata event.


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncStart(MetaEvent):
    """Mark S of a synchronisation: every write token was recalled just before it, so every
    write placed before S is on the volume; the `SyncEntries` that follow (same lock hold) are
    the volume's structure at S. ``members``: the nodes in the cluster at S; ``stream``: the
    coordinator stream's identity; ``reason``: why (shown to people); ``mode``: "sync" (files
    whose size or time differ are compared), "verify" (every file is compared, nothing is
    changed: differences are reported), "repair" (every file compared, differences put right
    and reported) or "files" (the entries are only some regular files, e.g. those an evicted
    node was writing: their content is compared and put right; nothing else is touched)."""

    sync_id: str
    reason: str
    stream: str
    members: tuple[str, ...] = ()
    mode: str = "sync"
    KIND: ClassVar[int] = 30
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = (
        ("sync_id", XNAME), ("reason", TARGET), ("stream", XNAME), ("members", NAMES), ("mode", XNAME))
    MODES: ClassVar[tuple[str, ...]] = ("sync", "verify", "repair", "files")

    def __post_init__(self) -> None:
        MetaEvent.__post_init__(self)
        if self.mode not in self.MODES:
            raise InvalidEvent(f"SyncStart.mode {self.mode!r} is not one of {', '.join(self.MODES)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncEntries(MetaEvent):
    """A batch of the structure snapshot at the last `SyncStart`, in walk order
    (`clusterrep.syncwire.encode_entries`); ``final`` on the last batch."""

    entries: bytes
    final: int = 0
    KIND: ClassVar[int] = 31
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = (("entries", DATA), ("final", FLAG))


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncBlocks(MetaEvent):
    """Content of file ``path`` (volume inode ``ino``) read under its write token at this
    mark: its ``size``, the blocks of ``first .. first + count - 1`` that differ from the
    replica's (`clusterrep.syncwire.encode_blocks`; those of the range not listed are equal),
    and its ``attrs`` (modification time included); ``final`` on the file's last one. One
    read under the token may be recorded as several of these, over consecutive ranges.
    ``base``: the `clusterrep.blocks.Manifest.fingerprint` of the replica's blocks of that
    range the coordinator compared with (b"": none): a replica whose own differ (it replays a
    sync made against another copy of the target) cannot trust the unlisted blocks."""

    path: str
    ino: int
    size: int
    first: int
    count: int
    blocks: bytes
    final: int = 0
    attrs: tuple[Attr, ...] = ()
    base: bytes = b""
    KIND: ClassVar[int] = 32
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = (
        (PATH, PATH), ("ino", INT), ("size", INT), ("first", INT), ("count", INT),
        ("blocks", DATA), ("final", FLAG), ("attrs", ATTRS), ("base", XVALUE))


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncEnd(MetaEvent):
    """Mark E: synchronisation ``sync_id`` is over (``outcome`` "done", or "aborted" when a
    newer one replaced it)."""

    sync_id: str
    outcome: str
    KIND: ClassVar[int] = 33
    SPEC: ClassVar[tuple[tuple[str, str], ...]] = (("sync_id", XNAME), ("outcome", XNAME))


EVENT_TYPES: dict[int, type[Event]] = {
    cls.KIND: cls
    for cls in (Write, Fallocate, Stamp, Tick, Create, Open, Close, Mkdir, Rmdir, Unlink, Rename,
                Exchange, Truncate, SetAttr, Symlink, Link, Mknod, SetXattr, RemoveXattr,
                Acquire, Join, Leave, Lock, SyncStart, SyncEntries, SyncBlocks, SyncEnd, Evict)
}
_EXTRA: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls) if f.name not in ("source", "seq", "wall")
               and f.name not in {n for n, _ in cls.SPEC})
    for cls in EVENT_TYPES.values()
}


# ---------------------------------------------------------------------------------------------
# Encoding: msgpack array [WIRE_VERSION, KIND, source, seq, wall, *extra, *spec fields]
# where extra is ``after`` for data events and ``gseq, op_id, origin`` for metadata events.
# Paths and symlink targets travel as raw bytes.


def encode(event: Event) -> bytes:
    """Encode one event to bytes."""
    cls = type(event)
    out: list[Any] = [WIRE_VERSION, cls.KIND, event.source, event.seq, event.wall]
    out.extend(getattr(event, name) for name in _EXTRA[cls])
    for name, kind in cls.SPEC:
        value = getattr(event, name)
        if kind in (PATH, TARGET, ANY_PATH, XNAME):
            value = os.fsencode(value)
        elif kind == ATTRS:
            value = [a.to_wire() for a in value]
        elif kind in (TIME, OPT_TIME):
            value = time_to_wire(value)
        out.append(value)
    return msgpack.packb(out, use_bin_type=True)


def encode_write(source: str, seq: int, wall: int, after: int, path: str, offset: int,
                 data: bytes) -> bytes:
    """``encode(Write(...))`` without building the event: the node's hot path.

    Only for a caller whose fields are valid by construction (a node recording a path the kernel
    gave it); the replica validates every event it decodes anyway.
    """
    return msgpack.packb([WIRE_VERSION, 1, source, seq, wall, after, os.fsencode(path), offset, data],
                         use_bin_type=True)


_WRITE_KIND = Write.KIND


def decode(raw: bytes) -> Event:
    """Decode and validate one event; raise `DecodeError` / `InvalidEvent` saying what is wrong."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(raw).__name__}")
    if len(raw) > MAX_ENCODED:
        raise DecodeError(f"encoded event is {len(raw)} bytes, more than {MAX_ENCODED}")
    try:
        items = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True,
                                max_bin_len=MAX_WRITE_BYTES, max_str_len=MAX_PATH_BYTES,
                                max_array_len=MAX_XATTRS * 2, max_map_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not a valid encoded event: {exc}") from None
    if not isinstance(items, list) or len(items) < 5:
        raise DecodeError("encoded event must be an array of at least 5 items")
    version, kind = items[0], items[1]
    if (type(kind) is int and kind == _WRITE_KIND and type(version) is int
            and version == WIRE_VERSION and len(items) == 9):
        # the common case, without the generic loop (the same checks: types, NUL, then the
        # dataclass's own validation)
        _, _, source, seq, wall, after, path, offset, data = items
        if type(path) is bytes and b"\0" not in path:
            try:
                return Write(source=source, seq=seq, wall=wall, after=after,
                             path=os.fsdecode(path), offset=offset, data=data)
            except TypeError as exc:
                raise DecodeError(f"Write: {exc}") from None
    if type(version) is not int or version != WIRE_VERSION:
        raise DecodeError(f"unsupported wire version {version!r} (this build speaks {WIRE_VERSION})")
    cls = EVENT_TYPES.get(kind) if type(kind) is int else None
    if cls is None:
        raise DecodeError(f"unknown event kind {kind!r}")
    names = ("source", "seq", "wall") + _EXTRA[cls]
    spec = cls.SPEC
    if len(items) != 2 + len(names) + len(spec):
        raise DecodeError(
            f"{cls.__name__} needs {2 + len(names) + len(spec)} items, got {len(items)}"
        )
    kwargs: dict[str, Any] = dict(zip(names, items[2 : 2 + len(names)], strict=True))
    for (name, fkind), value in zip(spec, items[2 + len(names) :], strict=True):
        if fkind in (PATH, TARGET, ANY_PATH, XNAME):
            if not isinstance(value, bytes):
                raise DecodeError(f"{cls.__name__}.{name} must be bytes on the wire")
            if b"\0" in value:
                raise UnsafePath(f"{cls.__name__}.{name} contains a NUL byte")
            value = os.fsdecode(value)
        elif fkind == ATTRS:
            if not isinstance(value, list):
                raise DecodeError(f"{cls.__name__}.{name} must be an array")
            value = tuple(Attr.from_wire(item) for item in value)
        elif fkind in (TIME, OPT_TIME):
            value = time_from_wire(value, f"{cls.__name__}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise DecodeError(f"{cls.__name__}: {exc}") from None


def describe(event: Event) -> str:
    """One human-readable line for logs and the timeline."""
    cls = type(event)
    head = f"{event.source}#{event.seq} {cls.__name__.lower()}"
    if isinstance(event, MetaEvent):
        head += f" g{event.gseq} by {event.origin}"
    elif isinstance(event, DataEvent):
        head += f" after g{event.after}"
    parts = []
    for name, _ in cls.SPEC:
        value = getattr(event, name)
        if name in ("data", "value", "entries", "blocks"):
            parts.append(f"{len(value)}B")
        elif name == "attrs":
            continue
        elif value is not None:
            parts.append(f"{name}={value!r}" if name != PATH else repr(value))
    return head + (" " + " ".join(parts) if parts else "")
