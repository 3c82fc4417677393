"""`clusterrep status` as text: what an operator reads."""

from __future__ import annotations

from clusterrep.cli.status import format_status
from clusterrep.client import pending


def _source(unsettled: int = 0) -> dict:
    return {"connected": True, "tls": False, "captured": 5, "received": 5, "applied": 5,
            "lag_events": 0, "lag_seconds": 0.0, "bytes_received": 0, "report_age": 0.0,
            "unsettled": unsettled}


def _status(unsettled: int) -> dict:
    return {"gseq": 7, "members": ["h1"], "applied_events": 10, "pending_events": 0,
            "journal_bytes": 0, "waiting_for": [], "queued_batches": 0,
            "sources": {"coordinator": _source(), "h1": _source(unsettled)}}


def test_files_whose_times_are_not_recorded_yet_are_shown_and_waited_for() -> None:
    text = format_status(_status(2))
    assert "h1: 2 file(s) being written" in text
    assert any("h1: 2 file(s) still being written" in why for why in pending(_status(2), 1.0))
    assert "being written" not in format_status(_status(0))
    assert pending(_status(0), 1.0) == []


def test_a_replica_that_never_heard_from_the_coordinator_is_not_caught_up() -> None:
    st = _status(0)
    del st["sources"]["coordinator"]
    assert any("coordinator: not heard from yet" in why for why in pending(st, 1.0))


def test_a_sync_running_or_awaited_is_shown_and_waited_for() -> None:
    st = {**_status(0), "sync": {"state": "running", "sync_id": "ab", "gseq": 3, "phase": "content",
                                 "files": 10, "files_done": 4, "bytes": 2 << 20, "seconds": 2.0,
                                 "volume_bytes": 8 << 20, "reason": "the replica lost its state"}}
    assert "SYNC ab from mark g3: content, 4 of 10 files compared" in format_status(st)
    assert "about 3 s left" in format_status(st)  # (4 files in 2 s: 6 more in about 3 s)
    assert any("synchronisation ab not finished" in why for why in pending(st, 1.0))
    st["sync"] = {"state": "awaiting", "reason": "its state was lost"}
    assert "SYNC: waiting for a synchronisation to start" in format_status(st)
    assert any("waiting for a synchronisation" in why for why in pending(st, 1.0))


def test_the_history_window_alarms_and_gaps_are_shown_and_undurable_marks_waited_for() -> None:
    history = {"recording": True, "base": 2, "oldest": 5, "newest": 90, "oldest_at": 1.7e9,
               "newest_at": 1.7e9 + 60, "restore_points": 40, "bytes": 3 << 20, "retain_s": 86400.0,
               "retain_size": None, "durable": 7, "window": 5, "syncing": False,
               "alarm": "history disk full", "gaps": [{"at": 3, "why": "recording failed"}]}
    text = format_status({**_status(0), "history": history})
    assert "HISTORY: 40 restore points, g5 (2023-11-14T22:13:20Z) .. g90" in text
    assert "keeping 24 h" in text
    assert "ALARM (history): history disk full" in text and "history gap at g3" in text
    assert pending({**_status(0), "history": history}, 1.0) == []
    behind = {**history, "durable": 6}  # (the replica applied g7, its checkpoint is at g6)
    assert any("not durable yet" in why for why in pending({**_status(0), "history": behind}, 1.0))
    idle = {**history, "recording": False, "syncing": True}
    assert "synchronisation this replica needed" in format_status({**_status(0), "history": idle})
