"""PostgreSQL on node mounts (``--allow-other``), moved between hosts and replicated.

What this proves, with a real PostgreSQL server running as the unprivileged user ``postgres``
(fsync on, page checksums on):

* a directory made through a mount and chowned to ``postgres`` (through the mount, so the
  change is replicated) can hold a PostgreSQL data directory: ``initdb`` and the server work
  on the h1 mount, files they create belong to ``postgres`` with the modes they asked for;
* the kernel enforces those modes on the mount (``default_permissions``): another user gets
  PermissionError reading ``pg/data/PG_VERSION``, ``postgres`` reads it;
* the database moves host: after a clean stop on h1, the same data directory starts through
  the h2 mount, sees every committed pgbench transaction and takes more;
* the replica is the database: once it caught up it is identical to the volume (``verify``:
  contents, modes, owners, times, xattrs), a copy of it passes ``pg_checksums --check`` and
  starts as a PostgreSQL server that answers the same queries with the same committed rows.

PostgreSQL's server binaries are required: if they are missing the test FAILS (install the
``postgresql`` package; ``scripts/install-deps`` does).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterrep.capture.check import check_fuse
from clusterrep.localcluster import LocalCluster, free_port

PG_USER = "postgres"
OTHER_USER = "nobody"  # any user that is neither root nor postgres
CLIENTS, TRANSACTIONS = 2, 1000  # per pgbench run: CLIENTS * TRANSACTIONS transactions
SERVER_SETTINGS = [
    "listen_addresses=", "shared_buffers=16MB", "max_connections=20", "fsync=on",
    "synchronous_commit=on", "full_page_writes=on", "max_wal_size=256MB", "max_wal_senders=0",
    "wal_level=minimal", "dynamic_shared_memory_type=posix", "huge_pages=off",
    "autovacuum=off",  # no background work in the volume after we stop looking
]
QUERIES = {
    "accounts": "SELECT count(*), sum(abalance) FROM pgbench_accounts",
    "history": "SELECT count(*), coalesce(sum(delta), 0) FROM pgbench_history",
    "tellers": "SELECT count(*), sum(tbalance) FROM pgbench_tellers",
    "branches": "SELECT count(*), sum(bbalance) FROM pgbench_branches",
    "marker": "SELECT host, n FROM moved ORDER BY host",
}


def pg_bin() -> Path:
    """The newest installed PostgreSQL's server binaries; fail (not skip) if there are none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl, postgres, pgbench, psql) are not "
                    "installed under /usr/lib/postgresql/*/bin: install the `postgresql` package "
                    "(apt-get install -y postgresql, or run scripts/install-deps)", pytrace=False)
    bindir = found[-1].parent
    missing = [b for b in ("initdb", "pg_ctl", "postgres", "pgbench", "psql", "pg_checksums")
               if not (bindir / b).exists()]
    if missing:
        pytest.fail(f"{bindir} lacks {', '.join(missing)}: install the `postgresql` package",
                    pytrace=False)
    return bindir


