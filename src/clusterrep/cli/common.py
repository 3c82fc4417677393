"""Helpers shared by the subcommands: logging, tokens, running a service until signalled."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from .. import wire
from ..endpoint import parse_addr
from ..errors import ClusterrepError
from ..tls import TlsConfig


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def add_auth(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The shared token (always, unless ``required`` is False: a command that connects only
    in some of its forms) and TLS with certificates (optional, all three or none)."""
    p.add_argument("--token-file", required=required, metavar="FILE",
                   help="file holding the cluster's shared secret: one line, at least 32 "
                        "characters (create one with: head -c 32 /dev/urandom | xxd -p -c 64)")
    g = p.add_argument_group("TLS (optional; all three, on every member, or none)",
                             "Encrypt every connection and authenticate both ends with "
                             "certificates from the cluster's own CA; create them with "
                             "'clusterrep certs'. The token is still required.")
    g.add_argument("--tls-cert", metavar="FILE", help="this process's certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM, unencrypted)")
    g.add_argument("--tls-ca", metavar="FILE",
                   help="the cluster CA's certificate; peers must present one it issued")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def auth(args: argparse.Namespace) -> wire.Auth:
    """The token and TLS settings given on the command line, loaded and checked."""
    return wire.Auth(wire.load_token(args.token_file),
                     TlsConfig.from_options(args.tls_cert, args.tls_key, args.tls_ca))


def serve_until_signalled(start: Callable[[], Any], stop: Callable[[], Any], what: str) -> int:
    """Start a service, block until SIGTERM or SIGINT, stop it cleanly."""
    done = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        done.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        start()
        logging.getLogger("clusterrep").info("%s running; stop with Ctrl-C or SIGTERM", what)
        while not done.wait(1.0):
            pass
        logging.getLogger("clusterrep").info("%s stopping", what)
    finally:
        try:
            stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return 0


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.01 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: 0.01 to 86400")
    return value


def peer_address(text: str) -> str:
    """An argparse type for HOST:PORT of a peer: refused at once if malformed, not retried."""
    try:
        parse_addr(text)
    except ClusterrepError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def state_dir(text: str) -> str:
    """An argparse type for a state directory: it may be missing (it is created), not a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return text


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _amount(text: str, what: str) -> float:
    """A number with an optional K, M, G or T (powers of 1024) and an optional "B"/"iB"."""
    t = text.strip().upper().removesuffix("/S").removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not 0 < value < 1 << 62:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 and a real amount")
    return value


def parse_size(text: str) -> int:
    """A size of at least 1 MiB: "512M", "8G"."""
    value = int(_amount(text, "a size like 512M or 8G"))
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is too small: at least 1M")
    return value


def byte_rate(text: str) -> float:
    """A rate in bytes per second: "200M", "1.5G/s", "50MB/s"."""
    return _amount(text, "a rate (say e.g. 200M for 200 MiB/s)")


_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``30d``, ``2w`` as seconds (argparse type)."""
    t = text.strip().lower()
    unit = _TIME_UNITS.get(t[-1:]) if t else None
    number = t[:-1] if unit else t
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (say 90s, 15m, 24h or 30d)") from None
    if not 0 < value < 100 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and less than 100 years")
    return value


def gseq(text: str) -> int:
    """A mark's gseq: a whole number from 1 to 2**63-1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mark (a gseq: a whole number)") from None
    if not 1 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mark: a gseq is 1 or more, below 2**63")
    return value


def nonempty(text: str) -> str:
    """A value that must not be empty (argparse type)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_mark_choice(p: argparse.ArgumentParser) -> None:
    """--mark | --time | --latest | --name: which restore point (one is required)."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--mark", type=gseq, metavar="GSEQ", help="the restore point with this gseq")
    which.add_argument("--time", type=nonempty, metavar="ISO8601",
                       help="the newest restore point the replica received at or before this "
                            "time (its clock; e.g. 2026-11-30T14:05:00Z)")
    which.add_argument("--latest", action="store_true", help="the newest restore point")
    which.add_argument("--name", type=nonempty, metavar="NAME", help="the restore point pinned as NAME")


def mark_choice(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen restore point as the replica's ``resolve`` request takes it."""
    if args.mark is not None:
        return {"mark": args.mark}
    if args.time is not None:
        return {"time": args.time}
    if args.name is not None:
        return {"name": args.name}
    return {"latest": True}
