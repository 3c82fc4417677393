"""The real node agent, capture file system and coordinator, in one process, under a
deterministic scheduler.

Each host is a thread that sends FUSE requests straight to its own `CaptureFS` handlers (no
mount: requests are built with the kernel's layouts). Its `NodeAgent` talks to the real
`CoordinatorService` through `coordinator.requests.answer`, the server's own request handling,
in-process. Only one host thread runs at a time: at every request to the coordinator (when it
is sent and when its answer is back) the scheduler lets a seeded random generator pick which
host goes on. So opens, token grants and recalls, backing-file accesses and recording interleave
with other hosts' operations as in the real code, and a seed repeats an interleaving exactly.

At the end the streams (the coordinator's journal and each node's spool) go through the real
`Merger` and `Applier` into a target directory, which must equal the volume.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterrep.capture import kernel as k
from clusterrep.capture.fs import CaptureFS
from clusterrep.coordinator.requests import answer
from clusterrep.coordinator.service import CoordinatorService
from clusterrep.errors import OpFailed
from clusterrep.events import decode
from clusterrep.node.agent import NodeAgent
from clusterrep.replica.applier import Applier
from clusterrep.replica.merger import Merger
from clusterrep.verify import compare_trees

_turn = threading.local()


class Deadlock(AssertionError):
    """No host could go on: the scheduler waited for a turn that never came."""


class Scheduler:
    """Runs one host thread at a time; at each `switch` a seeded choice picks the next."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.cv = threading.Condition()
        self.running: str | None = None
        self.live: set[str] = set()
        self.trace: list[str] = []

    def run(self, hosts: dict[str, Callable[[], None]], timeout: float = 60.0) -> None:
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._host, args=(n, fn, errors), daemon=True)
                   for n, fn in sorted(hosts.items())]
        with self.cv:
            self.live = set(hosts)
            self._pick()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
            if t.is_alive():
                raise Deadlock(f"a host did not finish within {timeout:g} s: {self.trace[-10:]}")
        if errors:
            raise errors[0]

    def _host(self, name: str, fn: Callable[[], None], errors: list[BaseException]) -> None:
        _turn.name = name
        self._wait(name)
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)
        finally:
            with self.cv:
                self.live.discard(name)
                self._pick()

    def switch(self, label: str) -> None:
        """A point where another host may go first (no-op outside the host threads)."""
        name = getattr(_turn, "name", None)
        if name is None:
            return
        with self.cv:
            self.trace.append(f"{name}: {label}")
            self._pick()
        self._wait(name)

    def _pick(self) -> None:
        self.running = self.rng.choice(sorted(self.live)) if self.live else None
        self.cv.notify_all()

    def _wait(self, name: str) -> None:
        deadline = time.monotonic() + 30
        with self.cv:
            while self.running != name:
                if not self.cv.wait(max(0.0, deadline - time.monotonic())):
                    raise Deadlock(f"{name} waited 30 s for its turn: {self.trace[-10:]}")


class InProcessClient:
    """Stands in for `CoordinatorClient`: the same calls, answered by the real service."""

    def __init__(self, svc: CoordinatorService, node: str, sched: Scheduler) -> None:
        self.svc, self.node, self.sched = svc, node, sched
        self.alive_at = 0.0
        self.on_reply: Callable[[dict[str, Any]], None] | None = None

    def call(self, op: str, *, patience: float | None = None, **fields: Any) -> dict[str, Any]:
        self.sched.switch(f"{op} {fields.get('kind', '')} sent")
        try:
            reply = answer(self.svc, self.node, {"op": op, **fields})
        except OpFailed as exc:
            raise OSError(exc.errno, str(exc)) from None
        if self.on_reply is not None:
            self.on_reply(reply)
        self.alive_at = time.monotonic()
        self.sched.switch(f"{op} answered")
        return reply

    def drop_link(self) -> None:
        pass

    def close(self) -> None:
        pass


