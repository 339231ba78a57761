"""A node's Ed25519 ledger-signing key: created once, never overwritten, private half 0600.

Formats match ``fedtune-certs node`` (common/tls.py): private key PKCS#8 PEM
(``ledger-signing.key``), public key SubjectPublicKeyInfo PEM next to it
(``ledger-signing.pub``), which is what auditors are given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.errors import ConfigError

KEY_FILE = "ledger-signing.key"
PRIVATE_MODE = 0o600


def public_path(key_path: Path) -> Path:
    """``x.key`` -> ``x.pub``; anything else gets ``.pub`` appended."""
    return key_path.with_suffix(".pub") if key_path.suffix == ".key" else key_path.with_name(key_path.name + ".pub")


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    """A short, stable name for a public key: sha256 of its 32 raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def node_identity(auth_public_key: Path) -> str:
    """A node's identity as ledger headers name it: ``sha256:`` + sha256 of its authentication public key
    (the OpenSSH ``node.pub`` that ``fedtune-certs node`` makes, or a PEM key), in DER SubjectPublicKeyInfo form,
    so that the file's comment or format does not change it."""
    try:
        data = auth_public_key.read_bytes()
    except OSError as err:
        raise ConfigError(f"node public key {auth_public_key} cannot be read: {err.strerror or err}") from err
    try:
        key = serialization.load_ssh_public_key(data) if data.startswith(b"ssh-") or data.startswith(b"ecdsa-") \
            else serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"node public key {auth_public_key} is not an OpenSSH or PEM public key") from err
    return public_identity(key)


def public_identity(key: Any) -> str:
    """``sha256:`` + sha256 of a public key in DER SubjectPublicKeyInfo form (see :func:`node_identity`)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def private_key_identity(path: Path) -> str:
    """The identity of the node whose private key (OpenSSH or PEM) is at ``path``."""
    try:
        data = path.read_bytes()
        key = (serialization.load_ssh_private_key(data, password=None) if b"OPENSSH PRIVATE KEY" in data
               else serialization.load_pem_private_key(data, password=None))
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"node key {path} cannot be read as an unencrypted private key") from err
    return public_identity(key.public_key())


def public_pem(public: ed25519.Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively (O_EXCL: an existing key is never replaced) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"ledger key {path} is readable by others (mode {mode:04o}); run: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"ledger key {path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"ledger key {path} is a {type(key).__name__}; the ledger needs an Ed25519 key")
    return key


def load_or_create_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The node's signing key at ``path``; generated on first use, with its public half exported."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        new = ed25519.Ed25519PrivateKey.generate()
        pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        with contextlib.suppress(FileExistsError):  # another process created it first: use theirs
            _write_new(path, pem, PRIVATE_MODE)
    key = load_private_key(path)
    pub = public_path(path)
    if not pub.exists():
        with contextlib.suppress(FileExistsError):
            _write_new(pub, public_pem(key.public_key()), 0o644)
    if load_public_key(pub) != key.public_key():
        raise ConfigError(f"public key {pub} does not belong to ledger key {path}; move it away and it is re-exported")
    return key


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    """An auditor's copy of a node's public key (SubjectPublicKeyInfo PEM)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"public key {path} cannot be read: {err.strerror or err}") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"public key {path} is not a PEM public key ({str(err).split('.')[0]})") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"public key {path} is a {type(key).__name__}; ledgers are signed with Ed25519")
    return key
