"""A small fault-injecting TCP proxy for tests (tc netem and iptables do not work here).

Every connection to the proxy is forwarded to ``target``. Faults apply to the client -> server
direction: ``down`` (drop every connection, refuse new ones), ``flip`` (flip one byte of the next
chunk), ``reset`` (cut the connection in the middle of the next chunk), ``duplicate`` (send the
next chunk twice), ``delay`` (hold each chunk ``delay`` seconds). ``pass`` forwards faithfully.
With ``record`` set, the client -> server bytes are kept in ``recorded``.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from typing import Any


class FaultProxy:
    def __init__(self, target: str, seed: int = 0) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.mode = "pass"
        self.delay = 0.0
        self.rng = random.Random(seed)
        self.faults = 0
        self.record = False            # keep what clients send (to check what crosses the wire)
        self.recorded = bytearray()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.address = f"127.0.0.1:{self._srv.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode: str, delay: float = 0.0) -> None:
        with self._lock:
            self.mode, self.delay = mode, delay
            if mode == "down":
                for s in self._conns:
                    _close(s)
                self._conns.clear()

    def close(self) -> None:
        self._stop.set()
        _close(self._srv)
        self.set("down")

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self.mode == "down":
                _close(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    if self.record and len(self.recorded) < 256 << 20:
                        self.recorded += data
                    data = self._fault(data, src, dst)
                    if data is None:
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _fault(self, data: bytes, src: socket.socket, dst: socket.socket) -> bytes | None:
        with self._lock:
            mode, delay = self.mode, self.delay
            if mode in ("flip", "reset", "duplicate"):
                self.mode = "pass"  # one fault, then faithful again
                self.faults += 1
        if delay:
            time.sleep(delay)
        if mode == "flip":
            i = self.rng.randrange(len(data))
            return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        if mode == "reset":
            dst.sendall(data[: len(data) // 2])
            _close(src)
            _close(dst)
            return None
        if mode == "duplicate":
            return data + data
        if mode == "down":
            return None
        return data


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


def start_behind_proxy(cluster: Any, seed: int) -> FaultProxy:
    """Start ``cluster`` (a `LocalCluster`) with its nodes reaching the replica through a new
    proxy (the coordinator goes direct); return the proxy."""
    cluster.start_replica()
    proxy = FaultProxy(cluster.replica_addr, seed)
    cluster.replica_for_nodes = proxy.address
    cluster.start_coordinator()
    for node in cluster.nodes:
        cluster.start_node(node)
    return proxy
