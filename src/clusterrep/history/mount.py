"""The volume as it was at a restore point, mounted read-only (`clusterrep mount-mark`).

What it does: `MarkFS` is a FUSE file system over the entries of one mark (what
`HistoryClient.entries` answers: every path of the volume at the mark, walk order, root first)
and a read function that fetches a file's bytes at that mark from the replica
(`ClientPool.read`, through `HistoryClient.read`). Nothing is copied: the tree's metadata is held
in memory, file data is read on demand, 1 MiB at a time, with a small cache of recent chunks
(and the kernel's page cache, kept across opens). It speaks the project's own FUSE kernel
protocol (`clusterrep.capture.session`, `clusterrep.capture.kernel`); `serve` mounts it and
serves until SIGINT/SIGTERM or an unmount (``fusermount3 -u``), then unmounts.

Rules:

* Inodes: a file's identity at the mark is its ``fid`` (``entry.inode == (0, fid)``); the root
  is FUSE node 1, every other fid is node ``fid + 2``, which is also ``st_ino``: hard links
  share a node, a number and their attributes, as they did on the volume.
* Attributes are the entry's: type bits and permission bits, numeric uid and gid, size (a
  symlink's is its target's length, a directory's 4096), modification time (also shown as the
  access and change times), the link count (a directory's: 2 + its subdirectories), the device
  number, and ``st_blocks``: for a file of 1 MiB or more, its data ranges at the mark (asked of
  the replica once, `HistoryClient.extents`), which also answer SEEK_DATA and SEEK_HOLE, so
  ``cp`` and other tools that look for holes keep a sparse file sparse; else the size.
* Every file is as it was at the same mark: a crash-consistent view of the whole volume, also
  of files deleted, renamed or rewritten since. Names, attributes and data never change while
  mounted, so the kernel may cache all of them (a day; negative lookups too).
* Read-only: the mount is made ``ro,nosuid,nodev``, and every request that would change
  something (setattr, create, mknod, mkdir, symlink, link, unlink, rmdir, rename, write,
  fallocate, setxattr, removexattr, copy_file_range, tmpfile, and an open for writing or with
  O_TRUNC) is answered EROFS. Permissions are not checked (no ``default_permissions``): only
  the user who mounted can use the mount (no ``allow_other``), and that user holds the
  cluster's token, with which every file can be restored anyway.
* Extended attributes (POSIX ACLs included) are the entry's, read with getxattr/listxattr.

Errors: a read the replica cannot answer (unreachable after one reconnection, or the mark has
left its retention window since it was mounted: pin it with ``clusterrep marks --pin`` to keep
it) is answered EIO and logged; `MountRefused` when the mount point is not an empty directory;
`clusterrep.errors.ClusterrepError` from `mount_fuse` when fusermount3 cannot mount.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..capture import kernel as k
from ..capture.check import mounted_here
from ..capture.session import NO_REPLY, Session, mount_fuse
from ..errors import ClusterrepError, WireError
from ..snapshot import FORMAT, Entry, Kind
from .client import HistoryClient, ReplicaRefused

log = logging.getLogger("clusterrep.mount")

CHUNK = 1 << 20  # bytes fetched from the replica at a time (it answers at most 4 MiB)
CACHE_CHUNKS = 32  # recent chunks kept (32 MiB at most)
VALID = 86400  # seconds the kernel may cache names and attributes: they never change
DIR_SIZE = 4096
BLOCK = 4096  # st_blksize and statfs's block size
CACHE_SYMLINKS = 1 << 23  # FUSE_CACHE_SYMLINKS: the kernel keeps readlink answers
INIT_FLAGS = k.ASYNC_READ | k.PARALLEL_DIROPS | k.MAX_PAGES | CACHE_SYMLINKS
MOUNT_OPTIONS = "ro,nosuid,nodev,auto_unmount,subtype=clusterrep-mark"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC

ReadFn = Callable[[int, int, int], bytes]
SPARSE_FROM = 1 << 20  # files at least this big show their holes in st_blocks and lseek
T = TypeVar("T")  # (fid, offset, length) -> at most length bytes
Handler = Callable[[k.Header, memoryview], Any]


class MountRefused(ClusterrepError):
    """The mark cannot be mounted there (the mount point is missing, not empty, a mount)."""

    exit_code = 2


@dataclass(slots=True)
class Node:
    """One inode of the tree at the mark; ``children`` (name -> node id) for directories."""

    nodeid: int
    entry: Entry
    parent: int
    children: dict[bytes, int] | None = None
    subdirs: int = 0
    dirents: list[bytes] | None = field(default=None, repr=False)  # readdir records, built once

    @property
    def fid(self) -> int:
        return self.entry.inode[1]


def build_tree(entries: Iterable[Entry]) -> dict[int, Node]:
    """The nodes of the tree at the mark, by node id, from the entries in walk order."""
    nodes: dict[int, Node] = {}
    by_path: dict[str, int] = {}
    root_fid: int | None = None
    for e in entries:
        if root_fid is None:
            if e.path != "" or e.kind is not Kind.DIR:
                raise ClusterrepError("the replica's entries do not start with the root directory")
            root_fid = e.inode[1]
        nodeid = node_id(e.inode[1], root_fid)
        parent_path, _, name = e.path.rpartition("/")
        parent = nodes.get(by_path.get(parent_path, -1)) if e.path else None
        if e.path and (parent is None or parent.children is None):
            raise ClusterrepError(f"the replica listed {e.path!r} before its directory")
        by_path[e.path] = nodeid
        if nodeid not in nodes:  # (a further hard link: the same node)
            nodes[nodeid] = Node(nodeid, e, parent.nodeid if parent else k.ROOT_ID,
                                 {} if e.kind is Kind.DIR else None)
        if parent is not None and parent.children is not None:
            parent.children[os.fsencode(name)] = nodeid
            parent.subdirs += int(e.kind is Kind.DIR)
    if root_fid is None:
        raise ClusterrepError("the replica listed no entries at this mark")
    return nodes


def node_id(fid: int, root_fid: int) -> int:
    """The FUSE node id (and ``st_ino``) of ``fid``: 1 for the root, ``fid + 2`` otherwise."""
    return k.ROOT_ID if fid == root_fid else fid + 2


def _encode_dev(rdev: int) -> int:
    """A device number as ``fuse_attr.rdev`` carries it (the kernel's 32-bit encoding)."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def _size(node: Node) -> int:
    e = node.entry
    if e.kind is Kind.FILE:
        return e.size
    if e.kind is Kind.SYMLINK:
        return len(os.fsencode(e.target or ""))
    return DIR_SIZE if e.kind is Kind.DIR else 0


def pack_attr(node: Node, data: int | None = None) -> bytes:
    """The ``fuse_attr`` of ``node`` (see the module docstring for each field); ``data``: the
    bytes its data ranges hold, if known (else its size)."""
    e = node.entry
    size = _size(node)
    secs, nsecs = divmod(e.mtime_ns, 10**9)
    nlink = 2 + node.subdirs if e.kind is Kind.DIR else max(e.nlink, 1)
    rdev = _encode_dev(e.rdev) if e.kind in (Kind.CHAR, Kind.BLOCK) else 0
    used = size if data is None else data
    return k.ATTR.pack(node.nodeid, size, (used + 511) // 512, secs, secs, secs, nsecs, nsecs,
                       nsecs, FORMAT[e.kind] | stat.S_IMODE(e.mode), min(nlink, 0xFFFFFFFF),
                       e.uid, e.gid, rdev, BLOCK, 0)


def _read_only(hdr: k.Header, body: memoryview) -> None:
    raise OSError(errno.EROFS, "a restore point is read-only")


def _ok(hdr: k.Header, body: memoryview) -> None:
    return None


def _forget(hdr: k.Header, body: memoryview) -> object:
    return NO_REPLY  # every node stays known for the mount's life: nothing to drop


class ChunkCache:
    """The last `CACHE_CHUNKS` chunks read, least recently used dropped first."""

    def __init__(self, fetch: ReadFn, capacity: int = CACHE_CHUNKS) -> None:
        self.fetch = fetch
        self.capacity = capacity
        self._chunks: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fid: int, index: int, file_size: int) -> bytes:
        """Chunk ``index`` of file ``fid`` (shorter at the file's end)."""
        key = (fid, index)
        with self._lock:
            data = self._chunks.get(key)
            if data is not None:
                self._chunks.move_to_end(key)
                return data
        base = index * CHUNK
        data = self.fetch(fid, base, min(CHUNK, file_size - base))
        with self._lock:
            self._chunks[key] = data
            while len(self._chunks) > self.capacity:
                self._chunks.popitem(last=False)
        return data


