"""Race torture: three hosts, several processes each, hammering a few names at once.

Checks the semantics of one file system, not only the bytes: at most one exclusive success per
name (O_EXCL creates and RENAME_NOREPLACE renames), a shared log grows by exactly the records
appended, intact, lock holders never overlap (a counter incremented under a POSIX lock and one
under a flock lost no increment), and then the replica equals the volume byte for byte, with
the same owners, modes, times, extended attributes and hard links (the churn links names,
exchanges them, sets and removes xattrs, changes owners and punches holes).

The seed is logged; ``CLUSTERREP_SEED`` repeats one, ``CLUSTERREP_TORTURE_SECONDS`` sets how
long each round hammers (bench/soak.sh runs it with fresh seeds for as long as asked).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import multiprocessing as mp
import os
import random
from pathlib import Path
from typing import Any

import pytest

from clusterrep.localcluster import LocalCluster

log = logging.getLogger("faults")
NODES = ("h1", "h2", "h3")
PROCS_PER_NODE = 3
NAMES = 6  # n0..n5: created, written, truncated, renamed over each other, unlinked
EXCL = 40  # x0..x39: only ever created exclusively (never removed)
RECORD = 32  # bytes per appended log record
ALLOWED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR,
           errno.ENODATA}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, 0x03, offset, length) != 0:  # PUNCH_HOLE | KEEP_SIZE
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _noreplace(src: Path, dst: Path) -> bool:
    if _libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:
        return True
    err = ctypes.get_errno()
    if err != errno.EEXIST:
        raise OSError(err, os.strerror(err), str(dst))
    return False


class Worker:
    def __init__(self, mnt: Path, wid: str, seed: int, seconds: float) -> None:
        self.m, self.wid, self.rng = mnt, wid, random.Random(seed)
        self.seconds = seconds
        self.last = ""  # the churn operation last tried (named in an unexpected error)
        self.out: dict[str, Any] = {"excl": [], "appended": 0, "posix": 0, "flock": 0,
                                    "overlap": [], "unexpected": []}

    def run(self) -> dict[str, Any]:
        import time
        end = time.monotonic() + self.seconds
        ops = [self.exclusive, self.append, self.posix_counter, self.flock_counter, self.churn,
               self.churn, self.churn]
        while time.monotonic() < end:
            op = self.rng.choice(ops)
            try:
                op()
            except OSError as exc:
                if exc.errno not in ALLOWED:
                    self.out["unexpected"].append(f"{op.__name__} {self.last}: {exc!r}")
        return self.out

    def exclusive(self) -> None:
        name = self.m / f"x{self.rng.randrange(EXCL)}"
        if self.rng.random() < 0.5:
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return
            os.write(fd, self.wid.encode())
            os.close(fd)
            self.out["excl"].append(name.name)
        else:
            tmp = self.m / f"tmp-{self.wid}"
            tmp.write_text(self.wid)
            if _noreplace(tmp, name):
                self.out["excl"].append(name.name)
            else:
                tmp.unlink()

    def append(self) -> None:
        fd = os.open(self.m / "log", os.O_WRONLY | os.O_APPEND)
        try:
            for _ in range(self.rng.randrange(1, 6)):
                n = self.out["appended"]
                os.write(fd, f"{self.wid}:{n}".ljust(RECORD - 1, ".").encode() + b"\n")
                self.out["appended"] = n + 1
        finally:
            os.close(fd)

    def _under_lock(self, path: Path, kind: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            if kind == "posix":
                fcntl.lockf(fd, fcntl.LOCK_EX)  # F_SETLKW
            else:
                fcntl.flock(fd, fcntl.LOCK_EX)
            # the holder writes its id, then checks nobody else wrote theirs meanwhile
            os.pwrite(fd, self.wid.ljust(16).encode(), 32)
            value = int(os.pread(fd, 20, 0) or b"0")
            os.pwrite(fd, f"{value + 1:020d}".encode(), 0)
            seen = os.pread(fd, 16, 32).decode().strip()
            if seen != self.wid:
                self.out["overlap"].append(f"{kind}: {seen} wrote while {self.wid} held the lock")
            self.out[kind] += 1
            if kind == "posix":
                fcntl.lockf(fd, fcntl.LOCK_UN)
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def posix_counter(self) -> None:
        self._under_lock(self.m / "posix-counter", "posix")

    def flock_counter(self) -> None:
        self._under_lock(self.m / "flock-counter", "flock")

    def churn(self) -> None:
        r = self.rng
        a, b = self.m / f"n{r.randrange(NAMES)}", self.m / f"n{r.randrange(NAMES)}"
        op = r.randrange(11)
        self.last = f"op {op} on {a.name}, {b.name}"
        if op == 0:
            fd = os.open(a, os.O_CREAT | os.O_WRONLY | (os.O_TRUNC if r.random() < 0.3 else 0), 0o644)
            os.pwrite(fd, r.randbytes(r.randrange(1, 9000)), r.randrange(0, 20000))
            if r.random() < 0.3:
                os.fsync(fd)
            os.close(fd)
        elif op == 1:
            os.truncate(a, r.randrange(0, 30000))
        elif op == 2:
            os.rename(a, b)
        elif op == 3:
            if r.random() < 0.5:
                _noreplace(a, b)
            else:
                os.unlink(a)
        elif op == 4:
            fd = os.open(a, os.O_RDWR)
            try:
                os.pwrite(fd, self.wid.encode(), r.randrange(0, 10000))
                os.ftruncate(fd, r.randrange(0, 12000))  # on the open file, whatever its name
            finally:
                os.close(fd)
        elif op == 5:
            os.chmod(a, r.choice((0o600, 0o644, 0o640)))
        elif op == 6:
            os.link(a, b)  # (both names then lead to one inode: writes through either)
        elif op == 7:
            _exchange(a, b)
        elif op == 8:
            if r.random() < 0.7:
                os.setxattr(a, f"user.k{r.randrange(3)}", r.randbytes(r.randrange(0, 200)))
            else:
                os.removexattr(a, f"user.k{r.randrange(3)}")
        elif op == 9:
            os.chown(a, r.choice((0, 1000, 4242)), r.choice((0, 100, 4242)))
        else:
            fd = os.open(a, os.O_RDWR)
            try:
                _punch(fd, r.randrange(0, 16384), r.randrange(1, 8192))
            finally:
                os.close(fd)


def _work(mnt: str, wid: str, seed: int, seconds: float, barrier: Any, q: Any) -> None:
    try:
        barrier.wait(60)
        q.put((wid, Worker(Path(mnt), wid, seed, seconds).run()))
    except BaseException as exc:  # reported, never silently lost
        q.put((wid, {"crash": repr(exc)}))


def _round(make_cluster: Any, identical: Any, seed: int, seconds: float) -> None:
    cluster: LocalCluster = make_cluster(NODES)
    m1 = cluster.mount("h1")
    (m1 / "log").write_bytes(b"")
    for name in ("posix-counter", "flock-counter"):
        (m1 / name).write_bytes(f"{0:020d}".encode())
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(len(NODES) * PROCS_PER_NODE), ctx.Queue()
    procs = []
    for i, node in enumerate(NODES):
        for p in range(PROCS_PER_NODE):
            wid = f"{node}.{p}"
            procs.append(ctx.Process(target=_work, args=(str(cluster.mount(node)), wid,
                                                         seed * 1000 + i * 10 + p, seconds, barrier, q)))
    for proc in procs:
        proc.start()
    results = dict(q.get(timeout=seconds + 120) for _ in procs)
    for proc in procs:
        proc.join(30)
    crashed = {w: r["crash"] for w, r in results.items() if "crash" in r}
    assert not crashed, f"seed {seed}: workers crashed: {crashed}"
    unexpected = {w: r["unexpected"][:5] for w, r in results.items() if r["unexpected"]}
    assert not unexpected, f"seed {seed}: unexpected errors: {unexpected}"

    # at most one exclusive success per name, and the winner's content is there
    winners: dict[str, list[str]] = {}
    for wid, r in results.items():
        for name in r["excl"]:
            winners.setdefault(name, []).append(wid)
    twice = {n: w for n, w in winners.items() if len(w) > 1}
    assert not twice, f"seed {seed}: exclusive create/rename succeeded more than once: {twice}"
    for name, (wid,) in winners.items():
        assert (m1 / name).read_text() == wid, f"seed {seed}: {name} is not {wid}'s"

    # the log holds every appended record once, intact
    data = (m1 / "log").read_bytes()
    total = sum(r["appended"] for r in results.values())
    assert len(data) == total * RECORD, f"seed {seed}: log {len(data)} bytes, {total} records appended"
    records = [data[i:i + RECORD] for i in range(0, len(data), RECORD)]
    expected = {f"{w}:{n}".ljust(RECORD - 1, ".").encode() + b"\n"
                for w, r in results.items() for n in range(r["appended"])}
    assert set(records) == expected and len(set(records)) == len(records), \
        f"seed {seed}: the log's records are not exactly the appended ones"

    # lock holders never overlapped, and no increment was lost
    overlaps = [o for r in results.values() for o in r["overlap"]]
    assert not overlaps, f"seed {seed}: lock holders overlapped: {overlaps[:5]}"
    for kind in ("posix", "flock"):
        count = sum(r[kind] for r in results.values())
        value = int((m1 / f"{kind}-counter").read_bytes()[:20] or b"0")
        assert value == count, f"seed {seed}: {kind} counter {value}, {count} increments made"
    identical(cluster, timeout=120)


SEEDS = int(os.environ.get("CLUSTERREP_TORTURE_ROUNDS", "3"))


@pytest.mark.parametrize("round_no", range(SEEDS))
def test_race_torture_three_hosts_many_processes(make_cluster, identical, round_no: int) -> None:
    seed = int(os.environ.get("CLUSTERREP_SEED", random.randrange(1 << 30))) + round_no
    seconds = float(os.environ.get("CLUSTERREP_TORTURE_SECONDS", "8"))
    log.warning("race torture round %d: seed %d, %g s", round_no, seed, seconds)
    print(f"race torture seed {seed}")
    _round(make_cluster, identical, seed, seconds)
