"""Monkey-patches for mfusepy 3.1.1 on libfuse 3 (import after mfusepy).

mfusepy.FUSE drops arguments that libfuse 3 passes:
  * rename(old, new, flags)            -> flags (RENAME_NOREPLACE/RENAME_EXCHANGE) dropped:
                                          an EXCHANGE becomes a plain, destructive rename
  * truncate(path, length, fi)         -> fi dropped (ftruncate(fd) arrives as path truncate;
                                          path is None for an unlinked open file with hard_remove)
  * chmod/chown/utimens(path, ..., fi) -> fi dropped
install() re-routes rename and truncate so Operations get flags / fh. Operations.rename
must then accept (old, new, flags).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import mfusepy as fuse

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(olddirfd: int, old: str, newdirfd: int, new: str, flags: int) -> None:
    if _libc.renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def install() -> None:
    def rename_fuse_3(self, old, new, flags):
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)

    def truncate_fuse_3(self, path, length, fip):
        fh = (fip.contents if self.raw_fi else fip.contents.fh) if fip else None
        return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                        length, fh)

    fuse.FUSE.rename_fuse_3 = rename_fuse_3
    fuse.FUSE.truncate_fuse_3 = truncate_fuse_3
