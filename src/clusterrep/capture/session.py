"""A FUSE session on ``/dev/fuse``, without libfuse: mount, read requests, dispatch, reply.

`mount_fuse` mounts with ``fusermount3`` (it works for root and, where /etc/fuse.conf allows,
for other users; with ``auto_unmount`` it stays behind and unmounts if this process dies) and
receives the ``/dev/fuse`` descriptor over a socket. `Session.serve` answers the kernel's
``INIT`` and then runs worker threads that each read one request at a time and call the
handler for its opcode; a new worker starts whenever all are busy (a program blocked on a lock
holds one), up to `MAX_WORKERS`. Handlers return the reply's payload (bytes, or None for an
empty reply) or raise OSError with the errno to answer; anything else is logged and answered
with EIO, so a bug never takes the mount down.

A request the kernel interrupts (the calling program got a signal) is marked: a handler that
waits asks `Session.interrupted` and gives up with EINTR. A handler that would wait for long
(a program blocked on a lock) returns `DEFERRED` and answers later with `Session.finish` from
a thread of its own, so blocked programs never use up the workers.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ClusterrepError
from . import kernel as k

log = logging.getLogger("clusterrep.capture")

MAX_WRITE = 1 << 20  # largest WRITE request (1 MiB: sequential I/O in few requests)
BUFFER = MAX_WRITE + 4096  # a request: header, write header, data
MAX_WORKERS = 256
NO_REPLY = object()  # a handler's answer for FORGET-like requests, which get none
DEFERRED = object()  # a handler's answer when it will `finish` the request later, elsewhere

Handler = Callable[[k.Header, memoryview], Any]


def mount_fuse(mountpoint: str, options: str) -> tuple[int, socket.socket]:
    """Mount a FUSE file system at ``mountpoint`` through fusermount3; return the /dev/fuse
    descriptor and the socket that keeps fusermount3's auto-unmount watch (close it last)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
    try:
        proc = subprocess.Popen(["fusermount3", "-o", options, "--", mountpoint], env=env,
                                pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE)
    except OSError as exc:
        raise ClusterrepError(f"cannot run fusermount3: {exc}", hint="apt-get install fuse3") from None
    theirs.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    except OSError:
        fds = []
    if not fds:
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        proc.wait()
        ours.close()
        raise ClusterrepError(f"fusermount3 could not mount {mountpoint}: {err or 'no reason given'}",
                              hint="is /dev/fuse usable here, and the mount point an empty directory?")
    if "auto_unmount" not in options:
        proc.wait()
    return fds[0], ours


