"""An in-memory volume: the simulator's ground truth, written independently of the applier.

A tree is compared as a *snapshot*: ``{path: ("f", mode, bytes) | ("d", mode) | ("l", target)}``
for every entry below the root. `read_tree` reads a real directory into the same form, so the
replica on disk can be compared with the truth byte for byte.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..events import (
    Create,
    Event,
    Mkdir,
    Rename,
    Rmdir,
    SetAttr,
    Symlink,
    Truncate,
    Unlink,
    Write,
)

Snapshot = dict[str, tuple]


@dataclass
class File:
    mode: int
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Dir:
    mode: int


@dataclass
class Link:
    target: str


class VolumeError(Exception):
    """The simulated volume refused an operation (a bug in the workload generator)."""


def _under(path: str, parent: str) -> bool:
    return path.startswith(parent + "/")


class Volume:
    def __init__(self) -> None:
        self.entries: dict[str, File | Dir | Link] = {}

    # -- queries -----------------------------------------------------------------------------

    def kind(self, path: str) -> str | None:
        entry = self.entries.get(path)
        if entry is None:
            return None
        return {File: "f", Dir: "d", Link: "l"}[type(entry)]

    def parent_ok(self, path: str) -> bool:
        head = path.rpartition("/")[0]
        return not head or isinstance(self.entries.get(head), Dir)

    def children(self, path: str) -> list[str]:
        return [p for p in self.entries if p.rpartition("/")[0] == path]

    def files(self) -> list[str]:
        return [p for p, e in self.entries.items() if isinstance(e, File)]

    def dirs(self) -> list[str]:
        return [p for p, e in self.entries.items() if isinstance(e, Dir)]

    # -- changes -----------------------------------------------------------------------------

    def apply(self, ev: Event) -> None:
        """Apply one event with POSIX semantics; raise `VolumeError` if the volume would refuse."""
        cls = type(ev)
        e = self.entries
        if cls is Write:
            f = self._file(ev.path)  # type: ignore[attr-defined]
            end = ev.offset + len(ev.data)  # type: ignore[attr-defined]
            if len(f.data) < ev.offset:  # type: ignore[attr-defined]
                f.data.extend(bytes(ev.offset - len(f.data)))  # type: ignore[attr-defined]
            f.data[ev.offset:end] = ev.data  # type: ignore[attr-defined]
        elif cls is Truncate:
            f = self._file(ev.path)  # type: ignore[attr-defined]
            size = ev.size  # type: ignore[attr-defined]
            if size < len(f.data):
                del f.data[size:]
            else:
                f.data.extend(bytes(size - len(f.data)))
        elif cls in (Create, Mkdir, Symlink):
            path = ev.path  # type: ignore[attr-defined]
            if path in e or not self.parent_ok(path):
                raise VolumeError(f"cannot create {path!r}")
            if cls is Create:
                e[path] = File(ev.mode)  # type: ignore[attr-defined]
            elif cls is Mkdir:
                e[path] = Dir(ev.mode)  # type: ignore[attr-defined]
            else:
                e[path] = Link(ev.target)  # type: ignore[attr-defined]
        elif cls is Unlink:
            if self.kind(ev.path) not in ("f", "l"):  # type: ignore[attr-defined]
                raise VolumeError(f"cannot unlink {ev.path!r}")  # type: ignore[attr-defined]
            del e[ev.path]  # type: ignore[attr-defined]
        elif cls is Rmdir:
            if self.kind(ev.path) != "d" or self.children(ev.path):  # type: ignore[attr-defined]
                raise VolumeError(f"cannot rmdir {ev.path!r}")  # type: ignore[attr-defined]
            del e[ev.path]  # type: ignore[attr-defined]
        elif cls is Rename:
            self._rename(ev.path, ev.dst)  # type: ignore[attr-defined]
        elif cls is SetAttr:
            entry = e.get(ev.path)  # type: ignore[attr-defined]
            if entry is None:
                raise VolumeError(f"cannot setattr {ev.path!r}")  # type: ignore[attr-defined]
            if ev.mode is not None and not isinstance(entry, Link):  # type: ignore[attr-defined]
                entry.mode = ev.mode  # type: ignore[attr-defined, union-attr]
        # Open, Close, Acquire, Join, Leave, Tick: nothing on disk

    def _file(self, path: str) -> File:
        f = self.entries.get(path)
        if not isinstance(f, File):
            raise VolumeError(f"{path!r} is not a file")
        return f

    def _rename(self, src: str, dst: str) -> None:
        e = self.entries
        s = e.get(src)
        if s is None or not self.parent_ok(dst) or src == dst or _under(dst, src):
            raise VolumeError(f"cannot rename {src!r} to {dst!r}")
        d = e.get(dst)
        if isinstance(s, Dir):
            if d is not None and (not isinstance(d, Dir) or self.children(dst)):
                raise VolumeError(f"cannot rename dir {src!r} over {dst!r}")
            moved = {p: v for p, v in e.items() if _under(p, src)}
            for p in moved:
                del e[p]
            e.pop(dst, None)
            del e[src]
            e[dst] = s
            for p, v in moved.items():
                e[dst + p[len(src):]] = v
        else:
            if isinstance(d, Dir):
                raise VolumeError(f"cannot rename file {src!r} over dir {dst!r}")
            del e[src]
            e[dst] = s

    def snapshot_of(self, path: str) -> tuple | None:
        """One entry in snapshot form (None if absent)."""
        entry = self.entries.get(path)
        if entry is None:
            return None
        if isinstance(entry, File):
            return ("f", entry.mode, bytes(entry.data))
        if isinstance(entry, Dir):
            return ("d", entry.mode)
        return ("l", entry.target)

    def snapshot(self) -> Snapshot:
        out: Snapshot = {}
        for path, entry in self.entries.items():
            if isinstance(entry, File):
                out[path] = ("f", entry.mode, bytes(entry.data))
            elif isinstance(entry, Dir):
                out[path] = ("d", entry.mode)
            else:
                out[path] = ("l", entry.target)
        return out


def read_tree(root: str | os.PathLike[str]) -> Snapshot:
    """Read a real directory tree into a snapshot (never following symlinks)."""
    root = os.fspath(root)
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    out[rel] = ("f", stat.S_IMODE(st.st_mode), fh.read())
            else:
                out[rel] = ("?", stat.S_IFMT(st.st_mode))
    return out


def diff(expected: Snapshot, actual: Snapshot, limit: int = 10) -> list[str]:
    """Readable differences between two snapshots, at most ``limit`` lines."""
    lines: list[str] = []
    for path in sorted(set(expected) | set(actual)):
        a, b = expected.get(path), actual.get(path)
        if a == b:
            continue
        if a is None:
            lines.append(f"extra in actual: {path} ({b[0] if b else ''})")
        elif b is None:
            lines.append(f"missing in actual: {path} ({a[0]})")
        elif a[0] != b[0]:
            lines.append(f"type differs: {path}: {a[0]} vs {b[0]}")
        elif a[0] == "f" and a[2] != b[2]:
            first = next((i for i, (x, y) in enumerate(zip(a[2], b[2], strict=False)) if x != y),
                         min(len(a[2]), len(b[2])))
            lines.append(f"content differs: {path}: sizes {len(a[2])} vs {len(b[2])}, "
                         f"first difference at byte {first}")
        else:
            lines.append(f"differs: {path}: {a[:2]} vs {b[:2]}")
        if len(lines) >= limit:
            lines.append("...")
            break
    return lines
