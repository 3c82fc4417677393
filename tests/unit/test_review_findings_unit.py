"""Review findings in pure logic: each test first demonstrated a bug; all are fixed."""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import clusterrep.replica.service as replica_service
from clusterrep import journal as journal_mod
from clusterrep.coordinator.service import CoordinatorService
from clusterrep.events import (
    Acquire,
    Close,
    Create,
    Event,
    Join,
    MetaEvent,
    Mkdir,
    Tick,
    Write,
    decode,
    encode,
)
from clusterrep.node.agent import NodeAgent


def meta(cls: type[MetaEvent], g: int, origin: str, source: str = "coordinator",
         seq: int | None = None, **kw: Any) -> MetaEvent:
    return cls(source=source, seq=g if seq is None else seq, gseq=g, op_id=f"{origin}-op{g}",
               origin=origin, **kw)


# -- replica: checkpoint, trim, restart ---------------------------------------------------------

def _wait_idle(svc: replica_service.ReplicaService, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = svc.status()
        if (st["idle"] and st["pending_events"] == 0) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def test_restart_after_trim_does_not_wait_for_a_trimmed_copy(tmp_path: Path, monkeypatch) -> None:
    # small segments so that a few KiB roll the journal (the default is 64 MiB)
    monkeypatch.setattr(replica_service, "Journal",
                        functools.partial(journal_mod.Journal, segment_bytes=4096))
    target, state = tmp_path / "target", tmp_path / "state"
    target.mkdir()
    svc = replica_service.ReplicaService(target, state, checkpoint_idle=0.05)
    svc.start()
    coordinator = [meta(Join, 1, "h1"), meta(Join, 2, "h2"),
                   meta(Create, 3, "h2", path="g", mode=0o644),
                   meta(Create, 4, "h1", path="f", mode=0o644), meta(Close, 5, "h1", path="f")]
    h1: list[Event] = [meta(Join, 1, "h1", source="h1", seq=1), Tick(source="h1", seq=2, after=3),
                       meta(Create, 4, "h1", source="h1", seq=3, path="f", mode=0o644),
                       Write(source="h1", seq=4, after=4, path="f", offset=0, data=b"a" * 100),
                       meta(Close, 5, "h1", source="h1", seq=5, path="f")]  # h1's last event
    h2: list[Event] = [meta(Join, 2, "h2", source="h2", seq=1),
                       meta(Create, 3, "h2", source="h2", seq=2, path="g", mode=0o644),
                       Tick(source="h2", seq=3, after=5)]
    # h2 keeps writing its own file (no metadata, so h1 records nothing): the journal rolls
    h2 += [Write(source="h2", seq=k, after=5, path="g", offset=(k - 4) * 1000, data=b"b" * 1000)
           for k in range(4, 30)]
    svc.receive("coordinator", [encode(e) for e in coordinator], 5)
    svc.receive("h1", [encode(e) for e in h1], 5)
    svc.receive("h2", [encode(e) for e in h2], 29)
    st = _wait_idle(svc, 10)
    assert st["gseq"] == 5 and not st["waiting_for"]
    svc.stop()  # checkpoint + trim
    svc = replica_service.ReplicaService(target, state, checkpoint_idle=0.05)
    svc.start()
    try:
        svc.receive("coordinator", [encode(meta(Mkdir, 6, "h2", path="d", mode=0o755))], 6)
        svc.receive("h2", [encode(meta(Mkdir, 6, "h2", source="h2", seq=30, path="d",
                                       mode=0o755))], 30)
        svc.receive("h1", [encode(Tick(source="h1", seq=6, after=6))], 6)  # h1 learned g6
        st = _wait_idle(svc, 3)
        assert st["waiting_for"] == [] and st["gseq"] == 6, st["waiting_for"]
        assert (target / "d").is_dir()
    finally:
        svc.stop()


# -- coordinator: tokens ------------------------------------------------------------------------

def _coordinator(tmp_path: Path) -> CoordinatorService:
    vol = tmp_path / "volume"
    vol.mkdir()
    svc = CoordinatorService(vol, tmp_path / "coord-state")
    svc.join("h1", "h1-join")
    svc.join("h2", "h2-join")
    return svc


def test_acquire_while_the_token_is_being_recalled_gets_a_new_mark(tmp_path: Path) -> None:
    svc = _coordinator(tmp_path)
    reply = svc.execute("h1", "create", "h1-c", {"path": "f", "mode": 0o644})
    ino = reply["ino"]
    h1_holds = {"token": True, "grant": reply["gseq"]}  # the node's view
    raced: dict[str, Any] = {}

    def acquire_again() -> None:  # h1's writer thread, right after it released
        r = svc.acquire("h1", "h1-a", ino, "f")
        raced["reply"] = r
        h1_holds["token"] = True
        if r.get("event") is not None:
            h1_holds["grant"] = decode(r["event"]).gseq

    def recaller(node: str, i: int) -> None:
        assert (node, i) == ("h1", ino)
        h1_holds["token"] = False  # h1 takes the file's lock, drops the token, answers released
        if not raced:
            t = threading.Thread(target=acquire_again)
            t.start()
            t.join(1.0)  # a correct coordinator may make it wait

    svc.recaller = recaller
    done = svc.execute("h2", "truncate", "h2-t", {"path": "f", "size": 0})
    deadline = time.monotonic() + 5
    while "reply" not in raced and time.monotonic() < deadline:
        time.sleep(0.01)
    # if h1 believes it holds the token now, that grant must be numbered after the truncate
    assert not h1_holds["token"] or h1_holds["grant"] > done["gseq"], (raced, done["gseq"])
    svc.close()


# -- node agent: tokens -------------------------------------------------------------------------

class FakeCoordinator:
    """Stands in for CoordinatorClient: answers acquire/meta with coordinator copies."""

    def __init__(self, agent: NodeAgent, ino: int) -> None:
        self.agent, self.ino, self.gseq, self.calls = agent, ino, 10, []
        self.before_reply: Any = None
        self.alive_at = 0.0  # when the newest answered request was sent (the node's lease)

    def _event(self, cls: type[MetaEvent], op_id: str, **kw: Any) -> bytes:
        self.gseq += 1
        return encode(cls(source="coordinator", seq=self.gseq, gseq=self.gseq, op_id=op_id,
                          origin=self.agent.name, **kw))

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.calls.append(op)
        self.alive_at = time.monotonic()
        if op == "acquire":
            reply = {"gseq": 0, "path": "f", "event": self._event(Acquire, fields["op_id"], path="f")}
        elif op == "meta" and fields["kind"] == "create":
            reply = {"gseq": 0, "ino": self.ino,
                     "event": self._event(Create, fields["op_id"], **fields["fields"])}
        else:
            raise AssertionError(op)
        reply["gseq"] = self.gseq
        if self.before_reply is not None:
            hook, self.before_reply = self.before_reply, None
            hook()
        return reply

    def close(self) -> None:
        pass


def _agent(tmp_path: Path) -> tuple[NodeAgent, int]:
    agent = NodeAgent("h1", "127.0.0.1:9", "127.0.0.1:9", tmp_path / "h1", b"t" * 32)
    fd = os.open(tmp_path / "backing", os.O_RDWR | os.O_CREAT, 0o600)
    return agent, fd


def _recorded(agent: NodeAgent) -> list[Event]:
    return [decode(raw) for _, raw in agent.spool.read(1)]


@pytest.mark.parametrize("granted_by", ["acquire", "create"])
def test_a_recall_that_overtakes_the_grant_is_not_lost(tmp_path: Path, granted_by: str) -> None:
    agent, fd = _agent(tmp_path)
    ino = 4242
    fake = FakeCoordinator(agent, ino)
    agent.client = fake  # type: ignore[assignment]
    recalled_at: list[int] = []

    def recall_overtakes_reply() -> None:
        # the control thread handles the recall for h2's Acquire (gseq+1) before this reply
        fake.gseq += 1  # h2's Acquire
        recalled_at.append(fake.gseq)
        agent._recalled(ino)

    fake.before_reply = recall_overtakes_reply
    if granted_by == "create":
        agent.meta("create", path="f", mode=0o644)
    else:
        agent.paths[ino] = "f"
    agent.write(ino, "f", fd, b"late write", 0)
    writes = [e for e in _recorded(agent) if isinstance(e, Write)]
    assert len(writes) == 1
    # this write happened after the token went to h2: it needs a new Acquire, after h2's
    assert writes[0].after > recalled_at[0], (fake.calls, writes[0].after, recalled_at)
    os.close(fd)
    agent.spool.close()


def test_applied_data_is_not_kept_in_memory_until_the_next_checkpoint(tmp_path: Path) -> None:
    """The replica keeps, per journal record, only what decides whether a restart needs it: a
    stream of large writes applied between checkpoints must not pile up in memory."""
    import tracemalloc

    target, state = tmp_path / "target", tmp_path / "state"
    target.mkdir()
    svc = replica_service.ReplicaService(target, state, checkpoint_idle=3600, checkpoint_interval=3600)
    svc.start()
    try:
        svc.receive("coordinator", [encode(meta(Join, 1, "h1")),
                                    encode(meta(Create, 2, "h1", path="f", mode=0o644))], 2)
        svc.receive("h1", [encode(meta(Join, 1, "h1", source="h1", seq=1)),
                           encode(meta(Create, 2, "h1", source="h1", seq=2, path="f", mode=0o644))], 2)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        chunk = 1 << 20
        for k in range(3, 67):  # 64 MiB of writes, no checkpoint in between
            svc.receive("h1", [encode(Write(source="h1", seq=k, after=2, path="f",
                                            offset=(k - 3) * chunk, data=bytes([k]) * chunk))], k)
        deadline = time.monotonic() + 30
        while svc.applied_seq("h1") < 66 and time.monotonic() < deadline:
            time.sleep(0.02)
        st = svc.status()
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert st["pending_events"] == 0
        assert held < 8 << 20, f"{held / 2**20:.0f} MiB still held after applying 64 MiB"
        assert (target / "f").stat().st_size == 64 * chunk
    finally:
        svc.stop()
