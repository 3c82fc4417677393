"""The node's side of fencing: what it does when an answer says the coordinator restarted or
its own epoch changed, and when its lease may have run out."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from clusterrep.node.agent import LEASE_MARGIN, NodeAgent


def _agent(tmp_path: Path) -> NodeAgent:
    agent = NodeAgent("h1", "127.0.0.1:9", "127.0.0.1:9", tmp_path / "h1", b"t" * 32)
    agent._check_reply({"coord": "first", "epoch": 0})
    agent._tokens.update({11, 12})
    agent.my_locks.set(11, ("h1", 7), fcntl.F_WRLCK, 0, 9)
    return agent


def test_a_new_coordinator_process_voids_tokens_and_relinks_to_reclaim_locks(tmp_path: Path) -> None:
    """Found by review: after a coordinator host rebooted, the node's half-open control link
    never broke, it kept its tokens, and the new coordinator gave the file to another host."""
    agent = _agent(tmp_path)
    relinked = []
    agent.control.reconnect = lambda: relinked.append(True)  # type: ignore[method-assign]
    agent._check_reply({"coord": "second", "epoch": 0})
    assert agent._tokens == set() and relinked == [True]
    assert agent.my_locks.locks(11)  # kept: they are reclaimed on the new control link


def test_a_new_epoch_voids_tokens_and_locks(tmp_path: Path) -> None:
    """Found by review: a node stopped longer than its lease kept writing files another host
    had taken over (the coordinator had recalled only one of them)."""
    agent = _agent(tmp_path)
    agent._check_reply({"coord": "first", "epoch": 1})
    assert agent._tokens == set()
    assert agent.my_locks.locks(11) == []  # taken: nothing to reclaim


def test_the_lease_is_trusted_only_for_part_of_it_from_the_last_answered_request(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.lease = 1.0
    agent.client.alive_at = time.monotonic()
    assert agent.lease_valid()
    agent.client.alive_at = time.monotonic() - LEASE_MARGIN * agent.lease - 0.01
    assert not agent.lease_valid()