def user_ids(name: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pytest.fail(f"user {name!r} does not exist (the `postgresql` package creates "
                    "`postgres`; `nobody` is in every base system)", pytrace=False)
    return pw.pw_uid, pw.pw_gid


def run_as(user: str, cmd: list[str | Path], *, timeout: float = 60.0, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as ``user`` (its own uid and gid, no supplementary groups) and wait."""
    uid, gid = user_ids(user)
    full_env = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C", "TZ": "UTC",
                "HOME": str(cwd or "/"), "USER": user, "LOGNAME": user, **(env or {})}
    return subprocess.run([str(c) for c in cmd], user=uid, group=gid, extra_groups=[],
                          umask=0o022, env=full_env, cwd=cwd or "/", capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def user_env() -> Iterator[dict[str, str]]:
    """Environment that lets the test's users look themselves up (``getpwuid``: initdb needs
    it). Normally nothing; where they cannot read the user database (on some machines /etc is
    mode 0600), nss_wrapper serves them a copy of their own entries."""
    if run_as(PG_USER, ["id", "-un"]).returncode == 0:
        yield {}
        return
    libs = sorted(Path("/usr/lib").glob("*/libnss_wrapper.so")) + sorted(
        Path("/usr/lib").glob("libnss_wrapper.so"))
    if not libs:
        mode = oct(os.stat("/etc").st_mode & 0o7777)
        pytest.fail(f"user {PG_USER!r} cannot look itself up (/etc is mode {mode}) and "
                    "nss_wrapper is not installed: install `libnss-wrapper` (scripts/install-deps "
                    "does) or make the user database readable", pytrace=False)
    d = Path(tempfile.mkdtemp(prefix="clusterrep-nss-"))
    d.chmod(0o755)
    users = [pwd.getpwnam(n) for n in (PG_USER, OTHER_USER)]
    (d / "passwd").write_text("".join(
        f"{u.pw_name}:x:{u.pw_uid}:{u.pw_gid}:{u.pw_gecos}:{u.pw_dir}:{u.pw_shell}\n"
        for u in users))
    (d / "group").write_text("".join(
        f"{grp.getgrgid(g).gr_name}:x:{g}:\n" for g in sorted({u.pw_gid for u in users})))
    for f in ("passwd", "group"):
        (d / f).chmod(0o644)
    try:
        yield {"LD_PRELOAD": str(libs[0]), "NSS_WRAPPER_PASSWD": str(d / "passwd"),
               "NSS_WRAPPER_GROUP": str(d / "group")}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def private_dir(prefix: str, owner: str) -> Path:
    """A fresh 0700 directory in /tmp belonging to ``owner``."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    uid, gid = user_ids(owner)
    os.chown(d, uid, gid)
    d.chmod(0o700)
    return d


def log_tails(cluster: LocalCluster, *extra: Path) -> str:
    out = []
    for log in [*(cluster.logs / f"{n}.log" for n in (*cluster.nodes, "coordinator", "replica")),
                *extra]:
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace")
            out.append(f"--- {log} (last 3000 chars) ---\n{text[-3000:]}")
    return "\n".join(out)


class Postgres:
    """One PostgreSQL server we start on ``data``, reached by its own socket directory."""

    def __init__(self, bindir: Path, data: Path, cluster: LocalCluster, started: list[Postgres],
                 env: dict[str, str], backing: Path | None = None) -> None:
        self.bindir, self.data, self.cluster, self.env = bindir, data, cluster, env
        self.backing = backing or data  # where the data directory is without the mount
        self.sockdir = private_dir("clusterrep-pgsock-", PG_USER)
        self.port = free_port()
        self.logfile = self.sockdir / "server.log"
        self.pid: int | None = None
        self.started = started

    def must(self, cmd: list[str | Path], what: str, timeout: float = 60.0) -> str:
        t0 = time.monotonic()
        try:
            r = run_as(PG_USER, cmd, timeout=timeout, cwd=self.sockdir, env=self.env)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{what} took over {timeout:g} s: {exc}\n"
                                 + log_tails(self.cluster, self.logfile)) from None
        print(f"  {what}: {time.monotonic() - t0:.1f} s")
        if r.returncode != 0:
            raise AssertionError(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n"
                                 f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}\n"
                                 + log_tails(self.cluster, self.logfile))
        return r.stdout

    def start(self, where: str) -> None:
        opts = " ".join(f"-c {s}" if s != "listen_addresses=" else "-c listen_addresses=''"
                        for s in SERVER_SETTINGS)
        self.started.append(self)
        self.must([self.bindir / "pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "60",
                   "-o", f"-k {self.sockdir} -p {self.port} {opts}", "start"],
                  f"pg_ctl start ({where})", timeout=90)
        self.pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def stop(self, where: str) -> None:
        self.must([self.bindir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60",
                   "stop"], f"pg_ctl stop -m fast ({where})", timeout=90)
        self.pid = None
        self.started.remove(self)

    def kill(self) -> None:
        """Clean-up: stop this server at once, by its data directory; if pg_ctl cannot (say the
        mount is gone), signal the pid it wrote there, only if that process runs in this data
        directory."""
        with contextlib.suppress(Exception):
            r = run_as(PG_USER, [self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate",
                                 "-w", "-t", "30", "stop"], timeout=60, cwd=self.sockdir,
                       env=self.env)
            if r.returncode == 0:
                return
        pids = {self.pid}
        for pidfile in (self.data / "postmaster.pid", self.backing / "postmaster.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(pidfile.read_text().split("\n", 1)[0]))
        for pid in pids - {None}:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/cwd") == str(self.data):
                    os.kill(pid, signal.SIGQUIT)  # PostgreSQL's "immediate shutdown"

    def psql(self, sql: str, where: str) -> str:
        return self.must([self.bindir / "psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", self.sockdir,
                          "-p", str(self.port), "-U", PG_USER, "-d", "postgres", "-At", "-c", sql],
                         f"psql ({where})").strip()

    def pgbench(self, args: list[str], where: str, timeout: float = 60.0) -> str:
        return self.must([self.bindir / "pgbench", "-h", self.sockdir, "-p", str(self.port),
                          "-U", PG_USER, *args, "postgres"], f"pgbench {' '.join(args)} ({where})",
                         timeout=timeout)

    def results(self, where: str) -> dict[str, str]:
        return {name: self.psql(sql, f"{name} query, {where}") for name, sql in QUERIES.items()}


def read_as(user: str, path: Path) -> str:
    """Read ``path`` as ``user`` (a forked child that drops root): ``"ok:"`` and the content, or
    the exception's name and errno (e.g. ``"PermissionError:13"``)."""
    uid, gid = user_ids(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Python-level clean-up, report through the pipe and _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                with open(path) as f:
                    out = "ok:" + f.read().strip()
            except OSError as exc:
                out = f"{type(exc).__name__}:{exc.errno}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        if not select.select([f], [], [], 30)[0]:  # a hung file system: fail, do not hang
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"reading {path} as {user} did not return within 30 s")
        got = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and got, f"reading {path} as {user}: child status {status}, said {got!r}"
    return got


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The cluster's directory: in /tmp and traversable by postgres (pytest's base temporary
    directory is root's, mode 0700). Logs are kept in ``tmp_path`` when the test ends."""
    d = Path(tempfile.mkdtemp(prefix="clusterrep-pg-"))
    d.chmod(0o755)
    yield d
    with contextlib.suppress(OSError):
        shutil.copytree(d / "logs", tmp_path / "logs", dirs_exist_ok=True)
    shutil.rmtree(d, ignore_errors=True)


def test_postgres_runs_on_a_mount_moves_host_and_the_replica_is_the_same_database(
        workdir: Path, user_env: dict[str, str]) -> None:
    bindir = pg_bin()
    check_fuse()
    pg_uid, pg_gid = user_ids(PG_USER)
    other_uid, _ = user_ids(OTHER_USER)
    assert other_uid not in (0, pg_uid)
    started: list[Postgres] = []
    scratch: list[Path] = []
    t_start = time.monotonic()
    print(f"\nPostgreSQL from {bindir}; cluster in {workdir}")
    with LocalCluster(workdir, ("h1", "h2"), node_args=["--allow-other"]) as c:
        try:
            c.start()
            print(f"  cluster started: {time.monotonic() - t_start:.1f} s")
            m1, m2 = c.mount("h1"), c.mount("h2")

            # 1. pg/ made by root through h1, given to postgres (through the mount: replicated)
            (m1 / "pg").mkdir()
            os.chown(m1 / "pg", pg_uid, pg_gid)
            (m1 / "pg").chmod(0o700)
            st = (c.volume / "pg").stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (pg_uid, pg_gid, 0o700)

            # 2. initdb and pgbench on h1, as postgres
            on_h1 = Postgres(bindir, m1 / "pg" / "data", c, started, user_env,
                             c.volume / "pg" / "data")
            scratch.append(on_h1.sockdir)
            on_h1.must([bindir / "initdb", "-D", on_h1.data, "-U", PG_USER, "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--data-checksums"], "initdb (h1)",
                       timeout=90)
            pv = c.volume / "pg" / "data" / "PG_VERSION"
            st = pv.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (pg_uid, pg_gid, 0o600), (
                f"PG_VERSION, made by initdb as postgres through the mount: owner "
                f"{st.st_uid}:{st.st_gid} mode {st.st_mode & 0o7777:o}")
            on_h1.start("h1")
            on_h1.pgbench(["-i", "-s", "1", "-q"], "h1")
            on_h1.psql("CREATE TABLE moved (host text PRIMARY KEY, n int); "
                       "INSERT INTO moved VALUES ('h1', 1)", "h1")
            on_h1.pgbench(["-c", str(CLIENTS), "-t", str(TRANSACTIONS), "-n"], "h1")
            before_move = on_h1.results("h1")
            on_h1.stop("h1")

            # 3. the kernel enforces postgres's modes on both mounts
            for m in (m1, m2):
                got = read_as(OTHER_USER, m / "pg" / "data" / "PG_VERSION")
                assert got == "PermissionError:13", f"{OTHER_USER} reading PG_VERSION on {m}: {got}"
                got = read_as(PG_USER, m / "pg" / "data" / "PG_VERSION")
                assert got.startswith("ok:") and got[3:] == bindir.parent.name, (
                    f"postgres reading PG_VERSION on {m}: {got}")

            # the same data directory, started on h2: the database moved host
            on_h2 = Postgres(bindir, m2 / "pg" / "data", c, started, user_env,
                             c.volume / "pg" / "data")
            scratch.append(on_h2.sockdir)
            on_h2.start("h2")
            assert on_h2.results("h2 after the move") == before_move
            on_h2.psql("INSERT INTO moved VALUES ('h2', 2)", "h2")
            on_h2.pgbench(["-c", str(CLIENTS), "-t", str(TRANSACTIONS), "-n"], "h2")
            final = on_h2.results("h2")
            on_h2.stop("h2")
            # every transaction pgbench was told committed is there, and the books balance
            n_history, delta = final["history"].split("|")
            assert int(n_history) == 2 * CLIENTS * TRANSACTIONS, final
            for table in ("accounts", "tellers", "branches"):
                assert final[table].split("|")[1] == delta, final
            assert final["marker"] == "h1|1\nh2|2", final

            # 4. the replica: identical to the volume, and a database with the same rows
            t0 = time.monotonic()
            ok, why, _ = c.wait(120)
            assert ok, "replica did not catch up:\n" + "\n".join(why) + "\n" + log_tails(c)
            print(f"  replica caught up: {time.monotonic() - t0:.1f} s")
            diffs = c.verify()  # names, contents, modes, owners, times, xattrs, hard links
            assert not diffs, ("replica differs from the volume:\n"
                               + "\n".join(str(d) for d in diffs[:30]) + "\n" + log_tails(c))

            copy_parent = private_dir("clusterrep-pgcopy-", PG_USER)
            scratch.append(copy_parent)
            copy = copy_parent / "data"
            subprocess.run(["cp", "-a", str(c.target / "pg" / "data"), str(copy)], check=True)
            from_replica = Postgres(bindir, copy, c, started, user_env)
            scratch.append(from_replica.sockdir)
            from_replica.must([bindir / "pg_checksums", "--check", "-D", copy],
                              "pg_checksums --check (replica copy)")
            from_replica.start("replica copy")
            assert from_replica.results("replica copy") == final
            from_replica.stop("replica copy")
            print(f"  whole test: {time.monotonic() - t_start:.1f} s; final: {final}")
        finally:
            for server in reversed(started):
                server.kill()
            for d in scratch:
                shutil.rmtree(d, ignore_errors=True)
