"""A sync's payloads inside events: entries and blocks round-trip, and anything else is refused
with `InvalidSyncPayload` (never another exception, never a partial result)."""

from __future__ import annotations

import contextlib
import os

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterrep.blocks import BLOCK_SIZE, Codec, Manifest, hash_block
from clusterrep.replica.syncapply import Block, Hole
from clusterrep.snapshot import Entry, Kind, walk
from clusterrep.syncwire import (
    InvalidSyncPayload,
    decode_blocks,
    decode_entries,
    encode_blocks,
    encode_entries,
    entry_to_wire,
)


def test_entries_of_a_real_tree_round_trip(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 100)
    os.symlink("d/f", tmp_path / "s")
    os.mkfifo(tmp_path / "p")
    raw = os.fsencode(str(tmp_path)) + b"/n\xff"
    with open(raw, "wb") as f:
        f.write(b"1")
    os.setxattr(tmp_path / "d" / "f", "user.a", b"\x00\xff")
    os.utime(tmp_path / "d", ns=(0, -5 * 10**9))  # before 1970
    entries = list(walk(tmp_path))
    assert decode_entries(encode_entries(entries)) == entries


def test_blocks_round_trip() -> None:
    data = os.urandom(BLOCK_SIZE)
    blocks = [Hole(0), Block(3, int(Codec.RAW), data, hash_block(data)), Hole(7)]
    assert decode_blocks(encode_blocks(blocks)) == blocks


GOOD = entry_to_wire(Entry("a/b", Kind.FILE, 5, 0o644, 1, 2, 3, xattrs=(("user.x", b"v"),),
                           inode=(1, 2), nlink=1))


@pytest.mark.parametrize("index, value, why", [
    (0, b"/abs", "absolute"), (0, b"a/../b", "component"), (0, "str", "bytes"), (1, "weird", "kind"),
    (2, -1, "size"), (3, 0o70000, "mode"), (4, -1, "uid"), (6, "soon", "mtime"),
    (8, b"target", "only a symlink"), (9, [[b"user.x"]], "xattrs"), (12, 1 << 40, "nlink"),
])
def test_each_bad_entry_field_is_refused_by_name(index: int, value: object, why: str) -> None:
    item = list(GOOD)
    item[index] = value
    with pytest.raises(InvalidSyncPayload, match=why):
        decode_entries(msgpack.packb([item], use_bin_type=True))


@given(st.binary(max_size=300))
def test_random_bytes_never_decode_to_anything_but_a_refusal(raw: bytes) -> None:
    for decode in (decode_entries, decode_blocks):
        with contextlib.suppress(InvalidSyncPayload):
            decode(raw)


@given(st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
                    | st.binary(max_size=40) | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=14), max_leaves=60))
def test_random_structures_are_refused_cleanly(value: object) -> None:
    raw = msgpack.packb([value], use_bin_type=True)
    for decode in (decode_entries, decode_blocks):
        with contextlib.suppress(InvalidSyncPayload):
            decode(raw)


def test_manifest_slices_and_joins_without_a_loop_per_block() -> None:
    blocks = [os.urandom(32) if i % 3 else b"" for i in range(200)]
    m = Manifest.build(200 * BLOCK_SIZE, blocks, 0)
    for a, b in [(0, 200), (5, 17), (3, 3), (190, 400), (0, 1), (199, 200)]:
        assert m.slice(a, b).blocks() == blocks[a:min(b, 200)]
    assert Manifest.concat([m.slice(0, 10), m.slice(10, 155), m.slice(155, 200)]) == m
    assert Manifest.holes_only(200 * BLOCK_SIZE, 10, 20).blocks() == [b""] * 20
