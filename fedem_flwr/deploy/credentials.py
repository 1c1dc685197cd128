"""TLS certificates for a hub's SuperLink and key pairs for contributors' SuperNodes.

The SuperLink serves its Fleet, Control and Runtime APIs on one port, and with SuperNode
authentication on it needs all three of ``--ssl-ca-certfile``, ``--ssl-certfile`` and
``--ssl-keyfile``. The hub's own processes (the SuperExec that starts the ServerApp) dial it on
127.0.0.1, so the server certificate always names ``127.0.0.1`` and ``localhost`` besides the
names contributors use.

A contributor's key is an OpenSSH ECDSA key on a NIST curve (what ``ssh-keygen -t ecdsa -b 384``
writes), the form ``flower-supernode --auth-supernode-private-key`` reads and
``flwr supernode register`` takes.

Nothing here overwrites a key: an existing CA is reused to sign a new server certificate, and a
new server certificate or node key replaces an old one only with ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedem_flwr.durable import atomic_write
from fedem_flwr.errors import FedemError

ALWAYS_NAMED = ("127.0.0.1", "localhost")
CA_DAYS = 3650


class CredentialsError(FedemError, ValueError):
    """A certificate or key cannot be written or read as asked."""


@dataclass(frozen=True)
class ServerCredentials:
    """The three files the SuperLink takes, and the CA certificate contributors verify it with."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key)]


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's OpenSSH key pair: the private key stays on its machine, the public one is registered."""

    private: Path
    public: Path


def server_credentials(
    folder: Path, hosts: Sequence[str], *, days: int = 365, force: bool = False,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
) -> ServerCredentials:
    """Write ``ca.crt``/``ca.key`` (kept if present) and ``server.crt``/``server.key`` naming ``hosts``.

    ``hosts`` are DNS names or IP addresses contributors dial; 127.0.0.1 and localhost are always
    added, since the SuperLink's own launcher connects there.
    """
    if days < 1:
        raise CredentialsError(f"`days` is {days}; a certificate must be valid for at least 1 day")
    folder.mkdir(parents=True, exist_ok=True)
    paths = ServerCredentials(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    if not force and (paths.server_cert.exists() or paths.server_key.exists()):
        raise CredentialsError(
            f"{paths.server_cert} already exists; pass --force to issue a new server certificate "
            "(the CA is kept, so contributors' --root-certificates stay valid)"
        )
    names = list(dict.fromkeys([*hosts, *ALWAYS_NAMED]))
    alt_names = [_general_name(n) for n in names]
    ca_key, ca_cert = _ca(folder, now())
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _sign(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), ca_cert.subject, key, ca_key, now(), days,
        [(x509.SubjectAlternativeName(alt_names), False),
         (x509.BasicConstraints(ca=False, path_length=None), True),
         (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
         (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)],
    )
    _write_private(paths.server_key, _pem_key(key))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def node_key(private: Path, *, force: bool = False) -> NodeKey:
    """Write an OpenSSH ECDSA P-384 key pair (``private`` and ``private.pub``), as ``ssh-keygen`` would."""
    public = private.with_name(private.name + ".pub")
    if not force and private.exists():
        raise CredentialsError(
            f"{private} already exists; it is this node's identity on the hub (its pseudonym and history "
            "follow it), so it is not replaced without --force"
        )
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" fedem-supernode\n")
    return NodeKey(private, public)


def certificate_names(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate names (its subject alternative names)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as err:
        raise CredentialsError(f"cannot read the certificate {cert_path}: {err}") from err
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in sans]


def _ca(folder: Path, start: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The hub's CA: read when present, else made (it outlives server certificates)."""
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if cert_path.exists() and key_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as err:
            raise CredentialsError(f"cannot read the CA in {folder}: {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CredentialsError(f"{key_path} is not an elliptic-curve key written by `fedem certs`")
        return key, cert
    if cert_path.exists() or key_path.exists():
        raise CredentialsError(f"{folder} holds only half a CA (ca.crt and ca.key go together)")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedem hub CA")])
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
    cert = _sign(name, name, key, key, start, CA_DAYS,
                 [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True),
                  (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)])
    _write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _sign(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
    start: dt.datetime, days: int, extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate for ``key`` signed by ``signer``, valid from 5 minutes before ``start`` (clock skew)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(minutes=5))
        .not_valid_after(start + dt.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not name or any(c.isspace() for c in name) or "/" in name:
            raise CredentialsError(f"host {name!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Created with mode 0600 from the start, so a key is never readable by others, even briefly."""
    with atomic_write(path, permissions=0o600) as out:
        out.write(data)
