"""Shared-volume semantics across hosts (issue 8): what one host does must be seen, and respected,
by the other, as on one local file system, and the replica must stay identical to the volume.

Every workload runs in a forked process with a deadline, so a file-system call that hangs makes
the test fail instead of hanging it; the two "hosts" (two processes, one per mount) meet at a
barrier before each round so that they act at the same moment.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import multiprocessing
import os
import queue
import select
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from clusterrep.localcluster import LocalCluster

CTX = multiprocessing.get_context("fork")
BARRIER_TIMEOUT = 20.0
AT_FDCWD = -100
RENAME_NOREPLACE = 1
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
# struct flock on 64-bit Linux (x86_64): short l_type, short l_whence, (4 bytes padding),
# off_t l_start, off_t l_len, pid_t l_pid, (4 bytes padding): 32 bytes
FLOCK = "hhqqi4x"
assert struct.calcsize(FLOCK) == 32
T_NS = 1_600_000_000_123_456_789  # a recognisable timestamp for utime
_UMASK = os.umask(0o022)
os.umask(_UMASK)
MODE_644 = 0o644 & ~_UMASK  # what open(..., 0o644) gives


# -- helpers --------------------------------------------------------------------------------


def _err(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _try(fn: Callable[[], Any]) -> Any:
    """The call's result, or the name of the errno it failed with (e.g. ``"ESTALE"``)."""
    try:
        return fn()
    except OSError as exc:
        return _err(exc)


def _run(workers: dict[str, Callable[[Any], Any]], timeout: float) -> dict[str, Any]:
    """Run each worker in its own forked process, all sharing one barrier; return their results.

    A worker that does not finish within ``timeout`` seconds (a hung file-system call) is killed
    and the test fails; so does a worker that raises."""
    barrier = CTX.Barrier(len(workers))
    results: Any = CTX.Queue()

    def main(name: str, fn: Callable[[Any], Any]) -> None:
        try:
            out: tuple[str, Any] = ("ok", fn(barrier))
        except BaseException as exc:
            out = ("raised", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        results.put((name, out))

    procs = {name: CTX.Process(target=main, args=(name, fn), daemon=True)
             for name, fn in workers.items()}
    for p in procs.values():
        p.start()
    got: dict[str, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            name, out = results.get(timeout=0.2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs.values()):
                break  # every worker has ended; one died without an answer
            continue
        got[name] = out
    for name, p in procs.items():
        p.join(5 if name in got else 0.5)
        if p.is_alive():
            p.kill()
            p.join(5)
    died = {n: p.exitcode for n, p in procs.items() if n not in got and p.exitcode is not None
            and p.exitcode != -signal.SIGKILL}
    if died:
        pytest.fail(f"worker(s) died without an answer, exit codes: {died}")
    hung = sorted(set(procs) - set(got))
    if hung:
        pytest.fail(f"{', '.join(hung)} did not finish within {timeout:g} s: a file-system call hangs")
    raised = {n: out[1] for n, out in got.items() if out[0] == "raised"}
    if raised:
        pytest.fail("a worker raised:\n" + "\n".join(f"[{n}] {t}" for n, t in raised.items()))
    return {n: out[1] for n, out in got.items()}


def _do(fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Run ``fn`` in a forked process with a deadline (setup steps through a mount)."""
    return _run({"step": lambda _barrier: fn()}, timeout)["step"]


HOLDER = r"""
import fcntl, os, struct, sys
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
elif kind == "posix":
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)  # bytes 0..99
elif kind == "ofd":  # as QEMU's image locking: F_OFD_SETLK on single bytes
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 100, 1, 0))
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 200, 1, 0))
print("held", flush=True)
sys.stdin.read()  # hold until the test closes our stdin
"""


@contextmanager
def _holding(kind: str, path: Path, timeout: float = 15.0) -> Iterator[None]:
    """A separate process holds a lock of ``kind`` on ``path`` for the duration of the block."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""  # type: ignore[union-attr]
        if line.strip() != b"held":
            proc.kill()
            _, err = proc.communicate(timeout=5)
            pytest.fail(f"the {kind} lock holder on {path} did not take its lock within {timeout:g} s:"
                        f" {err.decode(errors='replace')[-1500:]}")
        yield
    finally:
        if proc.poll() is None:
            proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _flock_struct(l_type: int, start: int, length: int) -> bytes:
    return struct.pack(FLOCK, l_type, os.SEEK_SET, start, length, 0)


