"""fedtune-client: every startup problem at once, TLS unless --insecure, clear 305 messages, allow-lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.client import daemon
from fedtune.client.gate import read_allowlist
from fedtune.client.node_check import NodeOptions, problems
from fedtune.common import tls
from fedtune.common.errors import ConfigError
from tests.tiny import make_sentiment_frame

HASH = "ab" * 32
LABELS = ("neg", "pos")  # the label set a node declares


@pytest.fixture()
def node(tmp_path: Path) -> dict[str, Path]:
    """A valid node setup: CA, node key, data, policy, allow-list, state dir."""
    tls.create_ca(tmp_path / "ca")
    tls.create_node_keys(tmp_path / "keys")
    make_sentiment_frame(40).to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "policy.toml").write_text("max-epsilon = 4.0\ndelta = 1e-5\ndataset-id = \"ward-7\"\n")
    (tmp_path / "allowed.txt").write_text(f"# approved 2026-11-01\n{HASH}\n")
    return {"ca": tmp_path / "ca/ca.pem", "key": tmp_path / "keys/node.key", "data": tmp_path / "data.csv",
            "policy": tmp_path / "policy.toml", "allow": tmp_path / "allowed.txt", "state": tmp_path / "state"}


def _argv(n: dict[str, Path], **override: str | None) -> list[str]:
    args = {"--superlink": "127.0.0.1:1", "--root-certificates": str(n["ca"]), "--node-key": str(n["key"]),
            "--data": str(n["data"]), "--policy": str(n["policy"]), "--state-dir": str(n["state"]),
            "--app-allowlist": str(n["allow"]), "--labels": "neg,pos"} | override
    return [x for k, v in args.items() if v is not None for x in (k, v)]


def test_valid_setup_passes_the_checks(node: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert daemon.main([*_argv(node), "--check"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_every_problem_is_reported_at_once(node: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text("max-epsilon = -1\n")
    bad_data = tmp_path / "bad.csv"
    bad_data.write_text("body,label\nhello,pos\n")
    code = daemon.main([*_argv(node, **{"--root-certificates": str(tmp_path / "missing-ca.pem"),
                                        "--node-key": str(node["policy"]), "--data": str(bad_data),
                                        "--policy": str(bad_policy), "--state-dir": str(bad_data / "state")}),
                        "--check"])
    err = capsys.readouterr().err
    assert code == 2
    for expected in ("state directory (privacy ledger)", "missing-ca.pem does not exist",
                     "not an unencrypted OpenSSH private key", "column 'text' (text-column) is missing",
                     "max-epsilon must be > 0"):
        assert expected in err, err
    assert "problems must be fixed" in err and err.count("\n- ") >= 5


def test_missing_files_each_get_a_line(node: dict[str, Path], tmp_path: Path) -> None:
    opts = NodeOptions(superlink="127.0.0.1:1", data=tmp_path / "none.csv", labels=LABELS, state_dir=node["state"],
                       root_certificates=tmp_path / "none.pem", node_key=tmp_path / "none.key",
                       policy=tmp_path / "none.toml", allowlist=tmp_path / "none.txt")
    found = problems(opts)
    for name in ("none.csv", "none.pem", "none.key", "none.toml", "none.txt"):
        assert any(name in p for p in found), (name, found)


def test_tls_is_required_unless_insecure_is_explicit(node: dict[str, Path]) -> None:
    base = {"superlink": "127.0.0.1:1", "data": node["data"], "labels": LABELS, "state_dir": node["state"],
            "policy": node["policy"],
            "allowlist": node["allow"]}
    assert any("--root-certificates is required" in p for p in problems(NodeOptions(**base)))
    assert problems(NodeOptions(**base, insecure=True)) == []
    refused = problems(NodeOptions(**base, insecure=True, node_key=node["key"]))
    assert any("node authentication requires TLS" in p for p in refused)


def test_app_pinning_is_required_unless_waived(node: dict[str, Path]) -> None:
    base = {"superlink": "127.0.0.1:1", "data": node["data"], "labels": LABELS, "state_dir": node["state"],
            "policy": node["policy"],
            "root_certificates": node["ca"]}
    assert any("--app-allowlist" in p for p in problems(NodeOptions(**base)))
    assert problems(NodeOptions(**base, allow_any_app=True)) == []


def test_loose_node_key_permissions_are_reported(node: dict[str, Path]) -> None:
    node["key"].chmod(0o644)
    opts = NodeOptions(superlink="127.0.0.1:1", data=node["data"], labels=LABELS, state_dir=node["state"],
                       policy=node["policy"],
                       root_certificates=node["ca"], node_key=node["key"], allowlist=node["allow"])
    assert any("chmod 600" in p for p in problems(opts))


def test_allowlist_parsing_names_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text(f"{HASH.upper()}  # upper case is fine\n\nnot-a-hash\n{'c' * 63}\n")
    with pytest.raises(ConfigError) as info:
        read_allowlist(path)
    assert [p.split(":")[0] for p in info.value.problems] == [f"{path} line 3", f"{path} line 4"]
    path.write_text(f"{HASH.upper()}  # upper case is fine\n")
    assert read_allowlist(path) == frozenset({HASH})


@pytest.mark.parametrize(("tail", "insecure", "key", "expected"), [
    ("ssl.SSLError: [SSL: CERTIFICATE_VERIFY_FAILED]", False, True, "TLS with"),
    ("Failed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode.", False, True,
     "not registered"),
    ("Failed to initialize the connection to the SuperLink.\nServer disconnected without sending a response.", True,
     False, "requires TLS"),
])
def test_exit_305_is_explained(tail: str, insecure: bool, key: bool, expected: str, tmp_path: Path) -> None:
    opts = NodeOptions(superlink="127.0.0.1:443", data=tmp_path, state_dir=tmp_path, insecure=insecure,
                       node_key=tmp_path / "node.key" if key else None)
    assert expected in daemon.explain_305(tail, opts)


def test_node_config_passes_absolute_paths(node: dict[str, Path]) -> None:
    opts = NodeOptions(superlink="127.0.0.1:1", data=node["data"], labels=LABELS, state_dir=node["state"],
                       policy=node["policy"])
    config = opts.node_config
    assert f'data-path="{node["data"].resolve()}"' in config and 'policy="' in config and 'state-dir="' in config


def test_unreachable_server_is_named() -> None:
    import socket

    from fedtune.common.flower.processes import free_port

    reason = daemon.reachable(f"127.0.0.1:{free_port()}", timeout_s=1.0)
    assert isinstance(reason, str) and "refused" in reason.lower(), reason
    with socket.create_server(("127.0.0.1", 0)) as listening:  # a server that is there: no reason
        assert daemon.reachable(f"127.0.0.1:{listening.getsockname()[1]}", timeout_s=1.0) is None


def test_shipped_deploy_examples_are_valid() -> None:
    import tomllib

    from fedtune.client.policy import load_policy
    from fedtune.common.settings import RunSettings

    examples = Path(__file__).resolve().parents[3] / "deploy" / "examples"
    policies = sorted(examples.glob("policy*.toml"))
    assert {p.name for p in policies} >= {"policy.toml", "policy-demo-a.toml", "policy-demo-b.toml"}, policies
    for policy in policies:
        assert load_policy(policy).max_epsilon > 0
    RunSettings.from_config(tomllib.loads((examples / "run.toml").read_text()))
    assert read_allowlist(examples / "allowed-apps.txt") == frozenset()


def test_ledger_key_named_by_the_policy_must_exist_and_be_private(node: dict[str, Path], tmp_path: Path) -> None:
    opts = NodeOptions(superlink="127.0.0.1:1", data=node["data"], labels=LABELS, state_dir=node["state"],
                       policy=node["policy"],
                       root_certificates=node["ca"], allowlist=node["allow"])
    node["policy"].write_text(f'max-epsilon = 4.0\ndataset-id = "w"\nledger-key = "{tmp_path / "missing.key"}"\n')
    assert any("missing.key" in p and "fedtune-certs node" in p for p in problems(opts))
    key = tmp_path / "keys/ledger-signing.key"
    node["policy"].write_text(f'max-epsilon = 4.0\ndataset-id = "w"\nledger-key = "{key}"\n')
    assert problems(opts) == []
    node["policy"].write_text(f'max-epsilon = 4.0\ndataset-id = "w"\nledger-key = "{tmp_path / "ca/ca.key"}"\n')
    assert any("must be an Ed25519 key" in p for p in problems(opts))
