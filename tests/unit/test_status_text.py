"""`clusterrep status` as text: what an operator reads."""

from __future__ import annotations

from clusterrep.cli.status import format_status
from clusterrep.client import pending


def _status(unsettled: int) -> dict:
    return {"gseq": 7, "members": ["h1"], "applied_events": 10, "pending_events": 0,
            "journal_bytes": 0, "waiting_for": [], "queued_batches": 0,
            "sources": {"h1": {"connected": True, "tls": False, "captured": 5, "received": 5,
                               "applied": 5, "lag_events": 0, "lag_seconds": 0.0,
                               "bytes_received": 0, "report_age": 0.0, "unsettled": unsettled}}}


def test_files_whose_times_are_not_recorded_yet_are_shown_and_waited_for() -> None:
    text = format_status(_status(2))
    assert "h1: 2 file(s) being written" in text
    assert any("h1: 2 file(s) still being written" in why for why in pending(_status(2), 1.0))
    assert "being written" not in format_status(_status(0))
    assert pending(_status(0), 1.0) == []