def _ofd(fd: int, cmd: int, l_type: int, start: int, length: int) -> Any:
    """F_OFD_SETLK: "granted" or the errno name; F_OFD_GETLK: the l_type the kernel returned."""
    try:
        out = fcntl.fcntl(fd, cmd, _flock_struct(l_type, start, length))
    except OSError as exc:
        return _err(exc)
    return struct.unpack(FLOCK, out)[0] if cmd == F_OFD_GETLK else "granted"


def _lockf(fd: int, cmd: int, length: int, start: int) -> str:
    try:
        fcntl.lockf(fd, cmd, length, start)
    except OSError as exc:
        return _err(exc)
    return "granted"


def _read_at(dirfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _write_files(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        path.write_bytes(data)


# -- input 1 ----------------------------------------------------------------------------------


def test_rename_racing_an_open_for_write_on_another_host_leaves_replica_identical(
        identical, cluster: LocalCluster) -> None:
    """Issue 8 input 1: for each i, at the same moment, h1 renames ``s{i}`` over ``t{i}`` and h2
    opens ``t{i}`` for writing and writes ``H2``. Whichever of the two files h2's open reached, the
    replica must end equal to the volume (today about a third of the names end ``H2om-h1 i`` on
    the volume and ``from-h1 i`` on the replica: the write is recorded against the other file)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    n = 60
    files = {m1 / f"s{i}": f"from-h1 {i}".encode() for i in range(n)}
    files.update({m1 / f"t{i}": f"original {i}".encode() for i in range(n)})
    _do(lambda: _write_files(files))

    def h1(barrier: Any) -> list[tuple[int, str]]:
        errors = []
        for i in range(n):
            barrier.wait(BARRIER_TIMEOUT)
            try:
                os.rename(m1 / f"s{i}", m1 / f"t{i}")
            except OSError as exc:
                errors.append((i, f"rename: {_err(exc)}"))
        return errors

    def h2(barrier: Any) -> list[tuple[int, str]]:
        errors = []
        for i in range(n):
            barrier.wait(BARRIER_TIMEOUT)
            try:
                fd = os.open(m2 / f"t{i}", os.O_WRONLY)
                try:
                    os.write(fd, b"H2")
                finally:
                    os.close(fd)
            except OSError as exc:
                errors.append((i, f"open/write/close: {_err(exc)}"))
        return errors

    out = _run({"h1": h1, "h2": h2}, timeout=60)
    identical(cluster, timeout=60)
    assert out == {"h1": [], "h2": []}, f"operations failed: {out}"
    for i in range(n):
        assert not (cluster.volume / f"s{i}").exists()
        assert (cluster.volume / f"t{i}").read_text() in (f"from-h1 {i}", f"H2om-h1 {i}")


# -- input 2 ----------------------------------------------------------------------------------


def test_rename_noreplace_and_exclusive_create_of_one_name_on_two_hosts_let_exactly_one_win(
        identical, cluster: LocalCluster) -> None:
    """Issue 8 input 2: for each of 100 names, at the same moment, h1 renames ``s{i}`` to ``t{i}``
    with ``renameat2(RENAME_NOREPLACE)`` and h2 creates ``t{i}`` with ``O_CREAT|O_EXCL``. Exactly
    one of them may succeed per name, the other must fail with EEXIST, the volume must hold the
    winner's file and the replica must be identical (today both succeed for about 65 of 100)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    n = 100
    _do(lambda: _write_files({m1 / f"s{i}": f"renamed {i}".encode() for i in range(n)}))

    def h1(barrier: Any) -> list[str]:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                   ctypes.c_uint]
        out = []
        for i in range(n):
            old, new = os.fsencode(m1 / f"s{i}"), os.fsencode(m1 / f"t{i}")
            barrier.wait(BARRIER_TIMEOUT)
            rc = libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, RENAME_NOREPLACE)
            out.append("ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), "?"))
        return out

    def h2(barrier: Any) -> list[str]:
        out = []
        for i in range(n):
            barrier.wait(BARRIER_TIMEOUT)
            try:
                fd = os.open(m2 / f"t{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as exc:
                out.append(_err(exc))
                continue
            try:
                os.write(fd, f"created {i}".encode())
                out.append("ok")
            except OSError as exc:
                out.append(f"write: {_err(exc)}")
            finally:
                os.close(fd)
        return out

    out = _run({"h1": h1, "h2": h2}, timeout=60)
    both = [i for i in range(n) if out["h1"][i] == "ok" and out["h2"][i] == "ok"]
    assert not both, (f"RENAME_NOREPLACE on h1 and O_CREAT|O_EXCL on h2 both succeeded for {len(both)}"
                      f" of {n} names: {both}")
    wrong = {i: (out["h1"][i], out["h2"][i]) for i in range(n)
             if sorted((out["h1"][i], out["h2"][i])) != ["EEXIST", "ok"]}
    assert not wrong, f"expected one 'ok' and one EEXIST per name, (rename, create) got: {wrong}"
    for i in range(n):
        renamed = out["h1"][i] == "ok"
        assert (cluster.volume / f"s{i}").exists() != renamed
        assert (cluster.volume / f"t{i}").read_text() == (f"renamed {i}" if renamed else f"created {i}")
    identical(cluster, timeout=60)


# -- input 3 ----------------------------------------------------------------------------------


def test_open_o_creat_of_one_name_on_two_hosts_at_once_opens_one_file_on_both(
        identical, cluster: LocalCluster) -> None:
    """Issue 8 input 3: both hosts ``open(name, O_CREAT|O_WRONLY|O_APPEND)`` the same new name at
    the same moment (50 names). Without O_EXCL both opens must succeed and open the same file:
    each host then appends its own line (h1 first, then h2) and the file ends with both lines;
    the replica is identical (today 19-24 of the 50 opens fail with EEXIST)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    n = 50

    def host(name: str, mnt: Path, turn: int) -> Callable[[Any], list[tuple[int, str]]]:
        def run(barrier: Any) -> list[tuple[int, str]]:
            errors = []
            for i in range(n):
                barrier.wait(BARRIER_TIMEOUT)
                try:
                    fd: int | None = os.open(mnt / f"c{i}", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
                except OSError as exc:
                    fd = None
                    errors.append((i, f"open: {_err(exc)}"))
                for t in (0, 1):  # both hosts hold the file open; h1 appends, then h2
                    barrier.wait(BARRIER_TIMEOUT)
                    if t == turn and fd is not None:
                        try:
                            os.write(fd, f"{name} line {i}\n".encode())
                        except OSError as exc:
                            errors.append((i, f"write: {_err(exc)}"))
                if fd is not None:
                    os.close(fd)
            return errors
        return run

    out = _run({"h1": host("h1", m1, 0), "h2": host("h2", m2, 1)}, timeout=60)
    failed = [(h, i, what) for h, errors in out.items() for i, what in errors]
    assert not failed, (f"{len(failed)} of {2 * n} opens/writes failed (O_CREAT without O_EXCL must "
                        f"open the existing file): {failed}")
    for i in range(n):
        lines = (cluster.volume / f"c{i}").read_text().splitlines()
        assert sorted(lines) == [f"h1 line {i}", f"h2 line {i}"], f"c{i}: {lines}"
    identical(cluster, timeout=60)


# -- input 4 ----------------------------------------------------------------------------------


def test_o_append_writers_on_two_hosts_keep_every_line(identical, cluster: LocalCluster) -> None:
    """Issue 8 input 4: an empty ``both.log`` opened ``O_WRONLY|O_APPEND`` on both hosts, each
    appending 500 lines of 49 bytes at the same time. Every append must land at the end of the
    file: 49,000 bytes of 1,000 intact lines, each expected line exactly once, and the replica
    identical (today the file ends with 24,500 bytes: the hosts overwrite each other's lines)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    lines = 500
    _do(lambda: (m1 / "both.log").write_bytes(b""))

    def line(host: str, k: int) -> bytes:
        return (f"{host} line {k:04d} ".ljust(48, "=") + "\n").encode()

    def host(name: str, mnt: Path) -> Callable[[Any], None]:
        def run(barrier: Any) -> None:
            fd = os.open(mnt / "both.log", os.O_WRONLY | os.O_APPEND)
            barrier.wait(BARRIER_TIMEOUT)
            for k in range(lines):
                assert os.write(fd, line(name, k)) == 49
            os.close(fd)
        return run

    _run({"h1": host("h1", m1), "h2": host("h2", m2)}, timeout=60)
    data = (cluster.volume / "both.log").read_bytes()
    assert len(data) == 2 * lines * 49, f"both.log has {len(data)} bytes, not {2 * lines * 49}"
    got = data.splitlines(keepends=True)
    expected = sorted(line(h, k) for h in ("h1", "h2") for k in range(lines))
    assert sorted(got) == expected, "both.log's lines are not the 1,000 written, each once"
    identical(cluster, timeout=60)


# -- input 5 ----------------------------------------------------------------------------------


def test_flock_held_on_one_host_is_refused_on_the_other(cluster: LocalCluster) -> None:
    """Issue 8 input 5 (a): while a process on h1 holds ``flock(LOCK_EX)`` on ``lock``,
    ``flock -n M2/lock true`` must fail (exit 1) as it does on h1 itself; once released it
    succeeds (today the lock is per host and h2 gets it at once)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    _do(lambda: (m1 / "lock").write_bytes(b""))

    def flock_n(path: Path) -> int:
        return subprocess.run(["flock", "-n", str(path), "true"], timeout=15).returncode

    with _holding("flock", m1 / "lock"):
        same_host, other_host = flock_n(m1 / "lock"), flock_n(m2 / "lock")
    assert same_host == 1, "flock -n on the holder's own host must fail"
    assert other_host == 1, f"flock -n M2/lock exited {other_host} while h1 holds the lock (want 1)"
    assert flock_n(m2 / "lock") == 0, "after h1 released the lock, h2 must get it"


def test_posix_byte_range_lock_held_on_one_host_is_refused_on_the_other(cluster: LocalCluster) -> None:
    """Issue 8 input 5 (b): a process on h1 holds a POSIX write lock on bytes 0-99 of a file; a
    process on h2 must be refused (EAGAIN/EACCES) an overlapping write or read lock, be granted
    the non-overlapping bytes 100-199, and F_GETLK must report the conflicting write lock
    (today every lock is granted on h2: locks are per host)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    _do(lambda: (m1 / "ranges.img").write_bytes(bytes(4096)))

    def probe(mnt: Path) -> dict[str, Any]:
        fd = os.open(mnt / "ranges.img", os.O_RDWR)
        got = fcntl.fcntl(fd, fcntl.F_GETLK, _flock_struct(fcntl.F_WRLCK, 0, 10))
        return {
            "write 50-99": _lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 50, 50),
            "read 0-9": _lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 0),
            "write 100-199": _lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 100),
            "F_GETLK 0-9": struct.unpack(FLOCK, got)[0],
        }

    refused = ("EAGAIN", "EACCES")
    with _holding("posix", m1 / "ranges.img"):
        here = _do(lambda: probe(m1))
        there = _do(lambda: probe(m2))
    after = _do(lambda: probe(m2))
    assert here["write 50-99"] in refused and here["F_GETLK 0-9"] == fcntl.F_WRLCK, here  # control
    assert there["write 50-99"] in refused, f"h2 got an overlapping write lock: {there}"
    assert there["read 0-9"] in refused, f"h2 got an overlapping read lock: {there}"
    assert there["write 100-199"] == "granted", f"h2 was refused a non-overlapping range: {there}"
    assert there["F_GETLK 0-9"] == fcntl.F_WRLCK, f"F_GETLK on h2 did not report h1's lock: {there}"
    assert after["write 50-99"] == "granted" and after["F_GETLK 0-9"] == fcntl.F_UNLCK, after


