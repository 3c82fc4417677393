"""Helpers shared by the subcommands: logging, tokens, running a service until signalled."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from .. import wire


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def add_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", required=True, metavar="FILE",
                   help="file holding the cluster's shared secret: one line, at least 32 "
                        "characters (create one with: head -c 32 /dev/urandom | xxd -p -c 64)")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def token(args: argparse.Namespace) -> bytes:
    return wire.load_token(args.token_file)


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
