"""Asking the replica server what it has: status, and waiting until it has caught up."""

from __future__ import annotations

import os
import time
from typing import Any

from . import wire
from .errors import ClusterrepError
from .timing import pause


def _ask(conn: wire.Connection) -> dict[str, Any]:
    conn.send({"t": "status"})
    reply = conn.recv(timeout=30)
    if not isinstance(reply, dict) or reply.get("t") != "status":
        raise ClusterrepError(f"unexpected answer from the replica: {reply!r:.200}")
    return reply["status"]


def _connect(replica: str, auth: wire.Auth | bytes, name: str | None = None) -> wire.Connection:
    return wire.connect(replica, auth, name=name or f"cli-{os.getpid()}", role="client")


def fetch_status(replica: str, auth: wire.Auth | bytes, *, name: str | None = None) -> dict[str, Any]:
    conn = _connect(replica, auth, name)
    try:
        return _ask(conn)
    finally:
        conn.close()


def pending(st: dict[str, Any], since: float) -> list[str]:
    """Why the replica is not caught up (empty when it is). ``since``: seconds waited so far."""
    out: list[str] = []
    if st.get("error"):
        out.append(f"applying stopped: {st['error']}")
    if st.get("stalled"):
        out.append(f"applying paused: {st['stalled']}")
    sync = st.get("sync")
    if sync and sync.get("state") == "awaiting":
        out.append(f"waiting for a synchronisation to start: {sync.get('reason')}")
    elif sync:
        out.append(f"synchronisation {sync.get('sync_id')} not finished ({sync.get('phase')}: "
                   f"{sync.get('files_done', 0)} of {sync.get('files', 0)} files compared)")
    if "coordinator" not in st["sources"]:
        out.append("coordinator: not heard from yet, so what the cluster did is unknown")
    members = set(st.get("members") or [])
    evicted = st.get("evicted") or {}
    for name, s in st["sources"].items():
        if name in evicted:
            continue  # what it captured and never shipped is put right from the volume
        if (name in members or name == "coordinator") and not s["connected"]:
            out.append(f"{name}: not connected to the replica, so what it captured is unknown")
        elif s["applied"] < s["captured"]:
            out.append(f"{name}: applied up to seq {s['applied']} of {s['captured']} captured "
                       f"({s['received']} received)")
        elif s["connected"] and (s["report_age"] is None or s["report_age"] > since):
            out.append(f"{name}: no report from it since the wait began")
        elif s.get("unsettled"):
            out.append(f"{name}: {s['unsettled']} file(s) still being written (their modification "
                       "times are recorded once their writers are quiet)")
    history = st.get("history")
    if history and history.get("recording") and history.get("durable", 0) < st["gseq"]:
        out.append(f"restore points after g{history.get('durable', 0)} are not durable yet (the next "
                   "checkpoint lists them)")
    if st["pending_events"] or st["queued_batches"]:
        out.append(f"{st['pending_events']} events received but not yet applied")
    out.extend(f"merge waits for {w}" for w in st.get("waiting_for") or [])
    return out


def wait_for(replica: str, auth: wire.Auth | bytes,
             timeout: float) -> tuple[bool, list[str], dict[str, Any]]:
    start = time.monotonic()
    pause(0.3)  # let every source report at least once after we started
    conn = _connect(replica, auth)  # one connection for all the polls, not one per poll
    try:
        while True:
            st = _ask(conn)
            why = pending(st, time.monotonic() - start)
            if not why:
                return True, [], st
            if time.monotonic() - start > timeout:
                return False, why, st
            pause(0.1)
    finally:
        conn.close()