def test_ofd_lock_held_on_one_host_is_refused_on_the_other_as_qemu_image_locking_needs(
        cluster: LocalCluster) -> None:
    """Issue 8 input 5 (c): open-file-description locks (F_OFD_SETLK/F_OFD_GETLK, as QEMU locks
    disk images). A process on h1 write-locks byte 100 and read-locks byte 200 of ``vm.img``; on
    h2 a read lock on byte 100 and a write lock on byte 200 must be refused (EAGAIN), a read
    lock on byte 200 and a write lock on byte 300 granted, and F_OFD_GETLK on byte 100 must
    report the write lock (today h2 is granted everything: locks are per host)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    _do(lambda: (m1 / "vm.img").write_bytes(bytes(4096)))

    def probe(mnt: Path) -> dict[str, Any]:
        fd = os.open(mnt / "vm.img", os.O_RDWR)
        return {
            "getlk 100": _ofd(fd, F_OFD_GETLK, fcntl.F_RDLCK, 100, 1),
            "read 100": _ofd(fd, F_OFD_SETLK, fcntl.F_RDLCK, 100, 1),
            "write 200": _ofd(fd, F_OFD_SETLK, fcntl.F_WRLCK, 200, 1),
            "read 200": _ofd(fd, F_OFD_SETLK, fcntl.F_RDLCK, 200, 1),
            "write 300": _ofd(fd, F_OFD_SETLK, fcntl.F_WRLCK, 300, 1),
        }

    with _holding("ofd", m1 / "vm.img"):
        here = _do(lambda: probe(m1))
        there = _do(lambda: probe(m2))
    after = _do(lambda: probe(m2))
    expected = {"getlk 100": fcntl.F_WRLCK, "read 100": "EAGAIN", "write 200": "EAGAIN",
                "read 200": "granted", "write 300": "granted"}
    assert here == expected, f"control on h1 itself: {here}"
    assert there == expected, f"OFD locks held on h1, as seen on h2: {there}"
    assert after == {"getlk 100": fcntl.F_UNLCK, "read 100": "granted", "write 200": "granted",
                     "read 200": "granted", "write 300": "granted"}, f"after release: {after}"


def test_sqlite_writers_on_two_hosts_lose_no_commit_and_keep_the_database_intact(
        identical, cluster: LocalCluster) -> None:
    """Issue 8 input 5 (d): one sqlite3 writer per host on one database in the volume (rollback
    journal, busy timeout), each committing 150 rows in separate transactions at the same time.
    Every commit a writer was told succeeded must be in the database, ``integrity_check`` must be
    ok and the replica identical (today sqlite's POSIX locks are per host, so both writers think
    they hold the database alone)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    rows = 150

    def setup() -> None:
        con = sqlite3.connect(m1 / "app.db", isolation_level=None)
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute("CREATE TABLE t (host TEXT, k INTEGER, payload TEXT, PRIMARY KEY (host, k))")
        con.close()

    _do(setup)

    def writer(name: str, mnt: Path) -> Callable[[Any], tuple[list[int], list[str]]]:
        def run(barrier: Any) -> tuple[list[int], list[str]]:
            con = sqlite3.connect(mnt / "app.db", timeout=30, isolation_level=None)
            con.execute("PRAGMA journal_mode=DELETE")
            committed, failures = [], []
            barrier.wait(BARRIER_TIMEOUT)
            for k in range(rows):
                try:
                    con.execute("BEGIN IMMEDIATE")
                    con.execute("INSERT INTO t VALUES (?, ?, ?)", (name, k, f"{name}-{k}-" * 40))
                    con.execute("COMMIT")
                    committed.append(k)
                except sqlite3.Error as exc:
                    failures.append(f"{k}: {exc}")
                    with suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
            con.close()
            return committed, failures
        return run

    out = _run({"h1": writer("h1", m1), "h2": writer("h2", m2)}, timeout=90)

    def check() -> tuple[str, set[tuple[str, int]]]:
        con = sqlite3.connect(m1 / "app.db", timeout=30)
        try:
            integrity = "; ".join(r[0] for r in con.execute("PRAGMA integrity_check"))
            present = {(h, k) for h, k in con.execute("SELECT host, k FROM t")}
        except sqlite3.Error as exc:
            return f"{type(exc).__name__}: {exc}", set()
        finally:
            con.close()
        return integrity, present

    integrity, present = _do(check)
    report = {h: f"{len(c)} commits reported, failures: {f[:5]}" for h, (c, f) in out.items()}
    assert integrity == "ok", f"integrity_check: {integrity[:500]} ({report})"
    lost = sorted((h, k) for h, (committed, _) in out.items() for k in committed if (h, k) not in present)
    assert not lost, f"{len(lost)} reported commits are not in the database: {lost[:20]} ({report})"
    identical(cluster, timeout=60)


