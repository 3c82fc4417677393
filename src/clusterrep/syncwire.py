"""How a synchronisation's payloads travel inside events: structure entries and file blocks.

`encode_entries` / `decode_entries`: a batch of `clusterrep.snapshot.Entry` (a `SyncEntries`
event's ``entries``), each as a msgpack array ``[path, kind, size, mode, uid, gid, mtime,
rdev, target, xattrs, dev, ino, nlink]`` (path, target and xattr names as raw bytes; mtime as
`clusterrep.events.time_to_wire`). `encode_blocks` / `decode_blocks`: a `SyncBlocks` event's
``blocks``, each ``[index, codec, payload, digest]`` (a data block, as `clusterrep.blocks.compress`
made it, with the BLAKE3 digest of the decoded bytes) or ``[index]`` (a hole).

Decoding checks every field's type and range (`clusterrep.events` path rules, modes, owners,
times, xattr limits) and raises `InvalidSyncPayload` naming what is wrong; nothing is applied
from a payload that fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import msgpack

from .blocks import DIGEST_SIZE, Codec
from .errors import ClusterrepError, DecodeError, InvalidEvent
from .events import MAX_TARGET_BYTES, Attr, check_any_path, time_from_wire, time_to_wire
from .replica.syncapply import Block, Hole
from .snapshot import Entry, Kind

MAX_BATCH_BYTES = 1 << 20  # a SyncEntries batch is cut once it holds this much
MAX_ENTRIES = 65536  # entries one batch may hold


class InvalidSyncPayload(ClusterrepError, ValueError):
    """A sync event's entries or blocks that do not decode to valid values."""

    exit_code = 3
    hint = "the coordinator recorded a malformed synchronisation step; nothing of it was applied"


def entry_to_wire(e: Entry) -> list[Any]:
    return [os.fsencode(e.path), e.kind.value, e.size, e.mode, e.uid, e.gid, time_to_wire(e.mtime_ns),
            e.rdev, None if e.target is None else os.fsencode(e.target),
            [[os.fsencode(n), v] for n, v in e.xattrs], e.inode[0], e.inode[1], e.nlink]


def encode_entries(entries: Iterable[Entry]) -> bytes:
    return msgpack.packb([entry_to_wire(e) for e in entries], use_bin_type=True)


def _entry_from_wire(item: Any) -> Entry:
    if not isinstance(item, list) or len(item) != 13:
        raise InvalidSyncPayload("an entry must be an array of 13 items")
    path, kind, size, mode, uid, gid, mtime, rdev, target, xattrs, dev, ino, nlink = item
    if not isinstance(path, bytes) or b"\0" in path:
        raise InvalidSyncPayload("an entry's path must be bytes without NUL")
    try:
        kind = Kind(kind)
    except ValueError:
        raise InvalidSyncPayload(f"unknown entry kind {kind!r}") from None
    if target is not None and (not isinstance(target, bytes) or b"\0" in target
                               or not 0 < len(target) <= MAX_TARGET_BYTES):
        raise InvalidSyncPayload("a symlink target must be 1..4095 bytes without NUL")
    if not isinstance(xattrs, list) or not all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], bytes) and isinstance(x[1], bytes)
            for x in xattrs):
        raise InvalidSyncPayload("an entry's xattrs must be [[name, value], ...]")
    for value, what, high in ((size, "size", (1 << 63) - 1), (rdev, "rdev", (1 << 64) - 1),
                              (dev, "dev", (1 << 64) - 1), (ino, "ino", (1 << 64) - 1),
                              (nlink, "nlink", (1 << 32) - 1)):
        if type(value) is not int or not 0 <= value <= high:
            raise InvalidSyncPayload(f"an entry's {what} {value!r} is out of range")
    try:
        mtime_ns = time_from_wire(mtime, "entry mtime")
        spath = os.fsdecode(path)
        check_any_path(spath, "entry path")
        names = tuple((os.fsdecode(n), v) for n, v in xattrs)
        Attr(spath, mode, uid, gid, mtime_ns, names).check("entry")
    except (DecodeError, InvalidEvent) as exc:
        raise InvalidSyncPayload(f"entry {path!r}: {exc}") from None
    if (kind is Kind.SYMLINK) != (target is not None):
        raise InvalidSyncPayload(f"entry {path!r}: only a symlink has a target")
    return Entry(spath, kind, size, mode, uid, gid, mtime_ns, rdev,
                 None if target is None else os.fsdecode(target), names, (dev, ino), nlink)


def decode_entries(raw: bytes) -> list[Entry]:
    try:
        items = msgpack.unpackb(raw, raw=False, use_list=True, max_array_len=MAX_ENTRIES,
                                max_map_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidSyncPayload(f"structure entries do not decode: {exc}") from None
    if not isinstance(items, list):
        raise InvalidSyncPayload("structure entries must be an array")
    return [_entry_from_wire(item) for item in items]


def encode_blocks(blocks: Iterable[Block | Hole]) -> bytes:
    out: list[Any] = []
    for b in blocks:
        out.append([b.index] if isinstance(b, Hole) else [b.index, int(b.codec), b.payload, b.digest])
    return msgpack.packb(out, use_bin_type=True)


def decode_blocks(raw: bytes) -> list[Block | Hole]:
    try:
        items = msgpack.unpackb(raw, raw=False, use_list=True, max_map_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidSyncPayload(f"blocks do not decode: {exc}") from None
    if not isinstance(items, list):
        raise InvalidSyncPayload("blocks must be an array")
    out: list[Block | Hole] = []
    for item in items:
        if not isinstance(item, list) or not item or type(item[0]) is not int or item[0] < 0:
            raise InvalidSyncPayload("a block must start with its index")
        if len(item) == 1:
            out.append(Hole(item[0]))
            continue
        if len(item) != 4 or item[1] not in tuple(Codec) or not isinstance(item[2], bytes) \
                or not isinstance(item[3], bytes) or len(item[3]) != DIGEST_SIZE:
            raise InvalidSyncPayload(f"block {item[0]} is not [index, codec, payload, digest]")
        out.append(Block(item[0], item[1], item[2], item[3]))
    return out
