#!/usr/bin/env python3
"""Benchmark: the block layer's figures (clusterrep.blocks, clusterrep.blockread).

1. BLAKE3 throughput per block size, one thread, data in memory (median of 5 runs).
2. ``Hasher`` over a 512 MiB file in the page cache: 1 thread against 2 (and ``blake3``'s own
   ``max_threads`` on 1 MiB inputs, for comparison).
3. A 1 TiB sparse file holding 10 MiB: time to hash it.
4. zstd per 64 KiB block on a VM-image-like sample (shared libraries and Python sources, 15% zero
   blocks, 20% random blocks): ratio and MB/s per level.

The host is shared, so figures vary by about ±30% between runs. The last line is machine-readable:
``hash64k_mbps=<f> hasher_speedup=<f> sparse_tib_s=<f> zstd3_ratio=<f>``.
"""

from __future__ import annotations

import glob
import os
import random
import statistics
import tempfile
import time

import blake3
import zstandard

from clusterrep.blockread import Hasher, file_blocks
from clusterrep.blocks import BLOCK_SIZE, MIN_SAVING


def hash_rate(block: int, total: int = 128 << 20) -> float:
    data = memoryview(os.urandom(total))
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for at in range(0, total, block):
            blake3.blake3(data[at:at + block]).digest()
        runs.append(total / (time.perf_counter() - start) / 1e6)
    return statistics.median(runs)


def hasher_rate(fd: int, size: int, threads: int) -> float:
    runs = []
    for _ in range(5):
        with Hasher(threads=threads, in_flight=8) as hasher:
            start = time.perf_counter()
            results = list(hasher.manifests([("f", fd, size)]))
            runs.append(size / (time.perf_counter() - start) / 1e6)
        assert all(r.error is None for r in results)
    return statistics.median(runs)


def serial_rate(fd: int, size: int) -> float:
    start = time.perf_counter()
    for _ in file_blocks(fd, size):
        pass
    return size / (time.perf_counter() - start) / 1e6


def sparse_seconds(directory: str) -> float:
    path = os.path.join(directory, "sparse")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 << 40)
        rng = random.Random(1)
        for _ in range(10):
            os.pwrite(fd, rng.randbytes(1 << 20), rng.randrange(1 << 40) & ~4095)
        start = time.perf_counter()
        with Hasher() as hasher:
            windows = [r.manifest for r in hasher.manifests([("s", fd, 1 << 40)])]
        elapsed = time.perf_counter() - start
        assert sum(m.count for m in windows if m) == (1 << 40) // BLOCK_SIZE
        return elapsed
    finally:
        os.close(fd)
        os.unlink(path)


def vm_like_sample(size: int = 128 << 20) -> bytes:
    parts = []
    for path in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*"))[:400] + \
            sorted(glob.glob("/usr/lib/python3*/**/*.py", recursive=True))[:3000]:
        try:
            with open(path, "rb") as f:
                parts.append(f.read())
        except OSError:
            pass
    body = b"".join(parts)[:96 << 20] or os.urandom(1 << 20) * 8
    rng, sample = random.Random(1), bytearray()
    while len(sample) < size:
        roll = rng.random()
        if roll < 0.15:
            sample += bytes(BLOCK_SIZE)
        elif roll < 0.35:
            sample += rng.randbytes(BLOCK_SIZE)
        else:
            at = rng.randrange(max(1, len(body) - BLOCK_SIZE))
            sample += body[at:at + BLOCK_SIZE].ljust(BLOCK_SIZE, b"\0")
    return bytes(sample)


def zstd_figures(sample: bytes, level: int) -> tuple[float, float]:
    cctx = zstandard.ZstdCompressor(level=level)
    out, start = 0, time.perf_counter()
    for at in range(0, len(sample), BLOCK_SIZE):
        frame = cctx.compress(sample[at:at + BLOCK_SIZE])
        out += len(frame) if len(frame) <= BLOCK_SIZE * (1 - MIN_SAVING) else BLOCK_SIZE
    return len(sample) / out, len(sample) / (time.perf_counter() - start) / 1e6


def main() -> None:
    print(f"cpus={os.cpu_count()} block_size={BLOCK_SIZE}")
    figures = {}
    for block in (4096, 16384, 65536, 131072, 1 << 20, 4 << 20):
        figures[block] = hash_rate(block)
        print(f"blake3 {block >> 10:5d} KiB blocks: {figures[block]:7.0f} MB/s (1 thread)")
    big = os.urandom(4 << 20)
    for threads in (1, 2):
        start = time.perf_counter()
        for _ in range(64):
            blake3.blake3(big, max_threads=threads).digest()
        rate = 256 * 1.048576 / (time.perf_counter() - start)
        print(f"blake3 4 MiB inputs, max_threads={threads}: {rate:.0f} MB/s")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as directory:
        path = os.path.join(directory, "img")
        with open(path, "wb") as f:
            for _ in range(512):
                f.write(os.urandom(1 << 20))
        fd = os.open(path, os.O_RDONLY)
        try:
            serial_rate(fd, 512 << 20)  # warm the page cache
            serial = statistics.median(serial_rate(fd, 512 << 20) for _ in range(3))
            one, two = hasher_rate(fd, 512 << 20, 1), hasher_rate(fd, 512 << 20, 2)
        finally:
            os.close(fd)
        print(f"file_blocks (serial): {serial:.0f} MB/s; Hasher 1 thread {one:.0f} MB/s, "
              f"2 threads {two:.0f} MB/s (x{two / one:.2f})")
        sparse = sparse_seconds(directory)
        print(f"1 TiB sparse file holding 10 MiB hashed in {sparse:.2f} s")
    sample = vm_like_sample()
    for level in (1, 3, 6):
        ratio, rate = zstd_figures(sample, level)
        print(f"zstd level {level} per 64 KiB block: ratio {ratio:.2f}, {rate:.0f} MB/s")
    ratio3, _ = zstd_figures(sample, 3)
    print(f"hash64k_mbps={figures[65536]:.0f} hasher_speedup={two / one:.2f} "
          f"sparse_tib_s={sparse:.2f} zstd3_ratio={ratio3:.2f}")


if __name__ == "__main__":
    main()
