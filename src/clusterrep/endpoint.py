"""Where a peer is and how to prove who we are: ``HOST:PORT`` addresses, the token file, and
`Auth` (the token plus, optionally, TLS). Used by `wire` and by the command line; knows nothing
of connections."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AddressError, ConfigError
from .tls import TlsConfig

__all__ = ["MIN_TOKEN_CHARS", "Auth", "format_addr", "load_token", "normalise_addr", "parse_addr"]

log = logging.getLogger("clusterrep.wire")

MIN_TOKEN_CHARS = 32
_TOKEN_FILE_LIMIT = 4096
_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")


def parse_addr(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all interfaces) into ``(host, port)``.

    Port 0 ("any free port") is refused unless ``allow_port_zero``: it only makes sense for a
    server that reports the port it got. Raises `AddressError` saying what is wrong.
    """
    if not isinstance(text, str):
        raise AddressError(f"an address must be a string like HOST:PORT, got {type(text).__name__}")
    shown = text
    text = text.strip()
    if not text:
        raise AddressError("the address is empty; expected HOST:PORT")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError(f"address {shown!r} opens '[' but never closes it")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise AddressError(f"address {shown!r} has no port after ']'; expected [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"address {shown!r}: {host!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise AddressError(f"address {shown!r} has no port; expected HOST:PORT")
        if ":" in host:
            raise AddressError(f"address {shown!r}: an IPv6 address must be in brackets, "
                               f"e.g. [{host}]:{port_text}")
        host = host or "0.0.0.0"
        if not _valid_host(host):
            raise AddressError(f"address {shown!r}: {host!r} is not a valid host name or IPv4 address")
    return host, _parse_port(port_text, shown, allow_port_zero)


def _valid_host(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(_LABEL_RE.match(label) for label in labels)


def _parse_port(text: str, shown: str, allow_zero: bool) -> int:
    if not text:
        raise AddressError(f"address {shown!r} has no port number after ':'")
    if not _PORT_RE.match(text):
        raise AddressError(f"address {shown!r}: port {text!r} is not a number")
    return _check_port(int(text), shown, allow_zero)


def _check_port(port: int, shown: str, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise AddressError(f"address {shown!r}: port {port} is outside {low}..65535")
    return port


def normalise_addr(addr: str | tuple[str, int], *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Accept ``"HOST:PORT"`` or ``(host, port)``; return a checked ``(host, port)``."""
    if isinstance(addr, str):
        return parse_addr(addr, allow_port_zero=allow_port_zero)
    if (not isinstance(addr, tuple) or len(addr) != 2 or not isinstance(addr[0], str)
            or type(addr[1]) is not int):
        raise AddressError(f"an address must be 'HOST:PORT' or a (host, port) tuple, got {addr!r}")
    host, port = addr
    return host or "0.0.0.0", _check_port(port, format_addr(host, port), allow_port_zero)


def format_addr(host: str, port: int) -> str:
    """``host:port`` for logs and messages, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_token(path: str | Path) -> bytes:
    """Read the shared secret: one line of at least 32 characters (surrounding whitespace dropped).

    Raises `ConfigError` if the file is missing, unreadable, empty, too short, or holds more
    than one non-empty line. Like ssh, warns (but goes on) if group or others may read it.
    """
    path = Path(path)
    make = f"create one with: openssl rand -base64 48 > {path} && chmod 600 {path}"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(_TOKEN_FILE_LIMIT + 1)
    except FileNotFoundError:
        raise ConfigError(f"token file {path} does not exist", hint=make) from None
    except PermissionError:
        raise ConfigError(f"cannot read token file {path}: permission denied",
                          hint="run as a user that may read it, or fix its owner") from None
    except IsADirectoryError:
        raise ConfigError(f"token file {path} is a directory", hint=make) from None
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror or exc}", hint=make) from None
    if mode & 0o077:
        log.warning("token file %s may be read by group or others (mode %04o); "
                    "run: chmod 600 %s", path, mode & 0o7777, path)
    return _parse_token(raw, path, make)


def _parse_token(raw: bytes, path: Path, make: str) -> bytes:
    if len(raw) > _TOKEN_FILE_LIMIT:
        raise ConfigError(f"token file {path} is larger than {_TOKEN_FILE_LIMIT} bytes; "
                          "it must hold one line", hint=make)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"token file {path} is not UTF-8 text", hint=make) from None
    text = text.strip()
    if not text:
        raise ConfigError(f"token file {path} is empty", hint=make)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raise ConfigError(f"token file {path} holds {len(lines)} non-empty lines; it must hold one",
                          hint="keep only the secret, on one line")
    if len(text) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the token in {path} is {len(text)} characters long; "
                          f"it must be at least {MIN_TOKEN_CHARS}", hint=make)
    return text.encode("utf-8")


def check_token(token: bytes) -> None:
    if not isinstance(token, bytes) or len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the token must be bytes of at least {MIN_TOKEN_CHARS} characters",
                          hint="read it with wire.load_token(path)")


@dataclass(frozen=True)
class Auth:
    """How a process proves itself: the shared token, and optionally TLS with certificates."""

    token: bytes
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        check_token(self.token)


def as_auth(auth: Auth | bytes) -> Auth:
    return auth if isinstance(auth, Auth) else Auth(auth)
