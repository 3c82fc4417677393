"""The event model: validation of every field, the binary encoding, and `describe`."""

from __future__ import annotations

import re
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterrep.errors import DecodeError, InvalidEvent, UnsafePath
from clusterrep.events import (
    EVENT_TYPES,
    MAX_ENCODED,
    MAX_NAME_BYTES,
    MAX_OP_ID,
    MAX_PATH_BYTES,
    MAX_WRITE_BYTES,
    WIRE_VERSION,
    Acquire,
    Attr,
    Close,
    Create,
    Event,
    Evict,
    Exchange,
    Fallocate,
    Join,
    Leave,
    Link,
    Lock,
    Mkdir,
    Mknod,
    Open,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Stamp,
    Symlink,
    SyncBlocks,
    SyncEnd,
    SyncEntries,
    SyncStart,
    Tick,
    Truncate,
    Unlink,
    Write,
    check_path,
    decode,
    describe,
    encode,
)

NON_UTF8 = "files/caf\udce9"  # the bytes b"files/caf\xe9", as os.fsdecode gives them
UNICODE = "dossier/ünïcødé ☃ 日本語.txt"

# Common fields of a node's data event and of a coordinator's metadata event.
DATA = {"source": "h1", "seq": 1, "after": 0}
META = {"source": "coordinator", "seq": 1, "gseq": 1, "op_id": "h1-1", "origin": "h1"}

# The smallest valid keyword arguments of each event type; tests override one field at a time.
BASE: dict[type[Event], dict[str, Any]] = {
    Write: {**DATA, "path": "f", "offset": 0, "data": b"x"},
    Tick: dict(DATA),
    Create: {**META, "path": "f"},
    Open: {**META, "path": "f"},
    Close: {**META, "path": "f"},
    Mkdir: {**META, "path": "d"},
    Rmdir: {**META, "path": "d"},
    Unlink: {**META, "path": "f"},
    Rename: {**META, "path": "f", "dst": "g"},
    Truncate: {**META, "path": "f", "size": 0},
    SetAttr: {**META, "path": "f"},
    Symlink: {**META, "path": "l", "target": "t"},
    Fallocate: {**DATA, "path": "f", "offset": 0, "length": 1, "mode": 0},
    Stamp: {**DATA, "path": "f", "mtime_ns": 0},
    Exchange: {**META, "path": "f", "dst": "g"},
    Link: {**META, "path": "f", "dst": "g"},
    Mknod: {**META, "path": "p", "mode": 0o10600},
    SetXattr: {**META, "path": "f", "name": "user.x", "value": b""},
    RemoveXattr: {**META, "path": "f", "name": "user.x"},
    Acquire: {**META, "path": "f"},
    Join: dict(META),
    Leave: dict(META),
}


def make(cls: type[Event], **changes: Any) -> Event:
    return cls(**{**BASE[cls], **changes})


# ---------------------------------------------------------------------------------------------
# Round trip


