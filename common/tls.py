"""Key material for a federation: a CA, the server's TLS certificate, node keys.

Why these formats:

- The SuperLink serves HTTPS with a PEM certificate/key; nodes verify it with the
  CA certificate (``--root-certificates``). There is no mTLS in Flower; node
  identity comes from node authentication instead.
- Node authentication keys are EC on a NIST curve (P-384 here) in OpenSSH
  format: ``flwr supernode register`` reads the ``.pub`` with
  ``load_ssh_public_key`` and the SuperNode the private key with
  ``load_ssh_private_key``.
- Each node signs its privacy ledger with its own Ed25519 key (PKCS#8 PEM private,
  SubjectPublicKeyInfo PEM public); the auditor only needs the public half.

Private keys are written with mode 0600 and nothing is ever overwritten unless
the caller says so: every target is checked before anything is written.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.common.errors import ConfigError, clip

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
NODE_KEY, NODE_PUB = "node.key", "node.pub"
LEDGER_KEY, LEDGER_PUB = "ledger-signing.key", "ledger-signing.pub"
NODE_CURVE = ec.SECP384R1()  # NIST P-384
TLS_CURVE = ec.SECP384R1()
PRIVATE_MODE = 0o600


@dataclass(frozen=True)
class Written:
    """One file produced by a command, for the CLI's report."""

    path: Path
    secret: bool  # True for private keys (0600)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_free(paths: Iterable[Path], force: bool) -> None:
    """Refuse before writing anything if a target already exists (unless forced)."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError([f"{p} already exists; refusing to overwrite it (pass --force to replace it)"
                           for p in existing])


def _write(path: Path, data: bytes, secret: bool) -> Written:
    """Write ``data``; private keys are created 0600 from the start (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE if secret else 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, PRIVATE_MODE if secret else 0o644)
    os.replace(tmp, path)
    return Written(path, secret)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_ca(out_dir: Path, *, common_name: str = "fedtune federation CA", days: int = 3650,
              force: bool = False) -> list[Written]:
    """A self-signed CA that signs the server certificate (kept offline by the operator)."""
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    _check_free([cert_path, key_path], force)
    key = ec.generate_private_key(TLS_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return [_write(key_path, _pem_key(key), secret=True),
            _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)]


def parse_sans(names: Sequence[str]) -> list[x509.GeneralName]:
    """Hostnames and IP addresses for the certificate's subjectAltName."""
    if not names:
        raise ConfigError("the server certificate needs at least one hostname or IP address (--host)")
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() for c in name) or "/" in name:
                raise ConfigError(f"--host must be a hostname or an IP address, got {name!r}") from None
            out.append(x509.DNSName(name))
    return out


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key from ``ca_dir``; every problem reported at once."""
    problems = [f"{p} is missing (create it with `fedtune-certs ca`)"
                for p in (ca_dir / CA_CERT, ca_dir / CA_KEY) if not p.is_file()]
    if problems:
        raise ConfigError(problems)
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"cannot read the CA in {ca_dir}: {clip(str(err))}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / CA_KEY} is not an EC private key")
    return cert, key


def create_server_cert(out_dir: Path, ca_dir: Path, hosts: Sequence[str], *, days: int = 825,
                       force: bool = False) -> list[Written]:
    """The SuperLink's TLS certificate, signed by the CA, valid for ``hosts`` (SANs)."""
    sans = parse_sans(hosts)
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    _check_free([cert_path, key_path], force)
    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(TLS_CURVE)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return [_write(key_path, _pem_key(key), secret=True),
            _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)]


def create_node_keys(out_dir: Path, *, comment: str = "", force: bool = False) -> list[Written]:
    """A node's authentication key pair (OpenSSH EC P-384) and its Ed25519 ledger-signing key pair."""
    targets = [out_dir / n for n in (NODE_KEY, NODE_PUB, LEDGER_KEY, LEDGER_PUB)]
    _check_free(targets, force)
    auth = ec.generate_private_key(NODE_CURVE)
    auth_pub = auth.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    ledger = ed25519.Ed25519PrivateKey.generate()
    ledger_pub = ledger.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    suffix = f" {comment}".encode() if comment else b""
    return [
        _write(targets[0], auth.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()), secret=True),
        _write(targets[1], auth_pub + suffix + b"\n", secret=False),
        _write(targets[2], _pem_key(ledger), secret=True),
        _write(targets[3], ledger_pub, secret=False),
    ]


