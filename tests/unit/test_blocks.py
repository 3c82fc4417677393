"""The block layer: hashing with holes, manifests and their diff, compression, rate limit, hash cache."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterrep import blockread
from clusterrep.blockread import Hasher, RateLimiter, file_blocks
from clusterrep.blocks import (
    BLOCK_SIZE,
    HOLE,
    SUB_BLOCK,
    Codec,
    CorruptBlock,
    FileChanged,
    InvalidManifest,
    Manifest,
    block_count,
    changed_runs,
    compress,
    decompress,
    diff_blocks,
    hash_block,
    sub_digests,
    zero_hash,
)
from clusterrep.errors import ClusterrepError
from clusterrep.hashcache import CacheCorrupt, HashCache

BS = BLOCK_SIZE


def expected_blocks(data: bytes) -> list[bytes]:
    return [hash_block(data[i:i + BS]) for i in range(0, len(data), BS)]


def write_file(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


class CountingLimiter(RateLimiter):
    """A limiter that never waits and records what was read."""

    def __init__(self) -> None:
        super().__init__(1e12)
        self.requests: list[int] = []

    def acquire(self, n: int) -> None:
        self.requests.append(n)


# --------------------------------------------------------------------------- file_blocks


@pytest.mark.parametrize("size", [0, 1, BS - 1, BS, BS + 1, 3 * BS, 16 * BS, 17 * BS + 5, 40 * BS])
def test_blocks_of_short_and_exact_multiple_files(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    fd = write_file(tmp_path / "f", data)
    try:
        got = list(file_blocks(fd, size))
    finally:
        os.close(fd)
    assert [i for i, _ in got] == list(range(block_count(size)))
    assert [h for _, h in got] == expected_blocks(data)


def test_sparse_gigabyte_reads_only_its_data(tmp_path: Path) -> None:
    size = 1 << 30
    writes = [0, 500 * 1024 * 1024 + 7, size - 100]
    fd = os.open(tmp_path / "sparse", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset in writes:
            os.pwrite(fd, b"x" * 10, offset)
        limiter = CountingLimiter()
        got = dict(file_blocks(fd, size, limiter=limiter))
        data_blocks = {o // BS for o in writes}
        assert len(got) == block_count(size)
        assert {i for i, h in got.items() if h != HOLE} == data_blocks
        for i in data_blocks:
            assert got[i] == hash_block(os.pread(fd, BS, i * BS))
        assert sum(limiter.requests) <= len(writes) * 16 * BS  # at most one 1 MiB chunk per write
    finally:
        os.close(fd)


def test_allocated_zeros_are_data_not_holes(tmp_path: Path) -> None:
    fd = write_file(tmp_path / "z", bytes(2 * BS))
    try:
        assert list(file_blocks(fd, 2 * BS)) == [(0, zero_hash(BS)), (1, zero_hash(BS))]
    finally:
        os.close(fd)


def test_file_shrinking_during_read_raises_file_changed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = write_file(path, random.randbytes(40 * BS))

    class Shrinker(CountingLimiter):
        def acquire(self, n: int) -> None:
            super().acquire(n)
            if len(self.requests) == 2:
                os.truncate(path, 20 * BS + 3)

    try:
        seen = []
        with pytest.raises(FileChanged) as info:
            for index, _ in file_blocks(fd, 40 * BS, limiter=Shrinker()):
                seen.append(index)
        assert seen == list(range(16))  # the first chunk, read before the shrink
        assert info.value.offset == 20 * BS + 3
        assert isinstance(info.value, ClusterrepError)
    finally:
        os.close(fd)


def test_file_shrinking_into_a_hole_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"a" * BS, 0)
        os.ftruncate(fd, 100 * BS)
        blocks = file_blocks(fd, 100 * BS)
        assert next(blocks)[0] == 0
        os.ftruncate(fd, 10)
        with pytest.raises(FileChanged):
            list(blocks)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- Hasher


def make_files(tmp_path: Path, seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    files = []
    for n in range(6):
        path = tmp_path / f"f{n}"
        size = rng.choice([0, 1, BS, 5 * BS + 17, 70 * BS, 300 * BS + 1])
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        for _ in range(rng.randrange(4)):
            if size:
                offset = rng.randrange(size)
                os.pwrite(fd, rng.randbytes(min(rng.choice([10, 3 * BS, 40 * BS]), size - offset)), offset)
        files.append((path.name, fd, size))
    return files


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threads,in_flight", [(1, 1), (2, 3), (4, 16)])
def test_parallel_hasher_equals_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int,
                                       threads: int, in_flight: int) -> None:
    monkeypatch.setattr(blockread, "WINDOW_BLOCKS", 64)  # several windows per large file
    files = make_files(tmp_path, seed)
    try:
        with Hasher(threads=threads, in_flight=in_flight) as hasher:
            results = list(hasher.manifests(files))
        assert [r.key for r in results if r.last] == [name for name, _, _ in files]
        for name, fd, size in files:
            mine = [r for r in results if r.key == name]
            assert all(r.error is None for r in mine)
            windows = [r.manifest for r in mine]
            assert [m.first for m in windows] == list(range(0, max(block_count(size), 1), 64))
            assert all(m.count <= 64 and m.size == size for m in windows)
            assert [b for m in windows for b in m.blocks()] == [h for _, h in file_blocks(fd, size)]
    finally:
        for _, fd, _ in files:
            os.close(fd)


def test_hasher_reports_a_changed_file_and_goes_on(tmp_path: Path) -> None:
    a = write_file(tmp_path / "a", b"a" * (3 * BS))
    b = write_file(tmp_path / "b", b"b" * 100)
    try:
        with Hasher() as hasher:
            results = list(hasher.manifests([("a", a, 40 * BS), ("b", b, 100)]))
        assert [(r.key, r.last, type(r.error)) for r in results] == [
            ("a", True, FileChanged), ("b", True, type(None))]
        assert results[1].manifest.blocks() == [hash_block(b"b" * 100)]
    finally:
        os.close(a)
        os.close(b)


# --------------------------------------------------------------------------- rate limiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


@given(st.lists(st.integers(1, 3 * 1024 * 1024), min_size=1, max_size=60),
       st.lists(st.floats(0, 0.5), min_size=60, max_size=60))
def test_rate_limiter_bounds_the_rate(requests: list[int], gaps: list[float]) -> None:
    clock = FakeClock()
    rate, burst = 10e6, 1e6
    limiter = RateLimiter(rate, burst=burst, clock=clock, sleep=clock.sleep)
    start, granted = clock.now, 0
    for n, gap in zip(requests, gaps, strict=False):
        clock.now += gap
        limiter.acquire(n)
        granted += n
        assert granted <= burst + rate * (clock.now - start) + 1e-3
    idle = sum(gaps[:len(requests)])
    assert clock.now - start <= idle + max(0.0, granted - burst) / rate + 1e-6  # no needless waiting


def test_rate_limiter_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0)


# --------------------------------------------------------------------------- manifests and diff

block_model = st.one_of(st.none(), st.binary(min_size=1, max_size=3).map(lambda b: b * 10))


def manifest_of(size: int, contents: list[bytes | None]) -> Manifest:
    """Manifest of a model file: block k holds ``contents[k]`` (None: a hole), padded to its length."""
    blocks = []
    for k in range(block_count(size)):
        length = min(BS, size - k * BS)
        held = contents[k] if k < len(contents) else None
        blocks.append(HOLE if held is None else hash_block((held * length)[:length]))
    return Manifest.build(size, blocks)


@settings(max_examples=300)
@given(st.integers(0, 6 * BS), st.lists(block_model, max_size=6),
       st.integers(0, 6 * BS), st.lists(block_model, max_size=6))
def test_applying_the_diff_makes_the_receiver_equal(size_a: int, a: list[bytes | None],
                                                    size_b: int, b: list[bytes | None]) -> None:
    ours, theirs = manifest_of(size_a, a), manifest_of(size_b, b)
    changed = diff_blocks(ours, theirs)
    # the receiver: ftruncate to our size (extension leaves holes), then apply the listed blocks
    result = [(b[k] if k < len(b) and k < block_count(size_b) else None) for k in range(block_count(size_a))]
    for k in changed:
        result[k] = a[k] if k < len(a) else None
    assert manifest_of(size_a, result) == ours
    assert all(ours.blocks()[k] != HOLE or k < block_count(size_b) for k in changed)


def test_diff_lists_missing_blocks_and_skips_holes_past_their_end() -> None:
    h = [hash_block(bytes([k]) * BS) for k in range(4)]
    ours = Manifest.build(4 * BS, [h[0], h[1], HOLE, h[3]])
    theirs = Manifest.build(BS, [h[0]])
    assert diff_blocks(ours, theirs) == [1, 3]
    assert diff_blocks(ours, ours) == []
    assert diff_blocks(theirs, ours) == []  # the receiver's ftruncate drops its extra blocks


def test_hole_and_zeros_differ_unless_only_content_counts() -> None:
    holes = Manifest.build(2 * BS, [HOLE, HOLE])
    zeros = Manifest.build(2 * BS, [zero_hash(BS), hash_block(b"x" * BS)])
    assert diff_blocks(holes, zeros) == [0, 1]
    assert diff_blocks(holes, zeros, allocation=False) == [1]
    assert diff_blocks(zeros, holes, allocation=False) == [1]


def test_diff_refuses_mismatched_windows() -> None:
    one = Manifest.build(3 * BS, [HOLE], first=1)
    with pytest.raises(InvalidManifest):
        diff_blocks(one, Manifest.build(3 * BS, [HOLE], first=0))
    with pytest.raises(InvalidManifest):
        diff_blocks(Manifest.build(3 * BS, [HOLE, HOLE]), Manifest.build(3 * BS, [HOLE]))


@given(st.lists(st.booleans(), max_size=80))
def test_manifest_round_trips_blocks(holes: list[bool]) -> None:
    blocks = [HOLE if hole else hash_block(bytes([k % 256])) for k, hole in enumerate(holes)]
    m = Manifest.build(len(blocks) * BS, blocks)
    assert m.blocks() == blocks
    assert Manifest(m.size, m.first, m.count, m.holes, m.digests) == m


@pytest.mark.parametrize("fields", [
    (BS, 0, 2, b"\x00", b"\x00" * 64),        # two blocks listed for a one-block file
    (2 * BS, 0, 2, b"\x00", b"\x00" * 32),    # one digest for two data blocks
    (2 * BS, 0, 2, b"\x04", b"\x00" * 64),    # a hole bit past the last block
    (2 * BS, 0, 2, b"", b"\x00" * 64),        # no bitmap
])
def test_manifest_refuses_contradictions(fields: tuple[int, int, int, bytes, bytes]) -> None:
    with pytest.raises(InvalidManifest):
        Manifest(*fields)


def test_changed_runs_merge_adjacent_sub_blocks() -> None:
    old = bytearray(random.Random(1).randbytes(BS))
    new = bytearray(old)
    for offset in (0, SUB_BLOCK + 5, 2 * SUB_BLOCK, 10 * SUB_BLOCK + 4095):
        new[offset] ^= 1
    runs = changed_runs(bytes(new), sub_digests(bytes(old)))
    assert runs == [(0, 3 * SUB_BLOCK), (10 * SUB_BLOCK, SUB_BLOCK)]
    assert changed_runs(bytes(old), sub_digests(bytes(old))) == []
    short = bytes(old[:100])
    assert changed_runs(short + b"y", sub_digests(short)) == [(0, 101)]
    assert changed_runs(bytes(old), sub_digests(bytes(old[:SUB_BLOCK]))) == [(SUB_BLOCK, BS - SUB_BLOCK)]


# --------------------------------------------------------------------------- compression


@given(st.one_of(st.binary(max_size=3000), st.binary(min_size=1, max_size=50).map(lambda b: b * 2000)))
def test_compress_round_trips(data: bytes) -> None:
    codec, payload = compress(data)
    assert decompress(codec, payload, len(data)) == data
    if codec == Codec.ZSTD:
        assert len(payload) <= 0.9 * len(data)
    else:
        assert payload == data


def test_compress_pays_or_stays_raw() -> None:
    assert compress(bytes(BS))[0] == Codec.ZSTD
    assert compress(random.randbytes(BS))[0] == Codec.RAW


def test_decompression_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(64 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(CorruptBlock):
        decompress(Codec.ZSTD, bomb, BS)
    unsized = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(64 << 20))
    with pytest.raises(CorruptBlock):
        decompress(Codec.ZSTD, unsized, BS)


@pytest.mark.parametrize("codec,payload,length", [
    (Codec.RAW, b"abc", 4),
    (Codec.ZSTD, compress(bytes(BS))[1] + b"x", BS),     # trailing bytes
    (Codec.ZSTD, compress(bytes(BS))[1] * 2, BS),        # a second frame
    (Codec.ZSTD, compress(bytes(BS))[1][:-2], BS),       # truncated
    (Codec.ZSTD, b"not zstd at all", BS),
    (7, b"abc", 3),                                      # unknown codec
    (Codec.RAW, b"", 1 << 40),                           # an absurd announced length
])
def test_decompress_refuses_what_was_not_announced(codec: int, payload: bytes, length: int) -> None:
    with pytest.raises(CorruptBlock):
        decompress(codec, payload, length)


# --------------------------------------------------------------------------- hash cache

SECOND = 1_000_000_000


def stat_of(tmp_path: Path, data: bytes) -> tuple[os.stat_result, list[Manifest]]:
    fd = write_file(tmp_path / "img", data)
    try:
        return os.fstat(fd), [Manifest.build(len(data), [h for _, h in file_blocks(fd, len(data))])]
    finally:
        os.close(fd)


def test_cache_applies_the_racy_clean_rule(tmp_path: Path) -> None:
    st_, windows = stat_of(tmp_path, b"q" * (3 * BS))
    with HashCache(tmp_path / "cache.db") as cache:
        assert not cache.store(st_, st_.st_ctime_ns + SECOND, windows)  # hashed 1 s after a change
        assert cache.lookup(st_, st_.st_ctime_ns + 10 * SECOND) is None
        assert cache.store(st_, st_.st_ctime_ns + 2 * SECOND, windows)
        entry = cache.lookup(st_, st_.st_ctime_ns + 3 * SECOND)
        assert entry is not None and list(entry.windows()) == windows
        assert cache.lookup(st_, st_.st_ctime_ns + SECOND) is None  # the clock went back


def test_cache_key_must_match(tmp_path: Path) -> None:
    st_, windows = stat_of(tmp_path, b"q" * 10)
    with HashCache(tmp_path / "cache.db") as cache:
        cache.store(st_, st_.st_ctime_ns + 5 * SECOND, windows)
        later = st_.st_ctime_ns + 9 * SECOND
        os.utime(tmp_path / "img", ns=(st_.st_atime_ns, st_.st_mtime_ns + 1))
        assert cache.lookup(os.stat(tmp_path / "img"), later) is None
        assert cache.lookup(st_, later) is not None
        cache.discard(st_)
        assert cache.lookup(st_, later) is None


def test_cache_persists_across_reopen_and_replaces_entries(tmp_path: Path) -> None:
    st_, windows = stat_of(tmp_path, random.randbytes(5 * BS + 3))
    at = st_.st_ctime_ns + 3 * SECOND
    with HashCache(tmp_path / "cache.db") as cache:
        cache.store(st_, at, [Manifest.build(st_.st_size, [HOLE] * 6)])
        cache.store(st_, at, windows)
    with HashCache(tmp_path / "cache.db") as cache:
        assert len(cache) == 1
        entry = cache.lookup(st_, at)
        assert entry is not None and list(entry.windows()) == windows


def test_cache_refuses_windows_that_do_not_cover_the_file(tmp_path: Path) -> None:
    st_, _ = stat_of(tmp_path, b"q" * (3 * BS))
    with HashCache(tmp_path / "cache.db") as cache:
        with pytest.raises(InvalidManifest):
            cache.store(st_, st_.st_ctime_ns + 3 * SECOND, [Manifest.build(st_.st_size, [HOLE])])
        assert len(cache) == 0


def test_damaged_cache_row_is_never_trusted(tmp_path: Path) -> None:
    st_, windows = stat_of(tmp_path, random.randbytes(2 * BS))
    at = st_.st_ctime_ns + 3 * SECOND
    with HashCache(tmp_path / "cache.db") as cache:
        cache.store(st_, at, windows)
    db = sqlite3.connect(tmp_path / "cache.db")
    db.execute("UPDATE windows SET digests = ?", (hash_block(b"x") + hash_block(b"y"),))
    db.commit()
    db.close()
    with HashCache(tmp_path / "cache.db") as cache:
        entry = cache.lookup(st_, at)
        assert entry is not None
        with pytest.raises(CacheCorrupt):
            list(entry.windows())
        assert cache.lookup(st_, at) is None  # dropped


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_torn_cache_file_gives_no_wrong_hash(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "cache.db"
    entries = []
    with HashCache(path) as cache:
        for n in range(40):
            data = random.Random(n).randbytes(n * 3000 + 1)
            (tmp_path / f"f{n}").write_bytes(data)
            st_ = os.stat(tmp_path / f"f{n}")
            windows = [Manifest.build(len(data), expected_blocks(data))]
            cache.store(st_, st_.st_ctime_ns + 3 * SECOND, windows)
            entries.append((st_, windows))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size // 3)
            f.write(random.Random(9).randbytes(size // 3))
    with HashCache(path) as cache:
        for st_, windows in entries:
            entry = cache.lookup(st_, st_.st_ctime_ns + 4 * SECOND)
            if entry is None:
                continue
            try:
                got = list(entry.windows())
            except CacheCorrupt:
                continue
            assert got == windows
