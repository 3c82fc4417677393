"""Metadata operations, the coordinator's part: each executed on the volume in one order.

`Namespace` is the part of `CoordinatorService` that executes create, open, close, mkdir,
rmdir, unlink, rename, truncate, setattr and symlink, one small handler per kind. Each checks,
in the same locked step that acts, that the paths the node computed still lead to the inode or
directory it meant (`Options`; ESTALE if not, and the node retries), notes an intent record
before changing the volume, recalls the write tokens the operation conflicts with, and
journals the event (its gseq).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..confined import Target
from ..errors import ApplyError, OpFailed
from ..events import (
    Close,
    Create,
    MetaEvent,
    Mkdir,
    Open,
    Rename,
    Rmdir,
    SetAttr,
    Symlink,
    Truncate,
    Unlink,
    encode,
)

UNKNOWN = "\0unknown"  # `_resolve`: not known without a search (never a path: paths have no NUL)

KINDS: dict[str, type[MetaEvent]] = {
    "create": Create, "open": Open, "close": Close, "mkdir": Mkdir, "rmdir": Rmdir,
    "unlink": Unlink, "rename": Rename, "truncate": Truncate, "setattr": SetAttr,
    "symlink": Symlink,
}


@dataclass(frozen=True)
class Options:
    """What a request says beyond the event's fields (see `CoordinatorService.execute`)."""

    ino: Any = None
    noreplace: bool = False
    dir_ino: Any = None
    dst_dir_ino: Any = None


Handler = Callable[[str, str, dict[str, Any], Options], dict[str, Any]]