def fingerprint(public_openssh: bytes) -> str:
    """SHA256 fingerprint of an OpenSSH public key, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# -- checks used by the daemons before they start anything (each returns a list of problems) --

def _read(path: Path, what: str, problems: list[str]) -> bytes | None:
    if not path.is_file():
        problems.append(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        problems.append(f"{what} {path} is not readable: {err.strerror}")
        return None


def check_ca_file(path: Path) -> list[str]:
    """A PEM CA certificate (or bundle) that is currently valid."""
    problems: list[str] = []
    data = _read(path, "CA certificate", problems)
    if data is None:
        return problems
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        return [f"CA certificate {path} is not a PEM certificate: {err}"]
    for cert in certs:
        if cert.not_valid_after_utc < _now():
            problems.append(f"CA certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return problems


def check_node_key(path: Path) -> list[str]:
    """An unencrypted OpenSSH EC private key on a NIST curve, not readable by others."""
    problems: list[str] = []
    data = _read(path, "node key", problems)
    if data is None:
        return problems
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        return [f"node key {path} is not an unencrypted OpenSSH private key: {err}"]
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        problems.append(f"node key {path} must be an EC key on a NIST curve, got {type(key).__name__}")
    return problems + private_file_problems(path, "node key")


def private_file_problems(path: Path, what: str) -> list[str]:
    """A private key must be closed to other users, on the server and on the node alike."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return [f"{what} {path} is readable by other users (mode {mode:o}); run chmod 600 {path}"]
    return []


def check_node_public_key(path: Path) -> list[str]:
    """An OpenSSH EC public key, as ``flwr supernode register`` accepts."""
    problems: list[str] = []
    data = _read(path, "node public key", problems)
    if data is None:
        return problems
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        return [f"node public key {path} is not an OpenSSH public key: {err}"]
    if not isinstance(key, ec.EllipticCurvePublicKey):
        problems.append(f"node public key {path} must be an EC key on a NIST curve, got {type(key).__name__}")
    return problems


def check_server_tls(cert_path: Path, key_path: Path, ca_path: Path) -> list[str]:
    """The SuperLink's certificate, key and CA: readable, matching, in date, key private, chained to the CA."""
    ca_problems = check_ca_file(ca_path)
    problems = list(ca_problems)
    cert_data = _read(cert_path, "server certificate", problems)
    key_data = _read(key_path, "server key", problems)
    if cert_data is None or key_data is None:
        return problems
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError as err:
        return [*problems, f"server certificate {cert_path} is not a PEM certificate: {err}"]
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        return [*problems, f"server key {key_path} is not an unencrypted PEM private key: {err}"]
    if cert.public_key() != key.public_key():
        problems.append(f"server key {key_path} does not belong to certificate {cert_path}")
    if cert.not_valid_after_utc < _now():
        problems.append(f"server certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    problems += private_file_problems(key_path, "server key")
    if not ca_problems:  # a CA we could read: the certificate must chain to it
        problems += chain_problems(cert, cert_path, x509.load_pem_x509_certificates(ca_path.read_bytes()), ca_path)
    return problems


def chain_problems(cert: x509.Certificate, cert_path: Path, cas: Sequence[x509.Certificate], ca_path: Path
                   ) -> list[str]:
    """The certificate must be signed by one of the CA certificates (what nodes verify it against)."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return []
        except (ValueError, TypeError, InvalidSignature):
            continue
    return [f"server certificate {cert_path} was not issued by the CA in {ca_path}: nodes that trust that CA "
            f"would refuse the server; issue the certificate from this CA (fedtune-certs server --ca ...)"]


def cert_days_left(path: Path) -> float | None:
    """Days until the first certificate in ``path`` to expire does (None if unreadable)."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return None
    return min((c.not_valid_after_utc - _now()).total_seconds() / 86400 for c in certs) if certs else None


def probe_server(address: str, ca_path: Path, timeout_s: float = 5.0) -> tuple[bool, str | None]:
    """TLS handshake with ``host:port`` verified against the CA: (reached, problem or None).

    A certificate from another CA, or one that does not name ``host``, is a problem; a
    server that cannot be reached is not (the node waits for it), and is reported as
    ``(False, why)``.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        context = ssl.create_default_context(cafile=str(ca_path))
    except (OSError, ssl.SSLError, ValueError) as err:
        return False, f"CA certificate {ca_path} cannot be used: {clip(str(err))}"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock, \
                context.wrap_socket(sock, server_hostname=host):
            return True, None
    except ssl.SSLCertVerificationError as err:
        return True, (f"the server at {address} presented a certificate that does not verify with {ca_path} "
                      f"({clip(err.verify_message or str(err), 120)}): wrong CA, or the certificate does not name "
                      f"{host}")
    except (ssl.SSLError, OSError, ValueError) as err:
        return False, clip(str(err) or type(err).__name__, 120)
