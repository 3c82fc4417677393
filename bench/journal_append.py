#!/usr/bin/env python3
"""Benchmark: appending 4 KiB records to the journal, durable after each batch or each record.

Two journal runs: batches of 64 records with one ``sync`` per batch (group commit, as the
replica acknowledges a received batch), and one record per ``append`` + ``sync`` (the worst
case: a node that must make every event durable on its own).

Baseline, measured in the same run on the same file system: the same payload bytes appended to
one file with one plain ``os.write`` per batch (the batch joined beforehand, outside the timing)
and one ``os.fsync`` per batch (resp. per record). The journal adds a 16-byte header and a CRC-32
per record, joining the batch, segment files (one roll per 64 MiB: fsync + create + directory
fsync) and its locking and bookkeeping.

The last line is machine-readable: ``journal_batch_ratio=<float> journal_single_ratio=<float>``
(journal records/s divided by baseline records/s; 1.0 means no overhead).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from clusterrep.journal import Journal

RECORD = 4096


def make_records(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    distinct = [rng.randbytes(RECORD) for _ in range(64)]
    return [distinct[k % 64] for k in range(count)]


def bench_journal(records: list[bytes], batch: int, directory: Path) -> float:
    journal = Journal(directory)
    try:
        start = time.perf_counter()
        for i in range(0, len(records), batch):
            journal.append(records[i:i + batch])
            journal.sync()
        elapsed = time.perf_counter() - start
        assert journal.durable_index == len(records) + 1
    finally:
        journal.close()
    return elapsed


def bench_baseline(records: list[bytes], batch: int, path: Path) -> float:
    """One ``os.write`` of each batch's bytes (joined beforehand, untimed), one ``os.fsync`` per batch."""
    batches = [b"".join(records[i:i + batch]) for i in range(0, len(records), batch)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write, fsync = os.write, os.fsync
        start = time.perf_counter()
        for data in batches:
            view = memoryview(data)
            while view:
                view = view[write(fd, view):]
            fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def measure(records: list[bytes], batch: int, rounds: int, workdir: str | None) -> tuple[float, float]:
    """Best time of ``rounds`` for the journal and for the baseline, alternating which goes first."""
    journal_t = base_t = float("inf")
    for r in range(rounds):
        work = Path(tempfile.mkdtemp(prefix="cr-bench-journal-", dir=workdir))
        try:
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                os.sync()  # start each measurement with no dirty pages
                if which == 0:
                    base_t = min(base_t, bench_baseline(records, batch, work / f"baseline{r}"))
                else:
                    journal_t = min(journal_t, bench_journal(records, batch, work / f"journal{r}"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return journal_t, base_t


def report(label: str, count: int, journal_t: float, base_t: float) -> float:
    mib = count * RECORD / 2**20
    ratio = base_t / journal_t
    print(f"{label:28s} journal  {count / journal_t:10,.0f} records/s {mib / journal_t:8.1f} MB/s")
    print(f"{'':28s} baseline {count / base_t:10,.0f} records/s {mib / base_t:8.1f} MB/s")
    print(f"{'':28s} ratio journal/baseline {ratio:.2f}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=32768, help="records for the batch run (default 32768)")
    ap.add_argument("--batch", type=int, default=64, help="records per append + sync (default 64)")
    ap.add_argument("--single-records", type=int, default=2048,
                    help="records for the one-record-per-sync run (default 2048)")
    ap.add_argument("--rounds", type=int, default=3, help="repeat and keep the best (default 3)")
    ap.add_argument("--dir", default=None, help="work directory on the disk to measure (default: a temp dir)")
    args = ap.parse_args(argv)

    print(f"{RECORD}-byte records; batch run: {args.records} in batches of {args.batch}; "
          f"single run: {args.single_records}; best of {args.rounds}; MB = MiB of payload")
    batch_records = make_records(args.records, seed=1)
    single_records = make_records(args.single_records, seed=2)
    batch_ratio = report(f"batch of {args.batch}, sync each", args.records,
                         *measure(batch_records, args.batch, args.rounds, args.dir))
    single_ratio = report("single record, sync each", args.single_records,
                          *measure(single_records, 1, args.rounds, args.dir))
    print(f"journal_batch_ratio={batch_ratio:.3f} journal_single_ratio={single_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