def test_flock_wait_timeout_on_the_other_host_gives_up_after_the_timeout(cluster: LocalCluster) -> None:
    """Issue 8 input 5 (e): while h1 holds ``flock`` on ``lock``, ``flock -w 2 M2/lock true`` must
    wait about 2 s and then fail (exit 1): it neither gets the lock (today it does, at once)
    nor hangs in the file system."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    _do(lambda: (m1 / "lock").write_bytes(b""))
    with _holding("flock", m1 / "lock"):
        start = time.monotonic()
        try:
            rc = subprocess.run(["flock", "-w", "2", str(m2 / "lock"), "true"], timeout=15).returncode
        except subprocess.TimeoutExpired:
            pytest.fail("flock -w 2 on h2 hangs (still waiting after 15 s)")
        elapsed = time.monotonic() - start
    assert rc == 1, f"flock -w 2 M2/lock exited {rc} after {elapsed:.2f} s while h1 holds it (want 1)"
    assert 1.5 <= elapsed <= 6, f"flock -w 2 gave up after {elapsed:.2f} s"


def test_blocked_setlkw_on_the_other_host_is_interrupted_by_a_signal(cluster: LocalCluster) -> None:
    """Issue 8 input 5 (f): while a process on h1 holds a POSIX write lock on bytes 0-99, a
    process on h2 asking for an overlapping lock with F_SETLKW must block, and SIGALRM (from
    ``signal.alarm(2)``) must end the wait with EINTR after about 2 s, not hang it (today h2 is
    granted the lock at once: locks are per host)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")
    _do(lambda: (m1 / "ranges.img").write_bytes(bytes(4096)))

    def blocked() -> tuple[str, float]:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(m2 / "ranges.img", os.O_RDWR)
        buf = ctypes.create_string_buffer(_flock_struct(fcntl.F_WRLCK, 50, 100), 32)
        signal.signal(signal.SIGALRM, lambda *_: None)  # no SA_RESTART: the call returns EINTR
        start = time.monotonic()
        signal.alarm(2)
        rc = libc.fcntl(fd, fcntl.F_SETLKW, buf)
        err = ctypes.get_errno()
        signal.alarm(0)
        elapsed = time.monotonic() - start
        return ("granted" if rc == 0 else errno.errorcode.get(err, str(err))), elapsed

    with _holding("posix", m1 / "ranges.img"):
        outcome, elapsed = _do(blocked, timeout=15)
    assert outcome == "EINTR", f"F_SETLKW on h2 while h1 holds the range: {outcome} after {elapsed:.2f} s"
    assert 1.5 <= elapsed <= 6, f"F_SETLKW was interrupted after {elapsed:.2f} s, not about 2 s"


