"""A small certificate authority for one cluster: what ``clusterrep certs`` writes.

One CA (``ca.pem``, ``ca.key``) and, per member, ``NAME.pem`` and ``NAME.key``. A member's
identity (its node ``--id``, ``coordinator``, ``replica``) is its certificate's common name and
nothing else; the subjectAltNames are only the addresses others dial it at (IP or DNS), so an
address can never pass for a member name, nor a name for an address. Keys are ECDSA P-256,
written mode 0600, certificates 0644, each atomically and durably. Validity starts a week
before issue (clocks may lag) and lasts 825 days from issue (the CA: ten years). An existing CA
is reused, so members can be added later; an existing member certificate is never overwritten
silently.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .durable import atomic_write
from .errors import ConfigError

__all__ = ["Member", "issue", "parse_member"]

LOOPBACK = ("localhost", "127.0.0.1", "::1")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}\Z")  # a wire identity that fits a CN
_RESERVED = {"ca"}  # the CA's own files
_DNS_RE = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+\Z")
_CA_DAYS = 3650
_DAYS = 825


@dataclass
class Member:
    """One certificate to issue: a name, and the addresses it is dialled at."""

    name: str
    addresses: list[str] = field(default_factory=list)


def parse_member(spec: str) -> Member:
    """``NAME`` or ``NAME=ADDR[,ADDR...]`` (addresses: IPv4, IPv6 or DNS names)."""
    name, _, rest = spec.partition("=")
    if not _NAME_RE.match(name):
        raise ConfigError(f"member {spec!r}: {name!r} is not a valid name (1-64 characters: "
                          "letters, digits and '._:@-')",
                          hint="use the node's --id, 'coordinator' or 'replica', optionally "
                               "followed by =ADDR,ADDR")
    if name.lower() in _RESERVED:
        raise ConfigError(f"member {spec!r}: the name {name!r} is reserved for the CA's own files")
    addresses = [a.strip() for a in rest.split(",") if a.strip()] if rest else []
    for addr in addresses:
        if not _is_ip(addr) and not _DNS_RE.match(addr):
            raise ConfigError(f"member {spec!r}: {addr!r} is neither an IP address nor a DNS name")
    return Member(name, addresses)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)


def _write_public(path: Path, cert: x509.Certificate) -> None:
    atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _issued() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _now() -> datetime.datetime:
    """The start of a certificate's validity: a week back, so that hosts whose clocks lag (the
    cluster does not trust clocks) do not refuse a certificate issued today."""
    return _issued() - datetime.timedelta(days=7)


def _load_or_make_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() != key_path.exists():
        raise ConfigError(f"{directory} holds only one of ca.pem and ca.key",
                          hint="restore the missing file, or move both away to start a new CA")
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the CA in {directory}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an ECDSA key written by clusterrep certs")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise ConfigError(f"{key_path} is not the key of {cert_path}",
                              hint="restore the CA's own key, or move both away to start a new CA")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(f"{cert_path} is not a CA certificate")
        return cert, key, False
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clusterrep cluster CA")])
    start = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(_issued() + datetime.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, key)
    _write_public(cert_path, cert)
    return cert, key, True


def _san(member: Member, loopback: bool) -> x509.SubjectAlternativeName | None:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for addr in [*member.addresses, *(LOOPBACK if loopback else ())]:
        if addr in seen:
            continue
        seen.add(addr)
        if _is_ip(addr):
            entries.append(x509.IPAddress(ipaddress.ip_address(addr)))
        else:
            entries.append(x509.DNSName(addr))
    return x509.SubjectAlternativeName(entries) if entries else None


def issue(directory: str | Path, members: list[Member], *, loopback: bool = False,
          force: bool = False) -> list[Path]:
    """Write the CA (if new) and one certificate and key per member; return the files written.

    Refuses (`ConfigError`, nothing written) if a member's certificate exists and not ``force``.
    """
    directory = Path(directory)
    if not members:
        raise ConfigError("name at least one member to issue a certificate for",
                          hint="e.g. clusterrep certs ./pki replica=10.0.0.5 coordinator=10.0.0.6 h1 h2")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ConfigError(f"a member is named twice: {', '.join(names)}")
    for name in names:
        if not _NAME_RE.match(name) or name.lower() in _RESERVED:
            raise ConfigError(f"{name!r} cannot be a member name", hint="see clusterrep certs --help")
    existing = [directory / f"{n}.pem" for n in names if (directory / f"{n}.pem").exists()]
    if existing and not force:
        raise ConfigError(f"certificate {existing[0]} already exists",
                          hint="use --force to issue a new one. The old certificate stays valid "
                               "until it expires: to shut out a leaked key, start a new CA and "
                               "reissue every member")
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, made = _load_or_make_ca(directory)
    written = [directory / "ca.pem", directory / "ca.key"] if made else []
    for member in members:
        key = _key()
        start = _now()
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, member.name)]))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(_issued() + datetime.timedelta(days=_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        san = _san(member, loopback)
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_private(directory / f"{member.name}.key", key)
        _write_public(directory / f"{member.name}.pem", cert)
        written += [directory / f"{member.name}.pem", directory / f"{member.name}.key"]
    return written
