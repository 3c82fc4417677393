#!/usr/bin/env python3
"""Benchmark: 1 MiB frames through one `wire.Connection` on loopback, against a raw socket.

Wire run: a sender thread calls ``conn.send(payload)`` N times (client to server); the server's
handler calls ``conn.recv()`` N times and counts the bytes it got back as ``bytes`` objects. So
the figure includes msgpack encoding and decoding and an HMAC-SHA256 on each end.

TLS run: the same over TLS 1.3 with client certificates (``--tls``; certificates made by
`clusterrep.pki` in a temporary directory), so the cost of encryption is measured too.

Baseline, measured in the same run: a raw TCP connection on loopback, one thread ``sendall``-ing
the same bytes in the same 1 MiB pieces, the other ``recv_into`` a preallocated buffer.

Each is run ``--repeat`` times, interleaved; the best run of each counts. The last line is machine-readable:
``wire_mbps=<int> wire_ratio=<float>`` and, with ``--tls``, ``tls_mbps=<int> tls_ratio=<float>``
(MB = 10**6 bytes; ratio = against the raw socket).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

from clusterrep import pki, serve, wire
from clusterrep.tls import TlsConfig

TOKEN = b"benchmark-token-0123456789-abcdefghijkl"


def raw_run(frames: int, payload: bytes) -> float:
    """Seconds to move ``frames`` copies of ``payload`` through a plain loopback socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(listener.getsockname()[:2])
    receiver, _ = listener.accept()
    listener.close()
    total = frames * len(payload)

    def send() -> None:
        for _ in range(frames):
            sender.sendall(payload)

    buf = memoryview(bytearray(len(payload)))
    thread = threading.Thread(target=send)
    start = time.perf_counter()
    thread.start()
    got = 0
    while got < total:
        n = receiver.recv_into(buf, min(len(buf), total - got))
        if not n:
            raise RuntimeError("raw sender closed early")
        got += n
    elapsed = time.perf_counter() - start
    thread.join()
    sender.close()
    receiver.close()
    return elapsed


def wire_run(frames: int, payload: bytes, server_auth: wire.Auth | bytes = TOKEN,
             client_auth: wire.Auth | bytes = TOKEN) -> float:
    """Seconds to move ``frames`` frames of ``payload`` through one wire connection."""
    done = threading.Event()
    got = [0]

    def handler(conn: wire.Connection) -> None:
        for _ in range(frames):
            got[0] += len(conn.recv(timeout=30))
        done.set()
        with contextlib.suppress(wire.PeerClosed):
            conn.recv(timeout=30)

    with serve.Server(("127.0.0.1", 0), server_auth, name="bench", role="replica",
                     handler=handler) as server:
        conn = wire.connect(server.address, client_auth, name="sender", role="node")

        def send() -> None:
            for _ in range(frames):
                conn.send(payload)

        thread = threading.Thread(target=send)
        start = time.perf_counter()
        thread.start()
        if not done.wait(120):
            raise RuntimeError("the receiver did not get every frame")
        elapsed = time.perf_counter() - start
        thread.join()
        conn.close()
    if got[0] != frames * len(payload):
        raise RuntimeError(f"received {got[0]} bytes, expected {frames * len(payload)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="frames per run (default 1000)")
    parser.add_argument("--size", type=int, default=1 << 20, help="payload bytes per frame (1 MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument("--tls", action="store_true", help="also measure the wire over TLS")
    args = parser.parse_args()
    payload = os.urandom(args.size)
    volume = args.frames * args.size
    raw = wired = secured = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tls:
            pki.issue(tmp, [pki.Member("bench"), pki.Member("sender")], loopback=True)
            ca = Path(tmp) / "ca.pem"
            server_auth = wire.Auth(TOKEN, TlsConfig(Path(tmp) / "bench.pem", Path(tmp) / "bench.key", ca))
            client_auth = wire.Auth(TOKEN, TlsConfig(Path(tmp) / "sender.pem", Path(tmp) / "sender.key", ca))
        for _ in range(args.repeat):  # interleaved, so all see the same load on the machine
            raw = min(raw, raw_run(args.frames, payload))
            wired = min(wired, wire_run(args.frames, payload))
            if args.tls:
                secured = min(secured, wire_run(args.frames, payload, server_auth, client_auth))
    raw_mbps = volume / raw / 1e6
    wire_mbps = volume / wired / 1e6
    print(f"payload {args.size} bytes x {args.frames} frames = {volume / 1e6:.0f} MB, "
          f"best of {args.repeat}")
    print(f"raw socket sendall/recv_into : {raw_mbps:9.0f} MB/s")
    print(f"wire send/recv (auth+msgpack): {wire_mbps:9.0f} MB/s")
    tail = f"wire_mbps={wire_mbps:.0f} wire_ratio={wire_mbps / raw_mbps:.2f}"
    if args.tls:
        tls_mbps = volume / secured / 1e6
        print(f"wire over TLS 1.3 (client certs): {tls_mbps:6.0f} MB/s")
        tail += f" tls_mbps={tls_mbps:.0f} tls_ratio={tls_mbps / raw_mbps:.2f}"
    print(tail)


if __name__ == "__main__":
    main()