# -- input 6 ----------------------------------------------------------------------------------


def _fd_ops(fd: int) -> dict[str, Any]:
    """fstat, ftruncate, fchmod and futimens on an open file, and what fstat then shows."""

    def st() -> tuple[int, int, int]:
        s = os.fstat(fd)
        return s.st_size, s.st_nlink, stat.S_IMODE(s.st_mode)

    out: dict[str, Any] = {"fstat (size, nlink, mode)": _try(st)}
    out["ftruncate 3"] = _try(lambda: os.ftruncate(fd, 3))
    out["fchmod 600"] = _try(lambda: os.fchmod(fd, 0o600))
    out["utime fd"] = _try(lambda: os.utime(fd, ns=(T_NS, T_NS)))
    out["fstat after"] = _try(lambda: (*st(), os.fstat(fd).st_mtime_ns))
    out["pread"] = _try(lambda: os.pread(fd, 100, 0))
    return out


def test_open_file_stays_usable_after_its_name_is_unlinked(identical, cluster: LocalCluster) -> None:
    """Issue 8 input 6 (unlink): ``fd = open(M1/f, O_CREAT|O_RDWR)``, a write, ``unlink(M1/f)``:
    fstat, ftruncate, fchmod and futimens on ``fd`` must act on the open file, which now has no
    name (st_nlink 0) (today fstat fails with ESTALE and ftruncate with ENOENT)."""
    m1 = cluster.mount("h1")

    def run() -> dict[str, Any]:
        fd = os.open(m1 / "f", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"0123456789")
        os.unlink(m1 / "f")
        try:
            return _fd_ops(fd)
        finally:
            os.close(fd)

    out = _do(run)
    assert out == {"fstat (size, nlink, mode)": (10, 0, MODE_644), "ftruncate 3": None, "fchmod 600": None,
                   "utime fd": None, "fstat after": (3, 0, 0o600, T_NS), "pread": b"012"}, out
    assert not (cluster.volume / "f").exists()
    identical(cluster, timeout=60)


