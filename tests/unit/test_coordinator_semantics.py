"""The coordinator decides races between hosts: one order, checked in the step that acts.

These call `CoordinatorService` directly (no network): the same requests two hosts would send.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

import pytest

from clusterrep.coordinator.locking import LockRequest
from clusterrep.coordinator.service import CoordinatorService
from clusterrep.errors import InvalidLock, OpFailed
from clusterrep.events import Lock, decode


def _coordinator(tmp_path: Path, **kw: object) -> CoordinatorService:
    vol = tmp_path / "volume"
    vol.mkdir(exist_ok=True)
    svc = CoordinatorService(vol, tmp_path / "coord-state", **kw)  # type: ignore[arg-type]
    svc.join("h1", "h1-join")
    svc.join("h2", "h2-join")
    return svc


def test_noreplace_rename_loses_to_a_create_of_its_destination(tmp_path: Path) -> None:
    svc = _coordinator(tmp_path)
    svc.execute("h1", "create", "h1-1", {"path": "s", "mode": 0o644})
    svc.execute("h2", "create", "h2-1", {"path": "t", "mode": 0o644})
    with pytest.raises(OpFailed) as err:
        svc.execute("h1", "rename", "h1-2", {"path": "s", "dst": "t", "noreplace": True})
    assert err.value.errno == errno.EEXIST
    assert sorted(os.listdir(tmp_path / "volume")) == ["s", "t"]
    svc.execute("h1", "rename", "h1-3", {"path": "s", "dst": "u", "noreplace": True})
    assert sorted(os.listdir(tmp_path / "volume")) == ["t", "u"]
    svc.close()


def test_an_open_of_a_name_that_now_holds_another_file_is_refused_stale(tmp_path: Path) -> None:
    """The node opened inode X as ``t``; meanwhile another host renamed ``s`` over ``t``: the
    coordinator must not record an Open of ``t`` for X (the replica would diverge)."""
    svc = _coordinator(tmp_path)
    x = svc.execute("h2", "create", "h2-1", {"path": "t", "mode": 0o644})["ino"]
    svc.execute("h1", "create", "h1-1", {"path": "s", "mode": 0o644})
    svc.execute("h1", "rename", "h1-2", {"path": "s", "dst": "t"})
    with pytest.raises(OpFailed) as err:
        svc.execute("h2", "open", "h2-2", {"path": "t", "ino": x})
    assert err.value.errno == errno.ESTALE
    svc.close()


def test_an_operation_in_a_directory_renamed_meanwhile_is_refused_stale(tmp_path: Path) -> None:
    svc = _coordinator(tmp_path)
    svc.execute("h1", "mkdir", "h1-1", {"path": "d", "mode": 0o755})
    d = os.lstat(tmp_path / "volume" / "d").st_ino
    svc.execute("h2", "rename", "h2-1", {"path": "d", "dst": "e"})
    svc.execute("h2", "mkdir", "h2-2", {"path": "d", "mode": 0o755})  # a new, different d
    with pytest.raises(OpFailed) as err:
        svc.execute("h1", "create", "h1-2", {"path": "d/x", "mode": 0o644, "dir_ino": d})
    assert err.value.errno == errno.ESTALE
    assert os.listdir(tmp_path / "volume" / "d") == []  # nothing created in the wrong one
    svc.execute("h1", "create", "h1-3", {"path": "e/x", "mode": 0o644, "dir_ino": d})
    assert os.listdir(tmp_path / "volume" / "e") == ["x"]
    svc.close()


def _lock(ino: int, owner: int, ltype: int, **kw: object) -> LockRequest:
    return LockRequest.parse({"ino": ino, "path": "db", "kind": "posix", "owner": owner,
                              "type": ltype, "start": 0, "end": 99, **kw})


def test_a_lock_that_changes_hands_between_nodes_is_a_mark_and_only_then(tmp_path: Path) -> None:
    svc = _coordinator(tmp_path)
    ino = svc.execute("h1", "create", "h1-1", {"path": "db", "mode": 0o644})["ino"]
    first = svc.file_lock("h1", "h1-2", _lock(ino, 1, fcntl.F_WRLCK))
    assert first["granted"] and "event" not in first  # nobody held it before
    svc.file_lock("h1", "h1-3", _lock(ino, 1, fcntl.F_UNLCK))
    again = svc.file_lock("h1", "h1-4", _lock(ino, 1, fcntl.F_WRLCK))
    assert again["granted"] and "event" not in again  # the same node again: no mark needed
    refused = svc.file_lock("h2", "h2-1", _lock(ino, 9, fcntl.F_WRLCK, wait=True))
    assert not refused["granted"]
    woken: list[tuple[set[str], int]] = []
    svc.on_unlock = lambda nodes, i: woken.append((nodes, i))
    svc.file_lock("h1", "h1-5", _lock(ino, 1, fcntl.F_UNLCK))
    assert woken == [({"h2"}, ino)]  # the waiter is told
    handed = svc.file_lock("h2", "h2-2", _lock(ino, 9, fcntl.F_WRLCK))
    ev = decode(handed["event"])
    assert isinstance(ev, Lock) and ev.origin == "h2" and ev.path == "db"
    assert ev.gseq == handed["gseq"] == svc.gseq  # a mark after everything h1 did before
    svc.close()


def test_a_nodes_locks_go_when_it_leaves_or_its_lease_runs_out(tmp_path: Path) -> None:
    svc = _coordinator(tmp_path, lease=0.3)
    svc.renew("h1")
    svc.file_lock("h1", "h1-1", _lock(5, 1, fcntl.F_WRLCK))
    svc.node_gone("h1")  # its link broke: it may still be alive and hold the lock
    svc.renew("h2")
    assert not svc.file_lock("h2", "h2-1", _lock(5, 2, fcntl.F_WRLCK))["granted"]
    time.sleep(0.4)  # h1 is silent for longer than its lease
    svc.renew("h2")
    assert svc.file_lock("h2", "h2-2", _lock(5, 2, fcntl.F_WRLCK))["granted"]
    svc.leave("h2", "h2-3")
    assert svc.locks.locks(5) == []
    svc.close()


def test_after_a_restart_no_lock_is_granted_until_holders_reclaimed(tmp_path: Path) -> None:
    svc = _coordinator(tmp_path)
    svc.file_lock("h1", "h1-1", _lock(5, 1, fcntl.F_WRLCK))
    held = svc.locks.held_by("h1")
    svc.close()
    svc = CoordinatorService(tmp_path / "volume", tmp_path / "coord-state", lock_grace=30)
    grace = svc.file_lock("h2", "h2-1", _lock(5, 2, fcntl.F_WRLCK))
    assert grace["grace"] and not grace["granted"]  # h1 may still hold it
    svc.reclaim("h1", held)
    svc.reclaim("h2", [])
    assert not svc.in_grace()  # every member reclaimed: over early
    assert not svc.file_lock("h2", "h2-2", _lock(5, 2, fcntl.F_WRLCK))["granted"]
    svc.close()


@pytest.mark.parametrize("bad", [
    {"kind": "nfs"}, {"type": 99}, {"start": 10, "end": 5}, {"owner": "me"}, {"ino": None},
])
def test_a_malformed_lock_request_is_refused(bad: dict[str, object]) -> None:
    msg = {"ino": 5, "path": "db", "kind": "posix", "owner": 1, "type": fcntl.F_WRLCK,
           "start": 0, "end": 99, **bad}
    with pytest.raises(InvalidLock):
        LockRequest.parse(msg)


def test_a_rename_onto_itself_leaves_the_file_writable_and_named(tmp_path: Path) -> None:
    """Found by the race property: ``rename(s0, s0)`` took s0 for a file without a name, so
    later writes to it were not recorded and the replica differed."""
    svc = _coordinator(tmp_path)
    ino = svc.execute("h1", "create", "h1-1", {"path": "s0", "mode": 0o644})["ino"]
    svc.execute("h2", "rename", "h2-1", {"path": "s0", "dst": "s0"})
    reply = svc.acquire("h2", "h2-2", ino, "s0")
    assert not reply.get("gone") and reply["path"] == "s0"
    svc.close()


@pytest.mark.parametrize("msg", [
    {"op": "lock", "op_id": "x1", "ino": 5, "path": "a\0b", "kind": "posix", "owner": 1,
     "type": fcntl.F_WRLCK, "start": 0, "end": 9},
    {"op": "lock", "op_id": "x2", "ino": 5, "path": "../etc", "kind": "flock", "owner": 1,
     "type": fcntl.LOCK_EX},
    {"op": "reclaim", "op_id": "x3", "locks": [1, 2, 3]},
    {"op": "reclaim", "op_id": "x4", "locks": [None]},
    {"op": "reclaim", "op_id": "x5", "locks": [{"kind": "posix", "ino": 5, "owner": 5}]},
    {"op": "where", "op_id": "x6", "ino": 5, "path": "../token"},
    {"op": "where", "op_id": "x7", "ino": 5, "path": "a\0b"},
    {"op": "acquire", "op_id": "x8", "ino": 5, "path": "/etc/passwd"},
])
def test_hostile_requests_are_refused_and_change_nothing(tmp_path: Path, msg: dict) -> None:
    """Found by review: these crashed the handler (a traceback, EIO) after changing the lock
    table, or resolved paths outside the volume."""
    from clusterrep.coordinator.requests import answer
    from clusterrep.errors import InvalidLock as Refused

    svc = _coordinator(tmp_path)
    with pytest.raises((OpFailed, Refused)) as err:
        answer(svc, "h2", msg)
    if isinstance(err.value, OpFailed):
        assert err.value.errno == errno.EINVAL
    assert svc.locks.locks(5) == [] and svc.locks.flocks(5) == {}
    assert svc.paths == {}
    svc.close()


def test_a_reclaim_from_an_epoch_that_ran_out_is_refused(tmp_path: Path) -> None:
    """A node whose lease ran out (its locks were given away) must not get them back by
    reclaiming them after a coordinator restart."""
    svc = _coordinator(tmp_path, lease=0.1)
    svc.renew("h1")
    svc.file_lock("h1", "h1-1", _lock(5, 1, fcntl.F_WRLCK))
    held, epoch = svc.locks.held_by("h1"), svc.epoch("h1")
    time.sleep(0.2)
    svc.renew("h2")
    assert svc.file_lock("h2", "h2-1", _lock(5, 2, fcntl.F_WRLCK))["granted"]  # h1 expired
    assert svc.epoch("h1") == epoch + 1
    svc.close()
    svc = CoordinatorService(tmp_path / "volume", tmp_path / "coord-state", lock_grace=30)
    with pytest.raises(OpFailed) as err:
        svc.reclaim("h1", held, epoch)
    assert err.value.errno == errno.ESTALE
    assert svc.epoch("h1") == epoch + 1  # the epoch survives the restart
    assert svc.locks.locks(5) == []
    svc.close()


def test_searching_the_volume_for_a_file_never_holds_the_coordinator(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """Found by review: a ``where`` for an inode nothing knew walked the whole volume with the
    coordinator's lock held, so every other host's operations waited for it."""
    import threading

    import clusterrep.coordinator.service as service

    svc = _coordinator(tmp_path)
    (tmp_path / "volume" / "d").mkdir()
    (tmp_path / "volume" / "d" / "f").write_text("made outside the coordinator")
    ino = os.lstat(tmp_path / "volume" / "d" / "f").st_ino
    free: list[bool] = []
    real_walk = os.walk

    def walk(top):  # another host's operation must be able to run now
        t = threading.Thread(target=lambda: free.append(svc.lock.acquire(timeout=5) and
                                                        (svc.lock.release() or True)))
        t.start()
        t.join()
        return real_walk(top)

    monkeypatch.setattr(service.os, "walk", walk)
    assert svc.where(ino, "not/where/it/is") == "d/f"
    assert free == [True]
    svc.close()


@pytest.mark.parametrize("op", ["setattr", "truncate"])
def test_a_crash_between_intent_and_volume_change_completes_the_operation(tmp_path: Path,
                                                                          op: str) -> None:
    """Found by the coordinator-restart test: a chmod noted as intent but cut off by a crash
    before it ran was recorded on restart without running, so the replica got the new mode
    and the volume kept the old one."""
    from clusterrep.events import SetAttr, Truncate

    svc = _coordinator(tmp_path)
    svc.execute("h1", "create", "h1-1", {"path": "f", "mode": 0o644})
    (tmp_path / "volume" / "f").write_bytes(b"x" * 100)
    cls, fields = ((SetAttr, {"path": "f", "mode": 0o600}) if op == "setattr"
                   else (Truncate, {"path": "f", "size": 7}))
    with svc.lock:
        svc._intent(cls, "h1", "h1-2", fields)  # ... and the coordinator dies here
    svc.journal.close()
    svc = CoordinatorService(tmp_path / "volume", tmp_path / "coord-state")
    st = os.stat(tmp_path / "volume" / "f")
    assert (st.st_mode & 0o777, st.st_size) == ((0o600, 100) if op == "setattr" else (0o644, 7))
    last = decode(svc.journal.read(svc.gseq, max_bytes=1 << 20)[0][1])
    assert isinstance(last, cls) and last.op_id == "h1-2"  # recorded once, as it ran
    svc.close()


@pytest.mark.parametrize("case", ["create over an existing name", "setxattr not run",
                                  "removexattr of a missing attribute", "setxattr run"])
def test_recovery_records_only_what_the_cut_off_operation_did(tmp_path: Path, case: str) -> None:
    """Found by review: recovery took "the name exists" for "the create ran" (and gave someone
    else's file the caller's owner and mode), and any setxattr or removexattr for run."""
    from clusterrep.coordinator.namespace import Options
    from clusterrep.events import Create, RemoveXattr, SetXattr

    svc = _coordinator(tmp_path)
    svc.execute("h2", "create", "h2-1", {"path": "theirs", "mode": 0o600})
    f = tmp_path / "volume" / "theirs"
    os.setxattr(f, "user.kept", b"old")
    before, gseq = os.stat(f), svc.gseq
    with svc.lock:  # the coordinator notes the intent, and dies before the volume changes
        if case == "create over an existing name":
            fields = {"path": "theirs", "mode": 0o777}
            svc._intent(Create, "h1", "h1-9", fields,
                        extra=svc._new_extra(fields, Options(uid=4242, gid=4242, umask=0)))
        elif case == "setxattr not run":
            svc._intent(SetXattr, "h1", "h1-9", {"path": "theirs", "name": "user.kept", "value": b"new"})
        elif case == "removexattr of a missing attribute":
            svc._intent(RemoveXattr, "h1", "h1-9", {"path": "theirs", "name": "user.none"},
                        extra={"had": False})
        else:
            svc._intent(SetXattr, "h1", "h1-9", {"path": "theirs", "name": "user.new", "value": b"v"})
            os.setxattr(f, "user.new", b"v")  # it ran
    svc.journal.close()
    svc = CoordinatorService(tmp_path / "volume", tmp_path / "coord-state")
    after = os.stat(f)
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
    assert os.getxattr(f, "user.kept") == b"old"
    assert svc.gseq == gseq + (1 if case == "setxattr run" else 0)
    svc.close()
