#!/usr/bin/env python3
"""Benchmark: 4 KiB write events through the merger alone, and through merge + apply.

Baseline, measured in the same run on the same disk: a plain ``os.pwrite`` loop writing the
same bytes at the same offsets of the same files, followed by one ``fsync`` per file (the
applier makes its output durable at every checkpoint, so the baseline does too at its end).

The last line is machine-readable: ``merge_eps=<int> apply_ratio=<float>``.
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

from clusterrep.events import Create, Event, Join, Mkdir, Tick, Write
from clusterrep.replica.applier import Applier
from clusterrep.replica.merger import Merger

BLOCK = 4096


Streams = dict[str, list[Event]]


def make_streams(nodes: int, events: int, file_mib: int, seed: int) -> tuple[list[Event], Streams]:
    """Coordinator events (joins, a directory, one image per node) and each node's writes."""
    rng = random.Random(seed)
    names = [f"h{i + 1}" for i in range(nodes)]
    meta: list[Event] = []
    g = 0

    def m(cls: type, origin: str, **kw: object) -> None:
        nonlocal g
        g += 1
        meta.append(cls(source="coordinator", seq=g, gseq=g, op_id=f"{origin}-{g}", origin=origin, **kw))

    for n in names:
        m(Join, n)
    m(Mkdir, names[0], path="vms", mode=0o755)
    for n in names:
        m(Create, n, path=f"vms/{n}.img", mode=0o600)
    blocks = file_mib * 1024 * 1024 // BLOCK
    payloads = [rng.randbytes(BLOCK) for _ in range(64)]
    streams: dict[str, list[Event]] = {}
    per_node = events // nodes
    for n in names:
        evs: list[Event] = [
            Write(source=n, seq=k + 1, after=g, path=f"vms/{n}.img",
                  offset=rng.randrange(blocks) * BLOCK, data=payloads[k % 64])
            for k in range(per_node)
        ]
        evs.append(Tick(source=n, seq=per_node + 1, after=g))
        streams[n] = evs
    return meta, streams


def interleave(meta: list[Event], streams: dict[str, list[Event]], batch: int) -> list[list[Event]]:
    """Batches as a replica receives them: the coordinator first, then nodes round-robin."""
    out = [meta]
    longest = max(len(s) for s in streams.values())
    for i in range(0, longest, batch):
        for evs in streams.values():
            if i < len(evs):
                out.append(evs[i:i + batch])
    return out


def bench_merge(batches: list[list[Event]]) -> tuple[float, int]:
    merger = Merger()
    emitted = 0
    start = time.perf_counter()
    for b in batches:
        merger.add(b)
        emitted += len(merger.drain())
    return time.perf_counter() - start, emitted


def bench_apply(batches: list[list[Event]], workdir: Path) -> float:
    target, state = workdir / "target", workdir / "state"
    target.mkdir()
    merger = Merger()
    applier = Applier(target, state)
    start = time.perf_counter()
    for b in batches:
        merger.add(b)
        applier.apply(merger.drain())
    applier.close()  # final checkpoint: syncfs + durable checkpoint file
    return time.perf_counter() - start


def bench_baseline(streams: dict[str, list[Event]], workdir: Path, batch: int) -> float:
    """Plain pwrite of the same bytes to the same files, in the same interleaving."""
    base = workdir / "baseline"
    base.mkdir()
    fds = {n: os.open(base / f"{n}.img", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for n in streams}
    lists = {
        n: [(fds[n], ev.offset, ev.data) for ev in evs if isinstance(ev, Write)]
        for n, evs in streams.items()
    }
    # same round-robin interleaving as the replica sees
    order: list[tuple[int, int, bytes]] = []
    longest = max(len(v) for v in lists.values())
    for i in range(0, longest, batch):
        for v in lists.values():
            order.extend(v[i:i + batch])
    assert len(order) == sum(len(v) for v in lists.values())
    pwrite = os.pwrite
    start = time.perf_counter()
    for fd, offset, data in order:
        pwrite(fd, data, offset)
    for fd in fds.values():
        os.fsync(fd)
    elapsed = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="4 KiB write events (default 200000)")
    ap.add_argument("--nodes", type=int, default=2, help="nodes writing one image each (default 2)")
    ap.add_argument("--file-mib", type=int, default=256, help="size of each image in MiB (default 256)")
    ap.add_argument("--batch", type=int, default=256, help="events per received batch (default 256)")
    ap.add_argument("--rounds", type=int, default=3, help="repeat and keep the best (default 3)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args(argv)

    meta, streams = make_streams(args.nodes, args.events, args.file_mib, seed=1)
    batches = interleave(meta, streams, args.batch)
    total = sum(len(b) for b in batches)
    mib = sum(len(ev.data) for evs in streams.values() for ev in evs if isinstance(ev, Write)) / 2**20
    print(f"{total} events ({mib:.0f} MiB of 4 KiB writes) from {args.nodes} nodes, "
          f"batches of {args.batch}, best of {args.rounds}")

    merge_t = min(bench_merge(batches)[0] for _ in range(args.rounds))
    _, emitted = bench_merge(batches)
    assert emitted == total, (emitted, total)
    apply_t = base_t = float("inf")
    for r in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="cr-bench-", dir=args.dir))
        try:
            # start each measurement with no dirty pages, and alternate which goes first
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                os.sync()
                if which == 0:
                    base_t = min(base_t, bench_baseline(streams, work, args.batch))
                else:
                    apply_t = min(apply_t, bench_apply(batches, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    merge_eps = total / merge_t
    apply_eps = total / apply_t
    base_eps = total / base_t
    ratio = apply_eps / base_eps
    print(f"merger alone        {merge_eps:12,.0f} events/s")
    print(f"merge + apply       {apply_eps:12,.0f} events/s  {mib / apply_t:8.1f} MiB/s")
    print(f"baseline pwrite     {base_eps:12,.0f} events/s  {mib / base_t:8.1f} MiB/s")
    print(f"ratio merge+apply / baseline: {ratio:.2f}")
    print(f"merge_eps={int(merge_eps)} apply_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
