"""fedtune-certs: formats Flower accepts, SANs, 0600 private keys, no silent overwrite."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedtune.common import tls
from fedtune.common.errors import ConfigError
from fedtune.tools.certs import main


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    assert main(["dev", "--out", str(out), "--host", "fl.example.org", "--host", "10.0.0.5", "--node", "a"]) == 0
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_0600_and_public_files_are_not_secret(certs: Path) -> None:
    for key in (certs / "ca/ca.key", certs / "server/server.key", certs / "nodes/a/node.key",
                certs / "nodes/a/ledger-signing.key"):
        assert _mode(key) == 0o600, key
    for pub in (certs / "ca/ca.pem", certs / "server/server.pem", certs / "nodes/a/node.pub"):
        assert _mode(pub) == 0o644, pub


def test_server_certificate_has_sans_and_chains_to_ca(certs: Path) -> None:
    cert = x509.load_pem_x509_certificate((certs / "server/server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca/ca.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert tls.check_server_tls(certs / "server/server.pem", certs / "server/server.key", certs / "ca/ca.pem") == []


def test_node_keys_are_openssh_ec_nist_and_ledger_key_is_ed25519(certs: Path) -> None:
    node = certs / "nodes/a"
    private = serialization.load_ssh_private_key((node / "node.key").read_bytes(), password=None)
    public = serialization.load_ssh_public_key((node / "node.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == "secp384r1"
    assert private.public_key() == public
    ledger = serialization.load_pem_private_key((node / "ledger-signing.key").read_bytes(), password=None)
    ledger_pub = serialization.load_pem_public_key((node / "ledger-signing.pub").read_bytes())
    assert isinstance(ledger, ed25519.Ed25519PrivateKey) and isinstance(ledger_pub, ed25519.Ed25519PublicKey)
    ledger_pub.verify(ledger.sign(b"entry"), b"entry")
    assert tls.check_node_key(node / "node.key") == [] and tls.check_node_public_key(node / "node.pub") == []


def test_existing_files_are_never_overwritten_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["node", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "node.key").read_bytes()
    assert main(["node", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "node.key already exists" in err and "ledger-signing.pub already exists" in err and "--force" in err
    assert (tmp_path / "node.key").read_bytes() == before
    assert main(["node", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "node.key").read_bytes() != before


def test_partial_collision_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "ledger-signing.pub").write_text("keep me")
    with pytest.raises(ConfigError, match="ledger-signing.pub already exists"):
        tls.create_node_keys(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger-signing.pub"]


@pytest.mark.parametrize("host", ["", "bad host", "a/b"])
def test_bad_san_is_named(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--host must be"):
        tls.parse_sans([host])


def test_server_cert_without_ca_lists_both_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        tls.create_server_cert(tmp_path / "s", tmp_path / "no-ca", ["localhost"])
    assert len(info.value.problems) == 2


def test_checks_report_invalid_and_loose_keys(certs: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    assert "not a PEM certificate" in tls.check_ca_file(junk)[0]
    assert "does not exist" in tls.check_ca_file(tmp_path / "missing.pem")[0]
    assert "not an unencrypted OpenSSH private key" in tls.check_node_key(junk)[0]
    loose = tmp_path / "node.key"
    loose.write_bytes((certs / "nodes/a/node.key").read_bytes())
    loose.chmod(0o644)
    assert "readable by other users" in tls.check_node_key(loose)[0]
    other = tmp_path / "other"
    tls.create_server_cert(other, certs / "ca", ["localhost"])
    problems = tls.check_server_tls(certs / "server/server.pem", other / "server.key", certs / "ca/ca.pem")
    assert problems and "does not belong" in problems[0]