class MarkFS:
    """The FUSE operations over the tree at one mark, by opcode (`handlers`)."""

    def __init__(self, entries: Iterable[Entry], read: ReadFn,
                 extents: Callable[[int], list[tuple[int, int]]] | None = None) -> None:
        self.nodes = build_tree(entries)
        self.cache = ChunkCache(read)
        self._lock = threading.Lock()
        self._fetch_extents = extents
        self._extents: dict[int, list[tuple[int, int]]] = {}  # fid -> data ranges at the mark

    def handlers(self) -> dict[int, Handler]:
        refused = (k.SETATTR, k.SYMLINK, k.MKNOD, k.MKDIR, k.UNLINK, k.RMDIR, k.RENAME, k.RENAME2,
                   k.LINK, k.CREATE, k.WRITE, k.SETXATTR, k.REMOVEXATTR, k.FALLOCATE,
                   k.COPY_FILE_RANGE, k.TMPFILE)
        return {
            **dict.fromkeys(refused, _read_only),
            **dict.fromkeys((k.RELEASE, k.RELEASEDIR, k.FLUSH, k.FSYNC, k.FSYNCDIR), _ok),
            k.FORGET: _forget, k.BATCH_FORGET: _forget,
            k.LOOKUP: self.lookup, k.GETATTR: self.getattr, k.READLINK: self.readlink,
            k.OPEN: self.open, k.READ: self.read, k.OPENDIR: self.opendir, k.READDIR: self.readdir,
            k.GETXATTR: self.getxattr, k.LISTXATTR: self.listxattr, k.STATFS: self.statfs,
            k.ACCESS: self.access, k.LSEEK: self.lseek,
        }

    def node(self, nodeid: int) -> Node:
        found = self.nodes.get(nodeid)
        if found is None:
            raise OSError(errno.ESTALE, f"no node {nodeid} at this mark")
        return found

    # -- names and attributes ----------------------------------------------------------------

    def lookup(self, hdr: k.Header, body: memoryview) -> bytes:
        name = k.names(body, 1)[0]
        parent = self.node(hdr.nodeid)
        if parent.children is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        child = parent.children.get(name)
        if child is None:  # a negative entry: the kernel remembers that the name is missing
            return k.ENTRY_OUT.pack(0, 0, VALID, 0, 0, 0) + bytes(k.ATTR.size)
        node = self.nodes[child]
        return k.ENTRY_OUT.pack(child, 0, VALID, VALID, 0, 0) + pack_attr(node, self._data(node))

    def getattr(self, hdr: k.Header, body: memoryview) -> bytes:
        node = self.node(hdr.nodeid)
        return k.ATTR_OUT.pack(VALID, 0, 0) + pack_attr(node, self._data(node))

    def _data(self, node: Node) -> int | None:
        """The bytes of a big regular file's data ranges (so ``st_blocks`` shows its holes and
        copying tools look for them); None for others (their size stands for it)."""
        if self._fetch_extents is None or node.entry.kind is not Kind.FILE or node.entry.size < SPARSE_FROM:
            return None
        return sum(end - start for start, end in self._spans(node))

    def _spans(self, node: Node) -> list[tuple[int, int]]:
        spans = self._extents.get(node.fid)
        if spans is None:
            assert self._fetch_extents is not None
            spans = self._extents[node.fid] = self._fetch_extents(node.fid)
        return spans

    def readlink(self, hdr: k.Header, body: memoryview) -> bytes:
        e = self.node(hdr.nodeid).entry
        if e.kind is not Kind.SYMLINK or e.target is None:
            raise OSError(errno.EINVAL, "not a symlink")
        return os.fsencode(e.target)

    def access(self, hdr: k.Header, body: memoryview) -> None:
        mask, _ = k.ACCESS_IN.unpack_from(body)
        self.node(hdr.nodeid)
        if mask & os.W_OK:
            raise OSError(errno.EROFS, "a restore point is read-only")

    def statfs(self, hdr: k.Header, body: memoryview) -> bytes:
        data = sum(n.entry.size for n in self.nodes.values() if n.entry.kind is Kind.FILE)
        blocks = (data + BLOCK - 1) // BLOCK
        return k.STATFS_OUT.pack(blocks, 0, 0, len(self.nodes), 0, BLOCK, 255, BLOCK, 0, *([0] * 6))

    # -- extended attributes -----------------------------------------------------------------

    def getxattr(self, hdr: k.Header, body: memoryview) -> bytes:
        size, _ = k.GETXATTR_IN.unpack_from(body)
        name = os.fsdecode(k.names(body[k.GETXATTR_IN.size:], 1)[0])
        for key, value in self.node(hdr.nodeid).entry.xattrs:
            if key == name:
                return k.xattr_reply(value, size)
        raise OSError(errno.ENODATA, "no such attribute")

    def listxattr(self, hdr: k.Header, body: memoryview) -> bytes:
        size, _ = k.GETXATTR_IN.unpack_from(body)
        names = b"".join(os.fsencode(key) + b"\0" for key, _ in self.node(hdr.nodeid).entry.xattrs)
        return k.xattr_reply(names, size)

    # -- files -------------------------------------------------------------------------------

    def open(self, hdr: k.Header, body: memoryview) -> bytes:
        flags, _ = k.OPEN_IN.unpack_from(body)
        node = self.node(hdr.nodeid)
        if flags & _WRITE_FLAGS:
            raise OSError(errno.EROFS, "a restore point is read-only")
        if node.entry.kind is not Kind.FILE:
            raise OSError(errno.EISDIR if node.children is not None else errno.EINVAL, "not a file")
        return k.OPEN_OUT.pack(0, k.FOPEN_KEEP_CACHE, 0)  # (the data never changes)

    def read(self, hdr: k.Header, body: memoryview) -> bytes:
        _fh, offset, size, *_ = k.READ_IN.unpack_from(body)
        node = self.node(hdr.nodeid)
        if node.entry.kind is not Kind.FILE:
            raise OSError(errno.EISDIR, "not a file")
        file_size = node.entry.size
        end = min(offset + size, file_size)
        parts: list[bytes] = []
        for index in range(offset // CHUNK, (end - 1) // CHUNK + 1) if offset < end else ():
            base = index * CHUNK
            chunk = self.cache.get(node.fid, index, file_size)
            parts.append(chunk[max(offset, base) - base:end - base])
            if len(chunk) < min(CHUNK, file_size - base):
                break  # the replica had less than the size at the mark said: a short read
        return b"".join(parts)

    def lseek(self, hdr: k.Header, body: memoryview) -> bytes:
        """SEEK_DATA and SEEK_HOLE (the kernel does the other kinds itself): from the file's data
        ranges at the mark, so `cp --sparse=auto` and others skip its holes."""
        _fh, offset, whence, _ = k.LSEEK_IN.unpack_from(body)
        node = self.node(hdr.nodeid)
        size = node.entry.size
        if node.entry.kind is not Kind.FILE or whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE of a file")
        if offset >= size:
            raise OSError(errno.ENXIO, "past the end of the file")
        if self._fetch_extents is None:  # (everything is data)
            return k.LSEEK_OUT.pack(offset if whence == os.SEEK_DATA else size)
        for start, end in self._spans(node):
            if end > offset:
                if whence == os.SEEK_DATA:
                    return k.LSEEK_OUT.pack(max(start, offset))
                return k.LSEEK_OUT.pack(offset if start > offset else min(end, size))
        if whence == os.SEEK_DATA:
            raise OSError(errno.ENXIO, "no data after this offset")
        return k.LSEEK_OUT.pack(offset)

    # -- directories -------------------------------------------------------------------------

    def opendir(self, hdr: k.Header, body: memoryview) -> bytes:
        if self.node(hdr.nodeid).children is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        return k.OPEN_OUT.pack(0, k.FOPEN_KEEP_CACHE, 0)

    def readdir(self, hdr: k.Header, body: memoryview) -> bytes:
        _fh, offset, size, *_ = k.READ_IN.unpack_from(body)
        records = self._dirents(self.node(hdr.nodeid))
        out = bytearray()
        for rec in records[offset:]:
            if len(out) + len(rec) > size:
                break
            out += rec
        return bytes(out)

    def _dirents(self, node: Node) -> list[bytes]:
        """``.``, ``..`` and the directory's names, as readdir records (``off``: the next)."""
        if node.dirents is None:
            dtype = stat.S_IFDIR >> 12
            recs = [k.pack_dirent(node.nodeid, 1, b".", dtype),
                    k.pack_dirent(node.parent, 2, b"..", dtype)]
            for name, child in (node.children or {}).items():
                kind = self.nodes[child].entry.kind
                recs.append(k.pack_dirent(child, len(recs) + 1, name, FORMAT[kind] >> 12))
            with self._lock:
                node.dirents = recs
        return node.dirents


class ClientPool:
    """Up to ``size`` connections to the replica, for reads of mark ``gseq`` from several FUSE
    workers at once (one connection serves one request at a time)."""

    def __init__(self, connect: Callable[[], HistoryClient], gseq: int, *, size: int = 4,
                 first: HistoryClient | None = None) -> None:
        self.connect = connect
        self.gseq = gseq
        self.size = size
        self._idle: list[HistoryClient] = [first] if first is not None else []
        self._open = len(self._idle)
        self._cond = threading.Condition()

    def read(self, fid: int, offset: int, length: int) -> bytes:
        """At most ``length`` bytes of file ``fid`` at the mark; OSError(EIO) if the replica
        cannot answer (a broken connection is replaced and the read tried once more)."""
        return self._call(lambda client: client.read(self.gseq, fid, offset, length))

    def extents(self, fid: int) -> list[tuple[int, int]]:
        """The ranges of file ``fid`` that may hold data at the mark (as `read`, EIO)."""
        return self._call(lambda client: client.extents(self.gseq, fid))

    def _call(self, ask: Callable[[HistoryClient], T]) -> T:
        for attempt in (1, 2):
            client = self._take()
            try:
                data = ask(client)
            except ReplicaRefused as exc:  # (an answer: the connection is still in step)
                self._give(client)
                raise OSError(errno.EIO, str(exc)) from None
            except WireError as exc:
                self._drop(client)
                if attempt == 2:
                    raise OSError(errno.EIO, f"the replica cannot be read: {exc}") from None
                log.warning("connection to the replica lost (%s): reconnecting", exc)
                continue
            except BaseException:
                self._drop(client)
                raise
            self._give(client)
            return data
        raise AssertionError("unreachable")

    def _take(self) -> HistoryClient:
        with self._cond:
            while not self._idle and self._open >= self.size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self.connect()
        except ClusterrepError as exc:
            self._drop(None)
            raise OSError(errno.EIO, f"cannot connect to the replica: {exc}") from None
        except BaseException:
            self._drop(None)
            raise

    def _give(self, client: HistoryClient) -> None:
        with self._cond:
            self._idle.append(client)
            self._cond.notify()

    def _drop(self, client: HistoryClient | None) -> None:
        if client is not None:
            client.close()
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for client in idle:
            client.close()


def check_mountpoint(path: str) -> None:
    """`MountRefused` unless ``path`` is an existing, empty directory that is not a mount."""
    if not os.path.lexists(path):
        raise MountRefused(f"mount point {path} does not exist", hint=f"create it: mkdir {path}")
    if not os.path.isdir(path):
        raise MountRefused(f"mount point {path} is not a directory",
                           hint="give an empty directory")
    if os.path.ismount(path) or mounted_here(path) is not None:
        raise MountRefused(f"{path} is already a mount point",
                           hint=f"unmount it first (fusermount3 -u {path}), or pick another")
    try:
        busy = bool(os.listdir(path))
    except OSError as exc:
        raise MountRefused(f"cannot list mount point {path}: {exc.strerror}") from None
    if busy:
        raise MountRefused(f"mount point {path} is not empty: its files would be hidden",
                           hint="give an empty directory")


def _unmount(mountpoint: str) -> None:
    """Detach the mount now (lazily: programs still inside it get errors once we exit)."""
    subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], check=False, capture_output=True)


def serve(fs: MarkFS, mountpoint: str, *, fsname: str = "clusterrep-mark",
          announce: Callable[[], None] | None = None) -> None:
    """Mount ``fs`` read-only at ``mountpoint`` and serve it until it is unmounted or this
    process gets SIGINT or SIGTERM (then unmount). ``announce`` is called once mounted."""
    fd, keeper = mount_fuse(mountpoint, f"{MOUNT_OPTIONS},fsname={fsname}")
    session = Session(fd, fs.handlers(), init_flags=INIT_FLAGS)

    def stop(signum: int, frame: Any) -> None:
        log.info("signal %d: unmounting %s", signum, mountpoint)
        _unmount(mountpoint)
        session.stop()

    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if announce is not None:
            announce()
        session.serve()
    except OSError as exc:
        if exc.errno != errno.ENODEV:  # (unmounted before the kernel's first request)
            raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(fd)
        keeper.close()
        if mounted_here(mountpoint) is not None:
            _unmount(mountpoint)