class Namespace:
    """Mixed into `CoordinatorService`; uses its lock, volume, journal and token table."""

    lock: threading.RLock
    vol: Target
    paths: dict[int, str]
    orphans: Any
    _handlers: dict[type[MetaEvent], Handler]

    # provided by CoordinatorService
    _record: Callable[..., MetaEvent]
    _resolve: Callable[[int, str], str | None]
    locate: Callable[[int, str], str | None]
    _durable: Callable[[], None]
    _validate: Callable[[type[MetaEvent], str, str, dict[str, Any]], None]
    _intent: Callable[[type[MetaEvent], str, str, dict[str, Any]], None]
    _intent_done: Callable[[], None]
    _free: Callable[[Callable[[], list[int]], Callable[[], Any]], Any]
    _forget: Callable[[int], None]

    def execute(self, node: str, kind: str, op_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Execute one metadata operation for ``node``; raise `OpFailed` with an errno.

        ``fields`` are the event's fields plus options that are not part of the event:
        ``ino`` (the inode the caller means: it must still be the one at ``path``),
        ``dir_ino``/``dst_dir_ino`` (the directory the caller means: it must still be the one
        that holds ``path``/``dst``) and ``noreplace`` (rename: fail with EEXIST if ``dst``
        exists, atomically). Those checks are made in the same locked step as the operation;
        a failed one answers ESTALE (the caller looks again and retries) and changes nothing.
        """
        cls = KINDS.get(kind)
        if cls is None:
            raise OpFailed(f"unknown operation {kind!r}", errno.EINVAL)
        opts = Options(ino=fields.pop("ino", None), noreplace=bool(fields.pop("noreplace", False)),
                       dir_ino=fields.pop("dir_ino", None), dst_dir_ino=fields.pop("dst_dir_ino", None))
        for name in ("atime_ns", "mtime_ns"):
            if fields.get(name) == "now":  # the coordinator's clock, not a node's skewed one
                fields[name] = time.time_ns()
        self._validate(cls, node, op_id, fields)
        try:
            result = self._handlers[cls](node, op_id, fields, opts)
        except ApplyError as exc:
            self._intent_done()  # it failed: nothing happened on the volume
            raise OpFailed(str(exc), exc.errno) from None
        except OSError as exc:
            self._intent_done()
            raise OpFailed(f"{kind} failed: {exc}", exc.errno or errno.EIO) from None
        self._durable()
        return result

    def where(self, ino: int, hint: str) -> str | None:
        """The current path of file ``ino`` (None once it has no name)."""
        return self.locate(ino, hint)

    def _ino_of(self, path: str) -> int | None:
        try:
            st = self.vol.lstat(path)
        except (OSError, ApplyError):
            return None
        return st.st_ino if stat.S_ISREG(st.st_mode) else None

    def _under(self, path: str) -> list[int]:
        return [ino for ino, p in self.paths.items() if p == path or p.startswith(path + "/")]

    def _verify(self, f: dict[str, Any], opts: Options) -> None:
        """The paths the caller computed still lead to what it meant (lock held); ESTALE if not."""
        checks = [(f["path"], opts.ino)]
        checks += [(f[key].rpartition("/")[0], ino)
                   for key, ino in (("path", opts.dir_ino), ("dst", opts.dst_dir_ino))
                   if isinstance(ino, int)]
        for path, ino in checks:
            if not isinstance(ino, int):
                continue
            try:
                found = self.vol.lstat(path).st_ino if path else os.fstat(self.vol.root_fd).st_ino
            except (OSError, ApplyError):
                found = None
            if found != ino:
                raise OpFailed(f"{path or 'the volume root'!r} is no longer inode {ino}: it was "
                               "renamed or removed meanwhile", errno.ESTALE)

    def _truncate(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        path = f["path"]

        def truncate() -> dict[str, Any]:
            self._verify(f, opts)
            self._intent(Truncate, node, op_id, f)
            self.vol.truncate(path, f["size"])
            return self._done(Truncate, node, op_id, f)
        return self._free(lambda: [i for i in [self._ino_of(path)] if i is not None], truncate)

    def _unlink(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        path = f["path"]

        def unlink() -> dict[str, Any]:
            self._verify(f, opts)
            ino = self._ino_of(path)
            self._intent(Unlink, node, op_id, f)
            self.vol.unlink(path, missing_ok=False)
            if ino is not None:
                self._forget(ino)
            return self._done(Unlink, node, op_id, f)
        return self._free(lambda: [i for i in [self._ino_of(path)] if i is not None], unlink)

    def _rename_op(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        return self._free(lambda: self._rename_inos(f["path"], f["dst"]),
                          lambda: self._rename(node, op_id, f, opts))

    def _create(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        with self.lock:
            self._verify(f, opts)
            self._intent(Create, node, op_id, f)
            self.vol.create(f["path"], f.get("mode", 0o644), exist_ok=False)
            ino = self.vol.lstat(f["path"]).st_ino
            self.paths[ino] = f["path"]
            self.orphans.pop(ino, None)
            result = self._done(Create, node, op_id, f)
            self.holders[ino] = node  # the creator holds the token
            result["ino"] = ino
            return result

    def _open(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        with self.lock:
            st = self.vol.lstat(f["path"])
            if not stat.S_ISREG(st.st_mode):
                raise OpFailed(f"{f['path']!r} is not a regular file", errno.EISDIR)
            if isinstance(opts.ino, int) and st.st_ino != opts.ino:
                # the node opened another file under this name than the one there now: its open
                # raced a rename or unlink; it opens again (the order is the coordinator's)
                raise OpFailed(f"{f['path']!r} changed while being opened", errno.ESTALE)
            self.paths[st.st_ino] = f["path"]
            self.orphans.pop(st.st_ino, None)
            result = self._done(Open, node, op_id, f)
            result["ino"] = st.st_ino
            return result

    def _close(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        with self.lock:
            if isinstance(opts.ino, int):
                path = self._resolve(opts.ino, f["path"])
                if path is None or path is UNKNOWN:  # unlinked meanwhile, or not to be found
                    return {"gseq": self.gseq, "event": None}  # cheaply: a Close is only a mark
                f = {**f, "path": path}
            return self._done(Close, node, op_id, f)

    def _simple(self, cls: type[MetaEvent], run: Callable[[dict[str, Any]], None]) -> Handler:
        """A handler for an operation that needs no token: note the intent, run, record."""

        def handler(node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
            with self.lock:
                self._verify(f, opts)
                self._intent(cls, node, op_id, f)
                run(f)
                return self._done(cls, node, op_id, f)
        return handler

    def _handler_table(self) -> dict[type[MetaEvent], Handler]:
        vol = self.vol
        return {
            Create: self._create, Open: self._open, Close: self._close,
            Truncate: self._truncate, Unlink: self._unlink, Rename: self._rename_op,
            Mkdir: self._simple(Mkdir, lambda f: vol.mkdir(f["path"], f.get("mode", 0o755),
                                                           exist_ok=False)),
            Rmdir: self._simple(Rmdir, lambda f: vol.rmdir(f["path"], missing_ok=False)),
            Symlink: self._simple(Symlink, lambda f: vol.symlink(f["path"], f["target"],
                                                                 replace=False)),
            SetAttr: self._simple(SetAttr, lambda f: vol.setattr(
                f["path"], f.get("mode"), f.get("atime_ns"), f.get("mtime_ns"))),
        }

    def _done(self, cls: type[MetaEvent], node: str, op_id: str, f: dict[str, Any]) -> dict[str, Any]:
        ev = self._record(cls, node, op_id, **f)
        return {"gseq": ev.gseq, "event": encode(ev)}

    def _rename_inos(self, src: str, dst: str) -> list[int]:
        inos = self._under(src)
        for p in (src, dst):
            ino = self._ino_of(p)
            if ino is not None:
                inos.append(ino)
        return inos

    def _rename(self, node: str, op_id: str, f: dict[str, Any], opts: Options) -> dict[str, Any]:
        self._verify(f, opts)
        noreplace = opts.noreplace
        src, dst = f["path"], f["dst"]
        replaced = self._ino_of(dst)
        if replaced is not None and replaced == self._ino_of(src):
            replaced = None  # a rename onto the same file (itself, or a hard link) does nothing
        self._intent(Rename, node, op_id, f)
        self.vol.rename(src, dst, noreplace=noreplace)
        if replaced is not None:
            self._forget(replaced)
        for ino, p in list(self.paths.items()):
            if p == src:
                self.paths[ino] = dst
            elif p.startswith(src + "/"):
                self.paths[ino] = dst + p[len(src):]
        return self._done(Rename, node, op_id, f)
