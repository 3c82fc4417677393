"""Durable file writes, done one way everywhere: write temp, fsync, rename, fsync the directory."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import ClusterrepError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that after a crash it holds either the old or new bytes.

    The file gets exactly ``mode`` (whatever the umask). The temporary file has a fresh random
    name and is created exclusively, never following a symlink, so nothing left behind (or
    planted) under a predictable name can receive the data or its permissions.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def syncfs(fd: int) -> None:
    """Flush every dirty page and inode of the file system holding ``fd`` (syncfs(2))."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")


def load_json_map(path: str | os.PathLike[str], *, hint: str) -> dict[str, Any]:
    """The JSON object kept in ``path`` by `atomic_write` ({} if there is none); a damaged one
    raises `ClusterrepError` with ``hint`` (what the operator can do)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError:
        raise ClusterrepError(f"{os.fspath(path)} is damaged", hint=hint) from None
    return data if isinstance(data, dict) else {}


def generation_of(path: str | os.PathLike[str], *, create: bool) -> str | None:
    """The cluster generation recorded at ``path`` (a short hex id), creating a new one when
    there is none and ``create`` is set (a coordinator's first start: a new incarnation of the
    cluster); None when there is none and ``create`` is not set."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        if not create:
            return None
        text = secrets.token_hex(8)
        atomic_write(path, text.encode())
    return text


def record_generation(path: str | os.PathLike[str], generation: str) -> None:
    """Remember the generation a node or replica first worked for."""
    atomic_write(path, generation.encode())
