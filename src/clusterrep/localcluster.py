"""A whole cluster on one machine, as real processes: replica, coordinator and node agents.

Used by `clusterrep demo` and by the integration tests. Each part is a separate
``python -m clusterrep ...`` process on loopback with its own state directory; every node mounts
the capture file system over the one shared volume directory. Logs go to ``workdir/logs``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import wire
from .capture.check import mounted_here
from .client import fetch_status, wait_for
from .errors import ClusterrepError
from .pki import Member, issue
from .timing import pause
from .tls import TlsConfig
from .verify import Difference, compare_trees


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    def __init__(self, workdir: str | Path, nodes: tuple[str, ...] = ("h1", "h2"), *,
                 clock_offsets: dict[str, str] | None = None, node_args: list[str] | None = None,
                 replica_for_nodes: str | None = None, replica_state: Path | None = None,
                 replica_listen: str | None = None, replica_prefix: list[str] | None = None,
                 coordinator_listen: str | None = None, coordinator_prefix: list[str] | None = None,
                 coordinator_for: dict[str, str] | None = None, coordinator_addr: str | None = None,
                 coordinator_args: list[str] | None = None, replica_args: list[str] | None = None,
                 tls: bool = False) -> None:
        self.workdir = Path(workdir)
        self.nodes = nodes
        self.clock_offsets = clock_offsets or {}
        self.node_args = node_args or []
        self.replica_for_nodes = replica_for_nodes  # e.g. a fault-injecting proxy in front
        self.replica_state = replica_state or self.workdir / "state-replica"
        self.volume = self.workdir / "volume"
        self.target = self.workdir / "replica"
        self.logs = self.workdir / "logs"
        self.token_file = self.workdir / "token"
        # the replica may run elsewhere, e.g. in its own network namespace (replica_prefix)
        self.replica_addr = replica_listen or f"127.0.0.1:{free_port()}"
        self.replica_prefix = replica_prefix or []
        # the coordinator may run elsewhere too (coordinator_prefix), listen on every address
        # there (coordinator_listen) and be reached by each node at its own address
        # (coordinator_for: node -> HOST:PORT; others and the tests use coordinator_addr)
        self.coordinator_listen = coordinator_listen
        self.coordinator_addr = coordinator_addr or coordinator_listen or f"127.0.0.1:{free_port()}"
        self.coordinator_prefix = coordinator_prefix or []
        self.coordinator_for = coordinator_for or {}
        self.coordinator_args = coordinator_args or []
        self.replica_args = replica_args or []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for d in (self.volume, self.target, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        if not self.token_file.exists():
            self.token_file.write_text(secrets.token_hex(24) + "\n")
            self.token_file.chmod(0o600)
        self.pki = self.workdir / "pki" if tls else None
        if self.pki is not None and not (self.pki / "cli.pem").exists():
            # every part gets a certificate naming it; "cli" is for status and wait
            members = [Member(n) for n in ("replica", "coordinator", *nodes, "cli")]
            issue(self.pki, members, loopback=True, force=True)
        tls_config = None if self.pki is None else TlsConfig(
            self.pki / "cli.pem", self.pki / "cli.key", self.pki / "ca.pem")
        self.token = wire.load_token(self.token_file)
        self.auth = wire.Auth(self.token, tls_config)

    # -- processes ---------------------------------------------------------------------------

    def mount(self, node: str) -> Path:
        return self.workdir / f"mnt-{node}"

    def _spawn(self, name: str, args: list[str], prefix: list[str] | None = None) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        cmd = (prefix or []) + [sys.executable, "-m", "clusterrep", *args,
                                "--token-file", str(self.token_file)]
        if self.pki is not None:
            cmd += ["--tls-cert", str(self.pki / f"{name}.pem"), "--tls-key",
                    str(self.pki / f"{name}.key"), "--tls-ca", str(self.pki / "ca.pem")]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, env=env,
                                            start_new_session=True)

    def _wait_port(self, name: str, addr: str, timeout: float) -> None:
        host, port = addr.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                with socket.create_connection((host, int(port)), timeout=0.5):
                    return
            except OSError:
                pause(0.05)
        raise ClusterrepError(f"{name} did not start listening on {addr} within {timeout:g} s",
                              hint=f"see {self.logs / name}.log")

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
            raise ClusterrepError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def start_replica(self, timeout: float = 30.0) -> None:
        self._spawn("replica", ["replica", "--listen", self.replica_addr, "--target",
                                str(self.target), "--state", str(self.replica_state),
                                *self.replica_args],
                    self.replica_prefix)
        self._wait_port("replica", self.replica_addr, timeout)

    def start_coordinator(self, timeout: float = 30.0) -> None:
        self._spawn("coordinator", ["coordinator", "--listen",
                                    self.coordinator_listen or self.coordinator_addr, "--volume",
                                    str(self.volume), "--replica", self.replica_addr, "--state",
                                    str(self.workdir / "state-coordinator"),
                                    *self.coordinator_args], self.coordinator_prefix)
        self._wait_port("coordinator", self.coordinator_addr, timeout)

    def start_node(self, node: str, timeout: float = 30.0) -> None:
        prefix: list[str] = []
        offset = self.clock_offsets.get(node)
        if offset:
            if shutil.which("faketime") is None:
                raise ClusterrepError("faketime is needed to skew a node's clock",
                                      hint="apt-get install faketime")
            # skew the wall clock only: with a faked monotonic clock, timed waits misbehave
            if offset.startswith("file:"):
                # the offset is read from a file on every clock call: tests move it while running
                libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
                if not libs:
                    raise ClusterrepError("libfaketime is not installed", hint="apt-get install faketime")
                prefix = ["env", f"LD_PRELOAD={libs[0]}", "FAKETIME_DONT_FAKE_MONOTONIC=1",
                          "FAKETIME_NO_CACHE=1", f"FAKETIME_TIMESTAMP_FILE={offset[5:]}"]
            else:
                prefix = ["env", "FAKETIME_DONT_FAKE_MONOTONIC=1", "faketime", "-f", offset]
        mnt = self.mount(node)
        self._spawn(node, ["node", "--id", node, "--volume", str(self.volume), "--mount", str(mnt),
                           "--coordinator", self.coordinator_for.get(node, self.coordinator_addr),
                           "--replica",
                           self.replica_for_nodes or self.replica_addr,
                           "--state", str(self.workdir / f"state-{node}"), *self.node_args], prefix)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mnt):
            self._check_alive(node)
            if time.monotonic() > deadline:
                raise ClusterrepError(f"node {node} did not mount {mnt} within {timeout:g} s",
                                      hint=f"see {self.logs / node}.log")
            pause(0.05)

    def start(self) -> LocalCluster:
        self.start_replica()
        self.start_coordinator()
        for node in self.nodes:
            self.start_node(node)
        return self

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        proc = self.procs.get(name)
        if proc is None:
            return None
        # each part runs in its own process group (a wrapper such as faketime may have a child):
        # signal the group, and wait until all of it is gone
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            pause(0.05)
        if name in self.nodes and mounted_here(str(self.mount(name))):
            # a node that did not stop cleanly leaves its mount behind, possibly dead
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount(name))], check=False,
                           capture_output=True)
        del self.procs[name]
        return proc.returncode

    def stop(self) -> None:
        for name in [n for n in self.procs if n in self.nodes]:
            self.stop_process(name)
        for name in ("coordinator", "replica"):
            self.stop_process(name)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- checks ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return fetch_status(self.replica_addr, self.auth)

    def wait(self, timeout: float = 60.0) -> tuple[bool, list[str], dict[str, Any]]:
        return wait_for(self.replica_addr, self.auth, timeout)

    def verify(self) -> list[Difference]:
        return list(compare_trees(self.volume, self.target))
