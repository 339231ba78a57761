"""fedtune-server startup checks and the app hash nodes pin."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.common import tls
from fedtune.server import daemon
from fedtune.server.federation import Federation


@pytest.fixture()
def certs(tmp_path: Path) -> Path:
    tls.create_ca(tmp_path / "ca")
    tls.create_server_cert(tmp_path / "server", tmp_path / "ca", ["fl.example.org", "127.0.0.1"])
    for name in ("a", "b"):
        tls.create_node_keys(tmp_path / "nodes" / name)
    return tmp_path


def _tls_args(c: Path) -> list[str]:
    return ["--ssl-ca-certfile", str(c / "ca/ca.pem"), "--ssl-certfile", str(c / "server/server.pem"),
            "--ssl-keyfile", str(c / "server/server.key")]


def test_every_startup_problem_is_listed_once(certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other"
    tls.create_server_cert(other, certs / "ca", ["localhost"])
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("ssh-ed25519 AAAA not-a-key\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    code = daemon.main(["--ssl-ca-certfile", str(tmp_path / "missing-ca.pem"), "--ssl-certfile",
                        str(certs / "server/server.pem"), "--ssl-keyfile", str(other / "server.key"),
                        "--node-keys", str(bad_key), "--node-keys", str(empty), "--set", "num-rounds=0",
                        "--set", "colour=blue", "--set", f"dataset={tmp_path / 'none.csv'}",
                        "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2
    for expected in ("missing-ca.pem does not exist", "does not belong to certificate", "bad.pub is not an OpenSSH",
                     "holds no *.pub files", "unknown setting 'colour'"):
        assert expected in err, err
    assert "problems must be fixed before the server can start" in err
    assert not (tmp_path / "w").exists()  # nothing was started or written


def test_tls_is_required_unless_insecure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert daemon.main(["--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--ssl-ca-certfile, --ssl-certfile and --ssl-keyfile are required" in err
    assert "--node-keys is required" in err


def test_server_certificate_must_name_a_loopback_address(certs: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    public_only = tmp_path / "public"
    tls.create_server_cert(public_only, certs / "ca", ["fl.example.org"])
    args = ["--ssl-ca-certfile", str(certs / "ca/ca.pem"), "--ssl-certfile", str(public_only / "server.pem"),
            "--ssl-keyfile", str(public_only / "server.key"), "--node-keys", str(certs / "nodes")]
    assert daemon.main(args) == 2
    assert "must also name 127.0.0.1 or localhost" in capsys.readouterr().err


def test_a_valid_setup_passes_preflight_and_finds_node_keys_in_a_directory(certs: Path, tmp_path: Path) -> None:
    args = daemon._parser().parse_args([*_tls_args(certs), "--node-keys", str(certs / "nodes"),
                                        "--work-dir", str(tmp_path / "w")])
    opts = daemon.preflight(args)
    assert [p.parent.name for p in opts.node_keys] == ["a", "b"]
    assert opts.host == "127.0.0.1" and opts.control_host == "127.0.0.1"
    assert Path(str(opts.run_config["results-dir"])).is_absolute()
    assert opts.checkpoint_dir == (tmp_path / "w" / "checkpoints").resolve()


def test_app_hash_is_the_sha256_of_the_bundle_flwr_builds(tmp_path: Path) -> None:
    first = Federation.app_hash(tmp_path / "one")
    assert first == Federation.app_hash(tmp_path / "two")  # the same for every server of this fedtune version
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(tmp_path / "one" / "app")], cwd=tmp_path, check=True,
                   capture_output=True)
    (fab,) = tmp_path.glob("*.fab")
    assert hashlib.sha256(fab.read_bytes()).hexdigest() == first


def test_a_run_where_no_node_trained_is_not_a_success(tmp_path: Path) -> None:
    from fedtune.server.federation import ServerOptions

    results = tmp_path / "results"
    results.mkdir()
    fed = Federation(ServerOptions(work_dir=tmp_path, host="127.0.0.1", port=1, control_host="127.0.0.1",
                                   insecure=True, ca=None, cert=None, key=None, node_keys=(),
                                   run_config={"results-dir": str(results)}))
    assert fed.trained_updates() == 0
    (results / "metrics.jsonl").write_text('{"round": 0, "clients": []}\n'
                                           '{"round": 1, "clients": [{"status": "error"}, {"status": "refused"}]}\n')
    assert fed.trained_updates() == 0
    with open(results / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 2, "clients": [{"status": "trained"}, {"status": "trained"}]}\n')
    assert fed.trained_updates() == 2