class Session:
    """Serves one mounted FUSE connection with ``handlers`` (opcode -> handler)."""

    def __init__(self, fd: int, handlers: dict[int, Handler], *, init_flags: int) -> None:
        self.fd = fd
        self.handlers = handlers
        self.want = init_flags
        self.minor = k.MINOR
        self._lock = threading.Lock()
        self._workers = 0
        self._idle = 0
        self._done = threading.Event()
        self._inflight: set[int] = set()
        self._interrupted: set[int] = set()
        self._early: set[int] = set()  # interrupts that overtook their request

    # -- serving -----------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer INIT, then serve until the file system is unmounted."""
        self._init()
        self._spawn()
        while not self._done.wait(1.0):  # (a timed wait: signal handlers run meanwhile)
            pass

    def _init(self) -> None:
        buf = bytearray(BUFFER)
        n = os.readv(self.fd, [buf])
        view = memoryview(buf)[:n]
        hdr = k.header(view)
        if hdr.opcode != k.INIT:
            raise ClusterrepError(f"FUSE: first request is opcode {hdr.opcode}, not INIT")
        major, minor, max_readahead, flags = k.INIT_IN.unpack_from(view, k.IN_HEADER.size)
        if major != k.MAJOR or minor < 23:
            self._reply(hdr.unique, -errno.EPROTO, b"")
            raise ClusterrepError(f"FUSE kernel protocol {major}.{minor} is not supported (7.23+)")
        self.minor = min(minor, k.MINOR)
        granted = flags & self.want
        out = k.INIT_OUT.pack(k.MAJOR, self.minor, max_readahead, granted, 64, 48, MAX_WRITE, 1,
                              MAX_WRITE // 4096, 0, 0, *([0] * 7))
        self._reply(hdr.unique, 0, out)
        log.debug("FUSE protocol 7.%d, flags %#x", self.minor, granted)

    def _spawn(self) -> None:
        with self._lock:
            if self._workers >= MAX_WORKERS:
                return
            self._workers += 1
            self._idle += 1
        threading.Thread(target=self._work, name="fuse", daemon=True).start()

    def _work(self) -> None:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        try:
            while not self._done.is_set():
                try:
                    n = os.readv(self.fd, [buf])
                except OSError as exc:
                    if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue  # ENOENT: the request was interrupted before we read it
                    if exc.errno == errno.ENODEV:
                        self._done.set()  # unmounted
                        return
                    raise
                with self._lock:
                    self._idle -= 1
                    spawn = self._idle == 0
                if spawn:
                    self._spawn()
                try:
                    self._handle(view[:n])
                finally:
                    with self._lock:
                        self._idle += 1
        except Exception:
            log.exception("FUSE worker failed")
            self._done.set()
        finally:
            with self._lock:
                self._workers -= 1
                self._idle -= 1

    def _handle(self, req: memoryview) -> None:
        hdr = k.header(req)
        if hdr.opcode == k.INTERRUPT:
            self._interrupt(k.INTERRUPT_IN.unpack_from(req, k.IN_HEADER.size)[0])
            return
        if hdr.opcode == k.DESTROY:
            self._reply(hdr.unique, 0, b"")
            return
        handler = self.handlers.get(hdr.opcode)
        if handler is None:
            self._reply(hdr.unique, -errno.ENOSYS, b"")
            return
        with self._lock:
            self._inflight.add(hdr.unique)
            if hdr.unique in self._early:
                self._early.discard(hdr.unique)
                self._interrupted.add(hdr.unique)
        try:
            result = handler(hdr, req[k.IN_HEADER.size:hdr.length])
        except BaseException as exc:
            self.finish(hdr, exc)
        else:
            if result is not DEFERRED:
                self.finish(hdr, result)

    def finish(self, hdr: k.Header, result: Any) -> None:
        """Answer request ``hdr`` with ``result``: the reply's payload (bytes or None), or the
        OSError to answer with its errno (anything else is a bug: logged, answered EIO). A
        handler that returned `DEFERRED` calls this itself once it is done (from any thread)."""
        try:
            if isinstance(result, OSError):
                # an I/O error is never a program's own mistake: say why it was given
                level = logging.WARNING if result.errno in (errno.EIO, None, 0) else logging.DEBUG
                log.log(level, "request %d (opcode %d): %s", hdr.unique, hdr.opcode, result)
                self._reply(hdr.unique, -(result.errno or errno.EIO), b"")
            elif isinstance(result, BaseException):
                log.error("capture: request %d (opcode %d) failed", hdr.unique, hdr.opcode,
                          exc_info=result)
                self._reply(hdr.unique, -errno.EIO, b"")
            elif result is not NO_REPLY:
                self._reply(hdr.unique, 0, result or b"")
        finally:
            with self._lock:
                self._inflight.discard(hdr.unique)
                self._interrupted.discard(hdr.unique)

    def _reply(self, unique: int, error: int, payload: bytes | memoryview) -> None:
        head = k.OUT_HEADER.pack(k.OUT_HEADER.size + (len(payload) if not error else 0), error,
                                 unique)
        try:
            if error or not payload:
                os.write(self.fd, head)
            else:
                os.writev(self.fd, [head, payload])
        except OSError as exc:
            # ENOENT: the request was interrupted and the kernel forgot it; ENODEV: unmounted
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("FUSE reply to request %d failed: %s", unique, exc)

    # -- interrupts --------------------------------------------------------

    def _interrupt(self, unique: int) -> None:
        with self._lock:
            if unique in self._inflight:
                self._interrupted.add(unique)
            elif len(self._early) < 4096:
                self._early.add(unique)

    def interrupted(self, unique: int) -> bool:
        """Has the kernel interrupted request ``unique`` (its program got a signal)?"""
        return unique in self._interrupted

    def stop(self) -> None:
        self._done.set()