def test_open_file_stays_usable_after_the_other_host_renames_it(identical, cluster: LocalCluster) -> None:
    """Issue 8 input 6 (rename away): h1 has ``g`` open when h2 renames it to ``g2``: fstat,
    ftruncate, fchmod and futimens on h1's descriptor must act on the open file, now ``g2``, and
    the replica's ``g2`` must have the new size, mode and times (today these calls fail or act
    on the stale name)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")

    def run() -> dict[str, Any]:
        fd = os.open(m1 / "g", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"0123456789")
        os.rename(m2 / "g", m2 / "g2")
        try:
            return _fd_ops(fd)
        finally:
            os.close(fd)

    out = _do(run)
    assert out == {"fstat (size, nlink, mode)": (10, 1, MODE_644), "ftruncate 3": None, "fchmod 600": None,
                   "utime fd": None, "fstat after": (3, 1, 0o600, T_NS), "pread": b"012"}, out
    assert not (cluster.volume / "g").exists()
    st = os.stat(cluster.volume / "g2")
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (3, 0o600, T_NS)
    identical(cluster, timeout=60)
    rst = os.stat(cluster.target / "g2")
    assert (rst.st_size, stat.S_IMODE(rst.st_mode), rst.st_mtime_ns) == (3, 0o600, T_NS), "replica's g2"


def test_open_file_stays_usable_after_the_other_host_renames_another_file_over_it(
        identical, cluster: LocalCluster) -> None:
    """Issue 8 input 6 (replaced): h1 has ``h`` open when h2 renames another file over ``h``:
    fstat, ftruncate, fchmod and futimens on h1's descriptor must act on the open (now nameless)
    file and leave the new ``h`` alone; the replica is identical (today they fail, or change the
    new file that took the name)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")

    def run() -> dict[str, Any]:
        fd = os.open(m1 / "h", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"0123456789")
        (m2 / "h.new").write_bytes(b"the new file")
        os.chmod(m2 / "h.new", 0o640)
        os.rename(m2 / "h.new", m2 / "h")
        try:
            return _fd_ops(fd)
        finally:
            os.close(fd)

    out = _do(run)
    assert out == {"fstat (size, nlink, mode)": (10, 0, MODE_644), "ftruncate 3": None, "fchmod 600": None,
                   "utime fd": None, "fstat after": (3, 0, 0o600, T_NS), "pread": b"012"}, out
    st = os.stat(cluster.volume / "h")
    assert (cluster.volume / "h").read_bytes() == b"the new file", "the file that took the name changed"
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns != T_NS, "the new h's mode/times changed"
    assert not (cluster.volume / "h.new").exists()
    identical(cluster, timeout=60)


