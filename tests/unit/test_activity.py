"""The node's activity log: what it records before a write, what survives a crash, and how few
fdatasyncs a sequential writer costs."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from unittest import mock

from clusterrep.node.activity import EXTENT, LOOKAHEAD, ActivityLog

MiB = 1 << 20


def locks(ino: int) -> threading.Lock:
    return threading.Lock()


def counting_fdatasync() -> tuple[mock._patch, list[int]]:  # type: ignore[type-arg]
    calls: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    return mock.patch("os.fdatasync", fdatasync), calls


def test_an_extent_is_on_disk_before_the_write_and_survives_a_crash(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "activity")
    log.activate(7, "vm/a.img", 5 * MiB + 100, 4096)
    log.activate(7, "vm/a.img", 5 * MiB + 8192, 4096)   # same extent: nothing new
    log.activate(8, "b", 2 * MiB - 10, 20)               # straddles two extents
    # a crash here: a new log object on the same file sees every extent
    again = ActivityLog(tmp_path / "activity")
    assert sorted(again.recovered) == [(7, "vm/a.img", 5), (8, "b", 1), (8, "b", 2)]


def test_a_sequential_writer_pays_one_fdatasync_per_16_mib(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "activity")
    patch, calls = counting_fdatasync()
    with patch:
        for off in range(0, 64 * MiB, 128 * 1024):   # 64 MiB in FUSE-sized pieces
            log.activate(1, "seq", off, 128 * 1024)
    assert len(calls) <= 64 // (LOOKAHEAD + 1) + 2
    recovered = ActivityLog(tmp_path / "activity").recovered
    written = {off // EXTENT for off in range(0, 64 * MiB, MiB)}
    assert written <= {e for _, _, e in recovered}, "every extent written must be on record"


def test_random_writers_do_not_activate_ahead(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "activity")
    for e in (40, 3, 17, 90):
        log.activate(1, "rand", e * EXTENT + 512, 4096)
    assert sorted(e for _, _, e in ActivityLog(tmp_path / "activity").recovered) == [3, 17, 40, 90]


def test_retire_and_clean_close_forget_extents(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "activity")
    log.activate(1, "f", 0, 10)
    log.activate(2, "g", 0, 10)
    assert log.retire(-1.0, locks) == 2          # idle for "longer than -1 s": all of them
    assert ActivityLog(tmp_path / "activity").recovered == []
    log.activate(3, "h", 0, 10)
    log.close_clean()
    assert ActivityLog(tmp_path / "activity").recovered == []


def test_an_extent_leaves_the_log_only_after_its_records_are_durable(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "activity")
    log.activate(1, "f", 0, 10)
    seen: list[list] = []

    def make_durable() -> None:  # the spool's sync: the extent must still be on record here
        seen.append(ActivityLog(tmp_path / "activity").recovered)

    assert log.retire(-1.0, locks, make_durable) == 1
    assert seen == [[(1, "f", 0)]]
    assert ActivityLog(tmp_path / "activity").recovered == []