class Host:
    """One host: its agent, its capture file system, and a kernel's worth of requests to it."""

    def __init__(self, name: str, fs: CaptureFS) -> None:
        self.name, self.fs = name, fs
        self._unique = 0

    def _req(self, op: Callable[[k.Header, memoryview], Any], opcode: int, nodeid: int,
             body: bytes) -> Any:
        self._unique += 2
        hdr = k.Header(k.IN_HEADER.size + len(body), opcode, self._unique, nodeid, 0, 0, 1)
        return op(hdr, memoryview(body))

    def lookup(self, path: str) -> int:
        nodeid = k.ROOT_ID
        for part in [p for p in path.split("/") if p]:
            entry = self._req(self.fs.lookup, k.LOOKUP, nodeid, os.fsencode(part) + b"\0")
            nodeid = k.ENTRY_OUT.unpack_from(entry)[0]
        return nodeid

    def _parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return self.lookup(head), os.fsencode(name) + b"\0"

    def open(self, path: str, flags: int) -> int:
        reply = self._req(self.fs.open, k.OPEN, self.lookup(path), k.OPEN_IN.pack(flags, 0))
        return int(k.OPEN_OUT.unpack_from(reply)[0])

    def create(self, path: str, flags: int, mode: int = 0o644) -> int:
        parent, name = self._parent(path)
        reply = self._req(self.fs.create, k.CREATE, parent,
                          k.CREATE_IN.pack(flags | os.O_CREAT, mode, 0o022, 0) + name)
        return int(k.OPEN_OUT.unpack_from(reply, k.ENTRY_OUT.size + k.ATTR.size)[0])

    def write(self, fh: int, offset: int, data: bytes) -> None:
        self._req(self.fs.write, k.WRITE, 0,
                  k.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data)

    def close(self, fh: int) -> None:
        self._req(self.fs.release, k.RELEASE, 0, k.RELEASE_IN.pack(fh, 0, 0, 0))

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        sparent, sname = self._parent(src)
        dparent, dname = self._parent(dst)
        self._req(self.fs.rename2, k.RENAME2, sparent, k.RENAME2_IN.pack(dparent, flags, 0)
                  + sname + dname)

    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        self._req(self.fs.unlink, k.UNLINK, parent, name)

    def link(self, src: str, dst: str) -> None:
        parent, name = self._parent(dst)
        self._req(self.fs.link, k.LINK, parent, k.LINK_IN.pack(self.lookup(src)) + name)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self._req(self.fs.setxattr, k.SETXATTR, self.lookup(path),
                  k.SETXATTR_IN.pack(len(value), 0) + name.encode() + b"\0" + value)

    def chown(self, path: str, uid: int, gid: int) -> None:
        body = k.SETATTR_IN.pack(k.FATTR_UID | k.FATTR_GID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                 uid, gid, 0)
        self._req(self.fs.setattr, k.SETATTR, self.lookup(path), body)

    def punch(self, fh: int, offset: int, length: int) -> None:
        self._req(self.fs.fallocate, k.FALLOCATE, 0,
                  k.FALLOCATE_IN.pack(fh, offset, length, 0x03, 0))  # punch hole, keep size


class InProcessCluster:
    def __init__(self, workdir: Path, hosts: tuple[str, ...], seed: int,
                 fs_class: type[CaptureFS] = CaptureFS) -> None:
        self.workdir = workdir
        self.volume = workdir / "volume"
        self.volume.mkdir(parents=True)
        self.sched = Scheduler(seed)
        self.svc = CoordinatorService(self.volume, workdir / "coordinator", lease=3600)
        self.agents: dict[str, NodeAgent] = {}
        self.hosts: dict[str, Host] = {}
        for name in hosts:
            agent = NodeAgent(name, "127.0.0.1:9", "127.0.0.1:9", workdir / f"state-{name}",
                              b"t" * 32)
            client = InProcessClient(self.svc, name, self.sched)
            client.on_reply = agent.client.on_reply
            agent.client = client  # type: ignore[assignment]
            agent.join_cluster(time.monotonic() + 5)
            self.agents[name] = agent
            self.hosts[name] = Host(name, fs_class(str(self.volume), agent))
        self.svc.recaller = lambda node, ino: self.agents[node]._recalled(ino)

    def replicate(self) -> list[str]:
        """Tick every node up to the last gseq, merge and apply all streams; return the
        differences between the target and the volume (none if the replica is right)."""
        for agent in self.agents.values():
            agent.learn(self.svc.gseq)
        target, state = self.workdir / "target", self.workdir / "replica-state"
        target.mkdir()
        applier = Applier(target, state)
        merger = Merger(applier.position)
        for journal in [self.svc.journal, *(a.spool for a in self.agents.values())]:
            journal.sync()
            start = journal.first_index
            while start < journal.next_index:
                records = journal.read(start, max_bytes=16 << 20)
                merger.add(decode(raw) for _, raw in records)
                start = records[-1][0] + 1
        applier.apply(merger.drain())
        applier.close()
        left = merger.waiting_for()
        return [f"merger still waits: {w}" for w in left] + [
            str(d) for d in compare_trees(self.volume, target)]

    def close(self) -> None:
        """Close every descriptor the cluster opened (thousands of examples run in one
        process: a leak ends in EMFILE)."""
        for host in self.hosts.values():
            for fh in list(host.fs.handles):
                host.close(fh)
            host.fs.inodes.close()
        for agent in self.agents.values():
            for ino in list(agent._unstamped):
                agent.settle(ino)
            agent.activity.close_clean()
            agent.spool.close()
        self.svc.close()


def tolerant(fn: Callable[[], None]) -> None:
    """Run one program step; the errors a program on a shared volume may meet are its own."""
    try:
        fn()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EEXIST, errno.ESTALE):
            raise