SAMPLES: list[Event] = [
    Write(source="h1", seq=7, wall=1_700_000_000_123_456_789, after=3, path=NON_UTF8,
          offset=4096, data=b"\x00\xff binary \x80"),
    Write(source="h1", seq=8, after=3, path=UNICODE, offset=0, data=b""),
    Tick(source="node-2.example_x", seq=9, wall=-1, after=12),
    Create(**{**META, "path": NON_UTF8, "mode": 0o600}),
    Open(**{**META, "seq": 2, "gseq": 2, "op_id": "h1-2", "path": UNICODE}),
    Close(**{**META, "seq": 3, "gseq": 3, "op_id": "h1-3", "path": UNICODE}),
    Mkdir(**{**META, "path": "a/b/c", "mode": 0o7777}),
    Rmdir(**{**META, "path": "dir/caf\udce9"}),
    Unlink(**{**META, "path": "a/x"}),
    Rename(**{**META, "path": NON_UTF8, "dst": UNICODE}),
    Truncate(**{**META, "path": "big", "size": (1 << 63) - 1}),
    SetAttr(**{**META, "path": "f", "mode": 0o4755, "atime_ns": -(1 << 63),
               "mtime_ns": (1 << 63) - 1}),
    SetAttr(**{**META, "path": "f"}),
    Symlink(**{**META, "path": "ln", "target": "/etc/passwd"}),
    Symlink(**{**META, "path": "ln2", "target": "../../caf\udce9/☃"}),
    Acquire(**{**META, "path": UNICODE, "origin": "h2", "op_id": "h2-99"}),
    Lock(**{**META, "path": NON_UTF8, "origin": "h2", "op_id": "h2-100"}),
    SyncStart(**{**META, "origin": "coordinator", "op_id": "sync-1", "sync_id": "ab12",
                 "reason": "the replica lost its state", "stream": "volume", "members": ("h1", "h2")}),
    SyncEntries(**{**META, "origin": "coordinator", "entries": b"\x90", "final": 1}),
    SyncBlocks(**{**META, "origin": "coordinator", "path": NON_UTF8, "ino": 12, "size": 1 << 40,
                  "first": 1024, "count": 1024, "blocks": b"\x90", "final": 0,
                  "attrs": (Attr(NON_UTF8, 0o644, 0, 0, 5, None),)}),
    SyncEnd(**{**META, "origin": "coordinator", "sync_id": "ab12", "outcome": "done"}),
    Evict(**{**META, "origin": "h2", "op_id": "evict-1-h2"}),
    Join(**META),
    Leave(**{**META, "seq": 40, "gseq": 41, "op_id": "h1-leave", "wall": 5}),
    Fallocate(source="h1", seq=10, after=3, path=NON_UTF8, offset=1 << 40, length=4096, mode=3),
    Stamp(source="h1", seq=11, after=3, path=UNICODE, mtime_ns=-5),
    Stamp(source="h1", seq=12, after=3, path="f", mtime_ns=15_032_385_535 * 10**9 + 7),  # 2446
    Exchange(**{**META, "path": NON_UTF8, "dst": UNICODE,
                "attrs": (Attr("", 0o755, 0, 0, 1, None), Attr(NON_UTF8, 0o600, 1000, 100))}),
    Link(**{**META, "path": "a", "dst": "dir/caf\udce9"}),
    Mknod(**{**META, "path": "fifo", "mode": 0o10644, "rdev": 0}),
    Mknod(**{**META, "path": "dev", "mode": 0o20600, "rdev": (8 << 8) | 1}),
    SetXattr(**{**META, "path": "", "name": "user.caf\udce9", "value": b"\x00" * 65536}),
    RemoveXattr(**{**META, "path": "f", "name": "trusted.x"}),
    SetAttr(**{**META, "path": "old", "atime_ns": -(10**19), "mtime_ns": 10**19 + 1,
               "uid": 0, "gid": 4294967294}),
    Create(**{**META, "path": "n", "attrs": (
        Attr("n", 0o2644, 4294967294, 7, -(1 << 70),
             (("system.posix_acl_access", b"\x02\x00"), ("user.a", b""))),)}),
]


def test_samples_cover_every_event_type() -> None:
    assert {type(ev) for ev in SAMPLES} == set(EVENT_TYPES.values())
    assert {cls.KIND for cls in EVENT_TYPES.values()} == set(EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda ev: f"{type(ev).__name__}")
def test_round_trip(event: Event) -> None:
    raw = encode(event)
    assert isinstance(raw, bytes)
    back = decode(raw)
    assert type(back) is type(event)
    assert back == event
    assert hash(back) == hash(event)
    assert encode(back) == raw
    # the same bytes are accepted whatever buffer type carries them
    assert decode(bytearray(raw)) == event
    assert decode(memoryview(raw)) == event


def test_paths_travel_as_raw_bytes() -> None:
    ev = Rename(**{**META, "path": NON_UTF8, "dst": UNICODE})
    items = msgpack.unpackb(encode(ev), raw=True)
    assert items[0] == WIRE_VERSION
    assert items[1] == Rename.KIND
    assert items[-3] == b"files/caf\xe9"
    assert items[-2] == UNICODE.encode()
    assert items[-1] == []  # attrs