def test_openat_relative_to_an_open_directory_follows_its_rename_by_the_other_host(
        identical, cluster: LocalCluster) -> None:
    """Issue 8 input 6 (directory): h1 opens directory ``d`` (O_RDONLY|O_DIRECTORY), h2 renames
    ``d`` to ``e``; then ``openat(dirfd, "x", O_CREAT|O_WRONLY)`` on h1 must create ``e/x`` and
    reading the directory through ``dirfd`` must list it (today the stale path ``d`` is used)."""
    m1, m2 = cluster.mount("h1"), cluster.mount("h2")

    def run() -> dict[str, Any]:
        os.mkdir(m1 / "d")
        (m1 / "d" / "old").write_bytes(b"was here before")
        dirfd = os.open(m1 / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename(m2 / "d", m2 / "e")

            def create() -> None:
                fd = os.open("x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dirfd)
                try:
                    os.write(fd, b"made through dirfd")
                finally:
                    os.close(fd)

            return {"openat create": _try(create),
                    "listdir": _try(lambda: sorted(os.listdir(dirfd))),
                    "stat x": _try(lambda: os.stat("x", dir_fd=dirfd).st_size),
                    "read old": _try(lambda: _read_at(dirfd, "old"))}
        finally:
            os.close(dirfd)

    out = _do(run)
    assert out == {"openat create": None, "listdir": ["old", "x"], "stat x": 18,
                   "read old": b"was here before"}, out
    assert (cluster.volume / "e" / "x").read_bytes() == b"made through dirfd"
    assert not (cluster.volume / "d").exists()
    identical(cluster, timeout=60)


# -- input 7 ----------------------------------------------------------------------------------


def _busy_step(d: Path, i: int) -> None:
    """One iteration of the busy program; each operation fails if it ran twice (O_EXCL, rename
    and unlink of a name that is then gone)."""
    fd = os.open(d / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, f"content {i}\n".encode() * 10)
    finally:
        os.close(fd)
    os.chmod(d / f"f{i}", 0o600)
    os.truncate(d / f"f{i}", 8 + i % 10)
    os.rename(d / f"f{i}", d / f"g{i}")
    if i % 2 == 1:
        os.unlink(d / f"g{i - 1}")


def _busy_expected(done: int) -> dict[str, tuple[bytes, int]]:
    """What ``done`` complete iterations leave behind, run one after another."""
    return {f"g{i}": ((f"content {i}\n" * 10).encode()[:8 + i % 10], 0o600)
            for i in range(done) if not (i % 2 == 0 and i + 1 < done)}


@pytest.mark.parametrize("offsets", [{}, {"h1": "+3h"}], ids=["same-clocks", "h1-clock-3h-ahead"])
def test_coordinator_restart_makes_programs_wait_not_fail(identical, make_cluster, offsets) -> None:
    """Issue 8 input 7: a program on h1 creates, writes, chmods, truncates, renames and unlinks in
    a loop while the coordinator is killed (SIGKILL) and restarted about 2.5 s later. No
    operation may fail (they wait for the coordinator), each runs exactly once (the directory
    ends as a sequential run of the completed iterations predicts) and the replica is identical.
    Also with h1's clock 3 h ahead (faketime, as in ``clusterrep demo``): today its operations
    fail with EINVAL while the coordinator is away (the retry's sleep fails under libfaketime)."""
    cluster = make_cluster(("h1", "h2"), clock_offsets=offsets)
    d = cluster.mount("h1") / "busy"
    _do(lambda: d.mkdir())
    progress = CTX.Value("i", 0)
    stop = CTX.Event()

    def program(_barrier: Any) -> tuple[int, list[str], int]:
        failures: list[str] = []
        count = 0
        i = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                _busy_step(d, i)
            except OSError as exc:
                count += 1
                if len(failures) < 10:
                    failures.append(f"iteration {i}: {exc.strerror} ({_err(exc)}) on {exc.filename}"
                                    f" after {time.monotonic() - start:.2f} s")
                time.sleep(0.01)
            i += 1
            progress.value = i
        return i, failures, count

    def wait_progress(target: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while progress.value < target and time.monotonic() < deadline:
            time.sleep(0.02)

    def control() -> None:  # in a thread of the test process, while the program runs
        wait_progress(20, 10)
        cluster.stop_process("coordinator", signal.SIGKILL)
        time.sleep(2.5)
        cluster.start_coordinator()
        resumed = progress.value
        wait_progress(resumed + 20, 15)
        stop.set()

    ctl = threading.Thread(target=control, daemon=True)
    ctl.start()
    try:
        results = _run({"program": program}, timeout=60)
    finally:
        stop.set()
        ctl.join(60)
    done, failures, count = results["program"]
    assert not failures, f"{count} iterations of {done} failed while the coordinator restarted: {failures}"
    expected = _busy_expected(done)
    vol = cluster.volume / "busy"
    got = {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in vol.iterdir()}
    assert got == expected, (f"after {done} iterations: missing {sorted(set(expected) - set(got))}, "
                             f"extra {sorted(set(got) - set(expected))}, differing "
                             f"{sorted(k for k in set(got) & set(expected) if got[k] != expected[k])}")
    identical(cluster, timeout=60)
