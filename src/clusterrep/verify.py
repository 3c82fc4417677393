"""Compare two directory trees: names, types, sizes, contents, symlink targets and modes.

Used by `clusterrep verify` (volume against replica) and by the tests. Files are compared in
chunks, so multi-gigabyte disk images do not need to fit in memory. Symlinks are compared by
their content and never followed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 1 << 20


@dataclass(frozen=True)
class Difference:
    path: str
    what: str  # "missing", "extra", "type", "size", "content", "mode", "symlink"
    detail: str

    def __str__(self) -> str:
        return f"{self.what:8} {self.path}: {self.detail}"

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "what": self.what, "detail": self.detail}


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special file"


def _entries(root: str) -> dict[str, os.stat_result]:
    """Every entry under ``root`` by relative path, its lstat; through directory descriptors,
    so paths longer than PATH_MAX are compared too."""
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            out[rel] = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    return out


def _open_under(root: str, rel: str, flags: int = os.O_RDONLY) -> int:
    """Open ``rel`` below ``root`` one component at a time (no PATH_MAX limit, no symlinks)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        *dirs, name = rel.split("/")
        for part in dirs:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _readlink_under(root: str, rel: str) -> str:
    head, _, name = rel.rpartition("/")
    fd = _open_under(root, f"{head}/." if head else ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.readlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def _first_difference(a: tuple[str, str], b: tuple[str, str]) -> int | None:
    """Offset of the first byte where file ``a`` and ``b`` (each: root, relative path) differ."""
    with os.fdopen(_open_under(*a), "rb") as fa, os.fdopen(_open_under(*b), "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                for i, (x, y) in enumerate(zip(ca, cb, strict=False)):
                    if x != y:
                        return offset + i
                return offset + min(len(ca), len(cb))
            if not ca:
                return None
            offset += len(ca)


def compare_trees(expected: str | os.PathLike[str], actual: str | os.PathLike[str],
                  *, modes: bool = True) -> Iterator[Difference]:
    """Yield every difference of ``actual`` from ``expected``, in path order."""
    exp_root, act_root = os.fspath(expected), os.fspath(actual)
    exp, act = _entries(exp_root), _entries(act_root)
    for path in sorted(set(exp) | set(act)):
        a, b = exp.get(path), act.get(path)
        if b is None:
            yield Difference(path, "missing", f"{_kind(a.st_mode)} missing in the replica")  # type: ignore[union-attr]
            continue
        if a is None:
            yield Difference(path, "extra", f"{_kind(b.st_mode)} not on the volume")
            continue
        ka, kb = _kind(a.st_mode), _kind(b.st_mode)
        if ka != kb:
            yield Difference(path, "type", f"{ka} on the volume, {kb} in the replica")
            continue
        if ka == "symlink":
            ta, tb = _readlink_under(exp_root, path), _readlink_under(act_root, path)
            if ta != tb:
                yield Difference(path, "symlink", f"points to {ta!r}, replica to {tb!r}")
            continue
        if modes and stat.S_IMODE(a.st_mode) != stat.S_IMODE(b.st_mode):
            yield Difference(path, "mode", f"{stat.S_IMODE(a.st_mode):o} on the volume, "
                                           f"{stat.S_IMODE(b.st_mode):o} in the replica")
        if ka == "file":
            if a.st_size != b.st_size:
                yield Difference(path, "size", f"{a.st_size} bytes on the volume, {b.st_size} "
                                               "in the replica")
                continue
            at = _first_difference((exp_root, path), (act_root, path))
            if at is not None:
                yield Difference(path, "content", f"first differing byte at offset {at}")