def test_largest_write_round_trips() -> None:
    # the longest path made of maximal components, and the most data a Write may carry
    path = "/".join(["n" * MAX_NAME_BYTES] * 15 + ["m" * 254, "z"])
    assert len(path.encode()) == MAX_PATH_BYTES
    ev = Write(source="s" * 64, seq=(1 << 63) - 1, after=(1 << 63) - 1, path=path,
               offset=0, data=b"\xab" * MAX_WRITE_BYTES)
    raw = encode(ev)
    assert len(raw) <= MAX_ENCODED
    assert decode(raw) == ev


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "a" * MAX_NAME_BYTES},
        {"path": "é" * (MAX_NAME_BYTES // 2)},
        {"path": ".hidden/..x/x.."},
        {"path": "a\nb c"},
        {"source": "s" * 64},
        {"source": "0a._-Z"},
        {"op_id": "x" * MAX_OP_ID},
        {"mode": 0o7777},
        {"mode": 0},
    ],
    ids=str,
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    ev = make(Create, **kwargs)
    assert decode(encode(ev)) == ev


def test_surrogate_escaped_utf8_path_round_trips_or_is_refused() -> None:
    path = "caf\udcc3\udca9"
    try:
        ev = make(Write, path=path)
    except UnsafePath:
        return  # refusing a non-canonical spelling would be fine too
    assert decode(encode(ev)) == ev


def test_every_constructible_op_id_can_be_encoded() -> None:
    try:
        ev = make(Join, op_id="h1-\udce9")
    except InvalidEvent:
        return  # refusing it at construction would be fine too
    assert decode(encode(ev)) == ev


# ---------------------------------------------------------------------------------------------
# Validation: every check raises the typed error and says what is wrong

LONG_PATH = "/".join(["p" * 200] * 21)  # 4220 bytes, every component legal
assert len(LONG_PATH) > MAX_PATH_BYTES

INVALID: list[tuple[str, type[Event], dict[str, Any], type[Exception], str]] = [
    # paths
    ("empty path", Write, {"path": ""}, UnsafePath, r"Write\.path is empty"),
    ("absolute path", Create, {"path": "/etc/passwd"}, UnsafePath, r"'/etc/passwd' is absolute"),
    ("root path", Mkdir, {"path": "/"}, UnsafePath, r"is absolute"),
    ("dotdot first", Write, {"path": "../x"}, UnsafePath, r"has '\.\.' component"),
    ("dotdot middle", Unlink, {"path": "a/../b"}, UnsafePath, r"has '\.\.' component"),
    ("dotdot only", Rmdir, {"path": ".."}, UnsafePath, r"has '\.\.' component"),
    ("dot first", Open, {"path": "./x"}, UnsafePath, r"has '\.' component"),
    ("dot middle", Close, {"path": "a/./b"}, UnsafePath, r"has '\.' component"),
    ("dot only", Acquire, {"path": "."}, UnsafePath, r"has '\.' component"),
    ("double slash", Truncate, {"path": "a//b"}, UnsafePath, r"has an empty component"),
    ("trailing slash", SetAttr, {"path": "a/"}, UnsafePath, r"has an empty component"),
    ("NUL byte", Write, {"path": "a\0b"}, UnsafePath, r"contains a NUL byte"),
    ("long component", Create, {"path": "d/" + "c" * (MAX_NAME_BYTES + 1)}, UnsafePath,
     r"component longer than 255 bytes"),
    ("long multibyte component", Create, {"path": "é" * 128}, UnsafePath,
     r"component longer than 255 bytes"),
    ("long path", Write, {"path": LONG_PATH}, UnsafePath, r"is 4220 bytes long, more than 4096"),
    ("bytes path", Write, {"path": b"f"}, UnsafePath, r"Write\.path must be a string, got bytes"),
    ("int path", Unlink, {"path": 3}, UnsafePath, r"must be a string, got int"),
    ("None path", Mkdir, {"path": None}, UnsafePath, r"must be a string, got NoneType"),
    ("lone surrogate", Write, {"path": "a/\ud800"}, UnsafePath, r"cannot be encoded as bytes"),
    ("surrogate below escape range", Write, {"path": "\udc2f"}, UnsafePath,
     r"cannot be encoded as bytes"),
    ("unsafe rename source", Rename, {"path": "../f"}, UnsafePath, r"Rename\.path '\.\./f'"),
    ("unsafe rename destination", Rename, {"dst": "/tmp/f"}, UnsafePath,
     r"Rename\.dst '/tmp/f' is absolute"),
    ("unsafe symlink path", Symlink, {"path": "a/../l"}, UnsafePath, r"Symlink\.path"),
    # sources and origins
    ("empty source", Write, {"source": ""}, InvalidEvent, r"source '' is not a valid source name"),
    ("source with slash", Create, {"source": "a/b"}, InvalidEvent,
     r"source 'a/b' is not a valid source name"),
    ("source too long", Tick, {"source": "s" * 65}, InvalidEvent, r"is not a valid source name"),
    ("source starts with symbol", Tick, {"source": "-h1"}, InvalidEvent,
     r"not starting with a symbol"),
    ("source with space", Tick, {"source": "h 1"}, InvalidEvent, r"not a valid source name"),
    ("source with newline", Tick, {"source": "h1\n"}, InvalidEvent, r"not a valid source name"),
    ("source not str", Tick, {"source": 1}, InvalidEvent, r"source 1 is not a valid source name"),
    ("empty origin", Join, {"origin": ""}, InvalidEvent, r"origin '' is not a valid source name"),
    ("origin with slash", Acquire, {"origin": "x/y"}, InvalidEvent, r"origin 'x/y' is not a valid"),
    # sequence numbers and stamps
    ("seq zero", Write, {"seq": 0}, InvalidEvent, r"seq=0 is outside 1\.\."),
    ("seq negative", Join, {"seq": -1}, InvalidEvent, r"seq=-1 is outside 1\.\."),
    ("seq too big", Tick, {"seq": 1 << 63}, InvalidEvent, r"seq=9223372036854775808 is outside"),
    ("seq bool", Write, {"seq": True}, InvalidEvent, r"seq must be an integer, got bool"),
    ("seq float", Create, {"seq": 1.0}, InvalidEvent, r"seq must be an integer, got float"),
    ("seq str", Create, {"seq": "1"}, InvalidEvent, r"seq must be an integer, got str"),
    ("wall too big", Tick, {"wall": 1 << 63}, InvalidEvent, r"wall=.* is outside"),
    ("wall float", Tick, {"wall": 0.5}, InvalidEvent, r"wall must be an integer, got float"),
    ("after negative", Tick, {"after": -1}, InvalidEvent, r"after=-1 is outside 0\.\."),
    ("after bool", Write, {"after": False}, InvalidEvent, r"after must be an integer, got bool"),
    ("gseq zero", Mkdir, {"gseq": 0}, InvalidEvent, r"gseq=0 is outside 1\.\."),
    ("gseq negative", Leave, {"gseq": -5}, InvalidEvent, r"gseq=-5 is outside"),
    ("gseq bool", Join, {"gseq": True}, InvalidEvent, r"gseq must be an integer, got bool"),
    # op ids
    ("empty op_id", Join, {"op_id": ""}, InvalidEvent, r"op_id .* must be 1\.\.128 printable ASCII"),
    ("long op_id", Unlink, {"op_id": "x" * (MAX_OP_ID + 1)}, InvalidEvent,
     r"op_id .* must be 1\.\.128 printable ASCII"),
    ("op_id not str", Unlink, {"op_id": 7}, InvalidEvent, r"op_id 7 must be 1\.\.128 printable ASCII"),
    # writes
    ("negative offset", Write, {"offset": -1}, InvalidEvent, r"Write\.offset=-1 is outside 0\.\."),
    ("float offset", Write, {"offset": 0.0}, InvalidEvent, r"Write\.offset must be an integer"),
    ("offset past end", Write, {"offset": (1 << 63) - 1, "data": b"ab"}, InvalidEvent,
     r"Write\.offset\+len = .* is too large"),
    ("data str", Write, {"data": "text"}, InvalidEvent, r"Write\.data must be bytes, got str"),
    ("data bytearray", Write, {"data": bytearray(b"x")}, InvalidEvent,
     r"Write\.data must be bytes, got bytearray"),
    ("data memoryview", Write, {"data": memoryview(b"x")}, InvalidEvent,
     r"Write\.data must be bytes, got memoryview"),
    ("data None", Write, {"data": None}, InvalidEvent, r"Write\.data must be bytes, got NoneType"),
    ("data too big", Write, {"data": bytes(MAX_WRITE_BYTES + 1)}, InvalidEvent,
     r"Write\.data is 8388609 bytes, more than 8388608"),
    # sizes and modes
    ("negative size", Truncate, {"size": -1}, InvalidEvent, r"Truncate\.size=-1 is outside"),
    ("create mode too big", Create, {"mode": 0o10000}, InvalidEvent,
     r"Create\.mode=4096 is outside 0\.\.4095"),
    ("create mode negative", Create, {"mode": -1}, InvalidEvent, r"Create\.mode=-1 is outside"),
    ("create mode None", Create, {"mode": None}, InvalidEvent,
     r"Create\.mode must be an integer, got NoneType"),
    ("mkdir mode too big", Mkdir, {"mode": 0o17777}, InvalidEvent, r"Mkdir\.mode=8191 is outside"),
    ("setattr mode too big", SetAttr, {"mode": 0o10000}, InvalidEvent,
     r"SetAttr\.mode=4096 is outside 0\.\.4095"),
    ("setattr mode str", SetAttr, {"mode": "644"}, InvalidEvent,
     r"SetAttr\.mode must be an integer, got str"),
    ("setattr atime float", SetAttr, {"atime_ns": 1.5}, InvalidEvent,
     r"SetAttr\.atime_ns must be an integer time in nanoseconds, got 1\.5"),
    ("setattr mtime beyond time_t", SetAttr, {"mtime_ns": (1 << 63) * 10**9}, InvalidEvent,
     r"SetAttr\.mtime_ns must be an integer time"),
    ("setattr uid -1", SetAttr, {"uid": -1}, InvalidEvent, r"SetAttr\.uid=-1 is outside"),
    # symlink targets
    ("empty target", Symlink, {"target": ""}, InvalidEvent,
     r"Symlink\.target must be 1\.\.4095 bytes without NUL"),
    ("NUL in target", Symlink, {"target": "a\0b"}, InvalidEvent,
     r"Symlink\.target must be 1\.\.4095 bytes without NUL"),
    ("long target", Symlink, {"target": "t" * 4096}, InvalidEvent,
     r"Symlink\.target must be 1\.\.4095 bytes"),
    ("bytes target", Symlink, {"target": b"t"}, InvalidEvent, r"Symlink\.target must be a string"),
    ("lone surrogate target", Symlink, {"target": "\ud800"}, InvalidEvent,
     r"Symlink\.target '\\ud800' cannot be encoded"),
    ("non-canonical target", Symlink, {"target": "caf\udcc3\udca9"}, InvalidEvent,
     r"Symlink\.target .* is not in canonical form"),
    ("non-canonical path", Write, {"path": "caf\udcc3\udca9"}, UnsafePath,
     r"Write\.path .* is not in canonical form"),
    ("op_id with space", Join, {"op_id": "h1 1"}, InvalidEvent, r"op_id 'h1 1' must be"),
]


@pytest.mark.parametrize(("name", "cls", "changes", "error", "message"),
                         [pytest.param(*c, id=c[0]) if type(c) is tuple else c for c in INVALID])
def test_invalid_event_is_refused(name: str, cls: type[Event], changes: dict[str, Any],
                                  error: type[Exception], message: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        make(cls, **changes)
    assert type(info.value) is error, f"{name}: got {type(info.value).__name__}: {info.value}"
    assert re.search(message, str(info.value)), str(info.value)
    assert info.value.hint  # every refusal tells the user what to do about it


@pytest.mark.parametrize(
    ("path", "message"),
    [("", "is empty"), ("/a", "is absolute"), ("a/..", "has '..' component"),
     ("a/.", "has '.' component"), ("a//b", "has an empty component"),
     ("/", "is absolute"), ("x" * 256, "longer than 255 bytes")],
)
def test_check_path_names_what_it_checks(path: str, message: str) -> None:
    with pytest.raises(UnsafePath, match=re.escape(message)) as info:
        check_path(path, "the destination")
    assert str(info.value).startswith("the destination")


def test_check_path_returns_a_safe_path_unchanged() -> None:
    for path in ("a", NON_UTF8, UNICODE, "a/b/c", "..a/b..", "...", "-"):
        assert check_path(path) is path


# ---------------------------------------------------------------------------------------------
# Decoding: crafted wire bytes are refused with a typed error saying what is wrong


def wire(cls: type[Event], **changes: Any) -> list[Any]:
    """The msgpack array `encode` would produce for ``make(cls, **changes)``."""
    return msgpack.unpackb(encode(make(cls, **changes)), raw=False)


def packed(items: Any) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


def _replace(items: list[Any], index: int, value: Any) -> list[Any]:
    items = list(items)
    items[index] = value
    return items


VALID_WRITE = encode(make(Write, path="dir/file", data=b"payload"))
WRITE_ITEMS = wire(Write, path="dir/file", data=b"payload")  # [1, 1, src, seq, wall, after, path, off, data]

BAD_WIRE: list[tuple[str, Any, type[Exception], str]] = [
    ("garbage byte", b"\xc1", DecodeError, r"not a valid encoded event"),
    ("garbage text", b"hello world", DecodeError, r"not a valid encoded event"),
    ("empty input", b"", DecodeError, r"not a valid encoded event"),
    ("truncated", VALID_WRITE[:-3], DecodeError, r"not a valid encoded event.*incomplete"),
    ("truncated header", VALID_WRITE[:2], DecodeError, r"not a valid encoded event"),
    ("trailing bytes", VALID_WRITE + b"\x00", DecodeError, r"not a valid encoded event"),
    ("wrong version", packed(_replace(WRITE_ITEMS, 0, 2)), DecodeError,
     r"unsupported wire version 2 \(this build speaks 1\)"),
    ("version zero", packed(_replace(WRITE_ITEMS, 0, 0)), DecodeError, r"unsupported wire version 0"),
    ("version str", packed(_replace(WRITE_ITEMS, 0, "1")), DecodeError,
     r"unsupported wire version '1'"),
    ("unknown kind", packed(_replace(WRITE_ITEMS, 1, 99)), DecodeError, r"unknown event kind 99"),
    ("kind zero (abstract Event)", packed(_replace(WRITE_ITEMS, 1, 0)), DecodeError,
     r"unknown event kind 0"),
    ("kind str", packed(_replace(WRITE_ITEMS, 1, "1")), DecodeError, r"unknown event kind '1'"),
    ("kind bool", packed(_replace(WRITE_ITEMS, 1, True)), DecodeError, r"unknown event kind True"),
    ("one item too many", packed([*WRITE_ITEMS, 0]), DecodeError, r"Write needs 9 items, got 10"),
    ("one item too few", packed(WRITE_ITEMS[:-1]), DecodeError, r"Write needs 9 items, got 8"),
    ("Write items labelled Tick", packed(_replace(WRITE_ITEMS, 1, Tick.KIND)), DecodeError,
     r"Tick needs 6 items, got 9"),
    ("fewer than 5 items", packed([WIRE_VERSION, 1, "h1", 1]), DecodeError,
     r"must be an array of at least 5 items"),
    ("path as str", packed(_replace(WRITE_ITEMS, 6, "dir/file")), DecodeError,
     r"Write\.path must be bytes on the wire"),
    ("rename dst as str", packed(_replace(wire(Rename), -2, "g")), DecodeError,
     r"Rename\.dst must be bytes on the wire"),
    ("symlink target as str", packed(_replace(wire(Symlink), -2, "t")), DecodeError,
     r"Symlink\.target must be bytes on the wire"),
    ("path as int", packed(_replace(WRITE_ITEMS, 6, 5)), DecodeError,
     r"Write\.path must be bytes on the wire"),
    ("NUL in wire path", packed(_replace(WRITE_ITEMS, 6, b"dir/fi\0le")), UnsafePath,
     r"Write\.path contains a NUL byte"),
    ("NUL in wire target", packed(_replace(wire(Symlink), -2, b"/etc\0")), UnsafePath,
     r"Symlink\.target contains a NUL byte"),
    ("absolute wire path", packed(_replace(WRITE_ITEMS, 6, b"/etc/passwd")), UnsafePath,
     r"Write\.path '/etc/passwd' is absolute"),
    ("dotdot wire path", packed(_replace(WRITE_ITEMS, 6, b"a/../../x")), UnsafePath,
     r"has '\.\.' component"),
    ("empty wire path", packed(_replace(WRITE_ITEMS, 6, b"")), UnsafePath, r"Write\.path is empty"),
    ("seq as str", packed(_replace(WRITE_ITEMS, 3, "1")), InvalidEvent,
     r"seq must be an integer, got str"),
    ("seq zero", packed(_replace(WRITE_ITEMS, 3, 0)), InvalidEvent, r"seq=0 is outside"),
    ("data as str", packed(_replace(WRITE_ITEMS, 8, "payload")), InvalidEvent,
     r"Write\.data must be bytes, got str"),
    ("bad source", packed(_replace(WRITE_ITEMS, 2, "a/b")), InvalidEvent,
     r"source 'a/b' is not a valid source name"),
    ("source not UTF-8", msgpack.packb(_replace(WRITE_ITEMS, 2, b"h\xff"), use_bin_type=False),
     DecodeError, r"not a valid encoded event"),
    ("oversized", bytes(MAX_ENCODED + 1), DecodeError, r"is 8454145 bytes, more than 8454144"),
    ("data over the limit on the wire",
     packed(_replace(WRITE_ITEMS, 8, bytes(MAX_WRITE_BYTES + 1))), DecodeError,
     r"not a valid encoded event"),
    ("non-bytes str", "\x93\x01\x01", DecodeError, r"expected bytes, got str"),
    ("non-bytes list", [1, 1], DecodeError, r"expected bytes, got list"),
    ("non-bytes None", None, DecodeError, r"expected bytes, got NoneType"),
    ("map instead of array", packed({"version": 1, "kind": 1}), DecodeError,
     r"not a valid encoded event"),
    ("empty map", packed({}), DecodeError, r"must be an array of at least 5 items"),
    ("bare integer", packed(1), DecodeError, r"must be an array"),
    ("bare bytes", packed(b"\x01\x01"), DecodeError, r"must be an array"),
    ("deeply nested", b"\x91" * 2000 + b"\x00", DecodeError, r"not a valid encoded event"),
]


@pytest.mark.parametrize(("raw", "error", "message"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_WIRE])
def test_decode_refuses(raw: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(raw)
    assert type(info.value) is error, f"got {type(info.value).__name__}: {info.value}"
    assert re.search(message, str(info.value)), str(info.value)


def test_decode_crafted_valid_array() -> None:
    # a hand-built array in the documented layout is accepted, non-UTF-8 bytes included
    raw = packed([WIRE_VERSION, Rename.KIND, "coordinator", 4, 99, 4, "h1-4", "h1",
                  b"caf\xe9", b"dir/new", [[b"", 0o755, 0, 0, 7, None]]])
    assert decode(raw) == Rename(source="coordinator", seq=4, wall=99, gseq=4, op_id="h1-4",
                                 origin="h1", path="caf\udce9", dst="dir/new",
                                 attrs=(Attr("", 0o755, 0, 0, 7),))


@pytest.mark.parametrize(("entry", "message"), [
    ([b"/etc", 0o755, 0, 0, None, None], r"absolute"),
    ([b"a/../b", 0o755, 0, 0, None, None], r"'\.\.' component"),
    ([b"a", 0o17777, 0, 0, None, None], r"mode=8191 is outside"),
    ([b"a", 0o644, -1, 0, None, None], r"uid=-1 is outside"),
    ([b"a", 0o644, 0, 0, None, [[b"user.x", "text"]]], r"value must be at most"),
    ([b"a", 0o644, 0, 0, None, [[b"", b""]]], r"xattr name must be 1\.\.255 bytes"),
    ([b"a", 0o644, 0, 0], r"array of 6 items"),
])
def test_decode_refuses_bad_attrs(entry: list[Any], message: str) -> None:
    raw = packed([WIRE_VERSION, Unlink.KIND, "coordinator", 4, 99, 4, "h1-4", "h1", b"f", [entry]])
    with pytest.raises((DecodeError, InvalidEvent, UnsafePath), match=message):
        decode(raw)


@pytest.mark.parametrize(("changes", "message"), [
    ({"mode": 0o100644}, r"is not a FIFO, socket or device"),
    ({"mode": 0o40755}, r"is not a FIFO, socket or device"),
])
def test_mknod_takes_only_special_files(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        make(Mknod, **changes)


def test_fallocate_refuses_modes_a_fuse_file_system_never_gets() -> None:
    with pytest.raises(InvalidEvent, match="flags outside"):
        make(Fallocate, mode=0x08)  # FALLOC_FL_COLLAPSE_RANGE
    with pytest.raises(InvalidEvent, match="length must be at least 1"):
        make(Fallocate, length=0)


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_decode_refuses_a_version_of_the_wrong_type(version: Any) -> None:
    with pytest.raises(DecodeError, match="unsupported wire version"):
        decode(packed(_replace(WRITE_ITEMS, 0, version)))


# ---------------------------------------------------------------------------------------------
# describe


def test_describe_write() -> None:
    ev = Write(source="h1", seq=3, after=2, path="a/b", offset=5, data=b"xyz")
    assert describe(ev) == "h1#3 write after g2 'a/b' offset=5 3B"


def test_describe_rename() -> None:
    ev = Rename(source="coordinator", seq=7, gseq=7, op_id="h1-7", origin="h1",
                path="a/old", dst="b/new")
    assert describe(ev) == "coordinator#7 rename g7 by h1 'a/old' dst='b/new'"


@pytest.mark.parametrize("event", SAMPLES, ids=lambda ev: f"{type(ev).__name__}")
def test_describe_is_one_readable_line(event: Event) -> None:
    text = describe(event)
    assert "\n" not in text and "\r" not in text
    assert text.startswith(f"{event.source}#{event.seq} {type(event).__name__.lower()}")
    if isinstance(event, Write):
        assert f"{len(event.data)}B" in text
        assert repr(event.data) not in text or not event.data  # data is summarised, not dumped


def test_describe_keeps_a_newline_in_a_path_on_one_line() -> None:
    ev = Unlink(**{**META, "path": "evil\nname"})
    text = describe(ev)
    assert "\n" not in text
    assert "'evil\\nname'" in text


def test_encode_write_matches_encode() -> None:
    from clusterrep.events import encode_write

    ev = Write(source="h1", seq=9, wall=123, after=4, path="vms/caf\udce9.img", offset=4096,
               data=b"abc" * 100)
    raw = encode_write("h1", 9, 123, 4, "vms/caf\udce9.img", 4096, b"abc" * 100)
    assert raw == encode(ev)
    assert decode(raw) == ev


_INT = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_ANY = st.one_of(st.none(), st.booleans(), _INT, st.text(max_size=5), st.binary(max_size=6),
                 st.lists(_INT, max_size=2))


@settings(max_examples=300)
@given(st.tuples(
    st.one_of(st.just(WIRE_VERSION), _ANY), st.one_of(st.just(1), st.just(True), _ANY),
    st.one_of(st.just("h1"), _ANY), st.one_of(st.integers(1, 10), _ANY),
    st.one_of(st.integers(0, 2**62), _ANY), st.one_of(st.integers(0, 10), _ANY),
    st.one_of(st.just(b"vm/a.img"), st.just(b"a\0b"), st.just(b"../x"), _ANY),
    st.one_of(st.integers(0, 2**40), _ANY), st.one_of(st.binary(max_size=64), _ANY)))
def test_the_write_fast_path_decodes_exactly_as_the_generic_path(items: tuple[Any, ...]) -> None:
    """decode() takes a short cut for Write events (the hot path on the replica); whatever the
    nine items, it must give the same event or the same error as the generic path."""
    import clusterrep.events as events

    raw = msgpack.packb(list(items), use_bin_type=True)

    def outcome() -> Any:
        try:
            return events.decode(raw)
        except InvalidEvent as exc:
            return (type(exc), str(exc))

    fast = outcome()
    saved, events._WRITE_KIND = events._WRITE_KIND, -1  # no short cut
    try:
        generic = outcome()
    finally:
        events._WRITE_KIND = saved
    assert fast == generic
