"""fedtune-audit on a real signed ledger: it verifies, and every kind of tampering is caught at its line.

The ledger (tests/unit/audit/ledgers.py): line 1 the signed header (node A, budget 8, delta
1e-5, PRV), lines 2-4 rounds 1-3 charged (epsilon 5.05, 6.55, 7.73), line 5 round 4 refused.
Each case edits a copy the way the issue describes and expects exit 1 with a message naming
the line and the reason.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.audit.cli import main
from fedtune.common.privacy.accountant import DpEvent, opacus_epsilon
from tests.unit.audit.ledgers import (
    NODE_A,
    NODE_B,
    Node,
    charge,
    flip_signature_bits,
    four_rounds,
    lines,
    make_node,
    rechain,
    write,
)


@pytest.fixture(scope="module")
def node_state(tmp_path_factory: pytest.TempPathFactory) -> Node:
    node = make_node(tmp_path_factory.mktemp("node-a"))
    four_rounds(node)
    return node


@pytest.fixture
def copy(node_state: Node, tmp_path: Path) -> Node:
    shutil.copytree(node_state.root, tmp_path / "node", symlinks=True)
    return make_node(tmp_path / "node")


def run_audit(node: Node, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main([str(node.ledger_path), "--public-key", str(node.public_key), "--node", NODE_A, *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_untouched_ledger_verifies(node_state: Node, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text = run_audit(node_state, capsys, "--html", str(tmp_path / "audit.html"),
                           "--policy", str(node_state.policy_file()))
    assert code == 0, text
    assert "all ledgers verified" in text and "delta 1e-05" in text
    html = (tmp_path / "audit.html").read_text()
    assert "All ledgers verified" in html and "data:image/png;base64," in html and "delta 1e-05" in html


def test_json_report_recomputes_every_entry(node_state: Node, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run_audit(node_state, capsys, "--json")
    report = json.loads(text)
    assert code == 0 and report["ok"]
    ledger = report["ledgers"][0]
    assert ledger["node"] == NODE_A and ledger["policies"][0]["delta"] == 1e-5
    entries = ledger["entries"]
    assert [e["decision"] for e in entries] == ["charged", "charged", "charged", "refused"]
    for e in entries:
        assert e["epsilon_recorded"] <= e["budget"] == 8.0 and e["delta"] == 1e-5
        assert e["epsilon_opacus"] == pytest.approx(e["epsilon_recorded"], rel=1e-6)
        assert e["epsilon_dp_accounting"] == pytest.approx(e["epsilon_recorded"], rel=0.01)
        assert e["rng"] == "secrets" and e["released"] == ["train-loss"]


Tamper = Callable[[Path, ed25519.Ed25519PrivateKey], None]


def _change_digit(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    raw = path.read_text().splitlines(keepends=True)
    old = json.dumps(json.loads(raw[2])["epsilon"])
    raw[2] = raw[2].replace(f'"epsilon":{old}', f'"epsilon":{old[:3]}{"1" if old[3] != "1" else "2"}{old[4:]}')
    path.write_text("".join(raw))


def _delete_line(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    raw = path.read_text().splitlines(keepends=True)
    path.write_text("".join(raw[:2] + raw[3:]))


def _swap_lines(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    raw = path.read_text().splitlines(keepends=True)
    path.write_text("".join([raw[0], raw[2], raw[1], *raw[3:]]))


def _truncate_last(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    path.write_bytes(path.read_bytes()[:-25])


def _replace_signature(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    entries = lines(path)
    entries[2]["sig"] = entries[1]["sig"]
    write(path, entries)


def _noncanonical_signature(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    entries = lines(path)
    entries[2]["sig"] = flip_signature_bits(entries[2]["sig"])
    write(path, entries)


def _resign_other_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    entries = lines(path)
    other = ed25519.Ed25519PrivateKey.generate()
    entries[2] = rechain(entries, other, 2, lambda e: e | {"epsilon": 1.0})[2] | {"key": entries[2]["key"]}
    write(path, entries)


def _own_key(edit: Callable[[dict], dict], line: int = 3) -> Tamper:
    """Re-sign line ``line`` (and re-chain every later one) with the node's own key after ``edit``."""
    def tamper(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
        write(path, rechain(lines(path), key, line - 1, edit))
    return tamper


def _text_edit(replacement: str) -> Tamper:
    """Replace line 3's epsilon by raw JSON text (what no JSON library would write)."""
    def tamper(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
        raw = path.read_text().splitlines(keepends=True)
        old = json.dumps(json.loads(raw[2])["epsilon"])
        raw[2] = raw[2].replace(f'"epsilon":{old}', replacement)
        path.write_text("".join(raw))
    return tamper


def _steps_halved(e: dict) -> dict:
    return e | {"event": e["event"] | {"steps": 2}}


def _charged_to_refused(e: dict) -> dict:
    return e | {"decision": "refused"}


TAMPERING: list[tuple[str, Tamper, int, str]] = [
    ("change one digit", _change_digit, 3, "entry hash does not match"),
    ("delete a line", _delete_line, 3, "sequence number 4, expected 3"),
    ("swap two lines", _swap_lines, 2, "sequence number 3, expected 2"),
    ("truncate the last line", _truncate_last, 5, "torn last line"),
    ("replace a signature", _replace_signature, 3, "signature does not verify"),
    ("non-canonical signature", _noncanonical_signature, 3, "field 'sig' is not in canonical base64"),
    ("re-sign with another key", _resign_other_key, 3, "signature does not verify"),
    ("own key: delta 1e-3", _own_key(lambda e: e | {"delta": 1e-3}), 3,
     "records delta 0.001, but the policy in force (header (line 1)) sets delta 1e-05"),
    ("own key: budget 100", _own_key(lambda e: e | {"budget": 100.0}), 3,
     "records budget 100, but the policy in force (header (line 1)) allows 8"),
    ("own key: steps 4 -> 2", _own_key(_steps_halved), 3, "but Opacus prv gives"),
    ("own key: charged -> refused", _own_key(_charged_to_refused), 3, "a refusal that spent epsilon"),
    ("own key: mechanism laplace", _own_key(lambda e: e | {"event": e["event"] | {"mechanism": "laplace"}}), 3,
     "field 'event.mechanism' must be one of subsampled-gaussian, got 'laplace'"),
    ("own key: unknown format", _own_key(lambda e: e | {"format": "fedtune-ledger/3"}), 3,
     "field 'format' must be 'fedtune-ledger/2'"),
    ("own key: unknown accountant version", _own_key(
        lambda e: e | {"accountant": e["accountant"] | {"version": "9.0.0"}}), 3,
     "field 'accountant.version' has an unexpected form"),
    ("own key: header budget 100", _own_key(lambda e: e | {"budget": 100.0}, line=1), 2,
     "records budget 8, but the policy in force (header (line 1)) allows 100"),
    ("NaN epsilon", _text_edit('"epsilon":NaN'), 3, "field 'epsilon': NaN is not a finite number"),
    ("1e999 epsilon", _text_edit('"epsilon":1e999'), 3, "field 'epsilon': 1e999 is not a finite number"),
    ("overspend (own key)", _own_key(lambda e: e | {"decision": "charged", "epsilon": e["projected"],
                                                    "epsilon_round": 1.0}, line=5), 5, "above the budget 8"),
]


@pytest.mark.parametrize(("what", "tamper", "line", "message"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_is_detected_at_its_line(
    copy: Node, capsys: pytest.CaptureFixture[str], what: str, tamper: Tamper, line: int, message: str
) -> None:
    tamper(copy.ledger_path, copy.key)
    code, text = run_audit(copy, capsys)
    assert code == 1, f"{what}: not detected\n{text}"
    assert "Traceback" not in text
    assert any(f"line {line}: " in row and message in row for row in text.splitlines()), text
    code, text = run_audit(copy, capsys, "--json")
    assert code == 1 and f"line {line}:" in text


def test_own_key_header_with_budget_100_fails_against_the_node_policy(copy: Node,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The node re-signs its whole history with a looser header: the auditor's --policy still holds."""
    write(copy.ledger_path, rechain(lines(copy.ledger_path), copy.key, 0, lambda e: e | {"budget": 100.0}))
    code, text = run_audit(copy, capsys, "--policy", str(copy.policy_file()))
    assert code == 1
    assert "line 1: the node's policy allows budget 100, above max-epsilon 8" in text


def test_another_nodes_ledger_is_refused_with_both_keys_given(copy: Node, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    other = make_node(tmp_path / "node-b", NODE_B)
    charge(other, 1)
    shutil.copy(other.ledger_path, copy.ledger_path)  # node A's ledger replaced by node B's
    code, text = run_audit(copy, capsys, "--public-key", str(other.public_key))
    assert code == 1
    assert f"line 1: the ledger belongs to node {NODE_B}, expected node {NODE_A}" in text
    roster = tmp_path / "roster.toml"
    roster.write_text(f'[[node]]\nid = "{NODE_A}"\npublic-key = "{copy.public_key}"\nledger = "{copy.ledger_path}"\n'
                      f'[[node]]\nid = "{NODE_B}"\npublic-key = "{other.public_key}"\n')
    assert main(["--roster", str(roster)]) == 1
    assert f"line 1: the ledger belongs to node {NODE_B}, expected node {NODE_A}" in capsys.readouterr().out


def test_roster_rejects_a_ledger_signed_by_another_nodes_key(copy: Node, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    other = make_node(tmp_path / "node-b", NODE_B)
    roster = tmp_path / "roster.toml"
    roster.write_text(f'[[node]]\nid = "{NODE_A}"\npublic-key = "{other.public_key}"\n'
                      f'[[node]]\nid = "{NODE_B}"\npublic-key = "{copy.public_key}"\n')
    assert main([str(copy.ledger_path), "--roster", str(roster)]) == 1
    assert "line 1: signed by key" in capsys.readouterr().out


def test_policy_delta_is_shown_and_a_large_delta_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = make_node(tmp_path / "n", delta=0.1)
    charge(node, 1)
    code, text = run_audit(node, capsys, "--html", str(tmp_path / "a.html"))
    assert code == 1 and "delta 0.1" in text
    assert "line 1: the policy's delta 0.1 is above 0.0001" in text
    assert "delta 0.1" in (tmp_path / "a.html").read_text()
    assert main([str(node.ledger_path), "-k", str(node.public_key), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ledgers"][0]["entries"][0]["delta"] == 0.1


def test_understated_epsilon_within_tolerance_but_above_the_budget_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A true 8.06 recorded as 7.99 under budget 8: consistent within 1% + 0.01, but both replays exceed 8."""
    sigma = 0.8  # q 0.25, 4 steps, 2 rounds at delta 1e-5: Opacus PRV 8.047, dp-accounting PLD 8.036
    event = DpEvent(0.25, sigma, 4)
    true = opacus_epsilon([event, event], 1e-5, "prv")
    assert 8.0 < true < 8.1
    node = make_node(tmp_path / "n", budget=100.0)
    charge(node, 1, event)
    charge(node, 2, event)
    forged = rechain(lines(node.ledger_path), node.key, 0, lambda e: e | {"budget": 8.0})
    forged = rechain(forged, node.key, 1, lambda e: e | {"budget": 8.0})
    forged = rechain(forged, node.key, 2, lambda e: e | {"budget": 8.0, "epsilon": 7.99})
    write(node.ledger_path, forged)
    code, text = run_audit(node, capsys)
    assert code == 1
    assert "line 3: Opacus prv replays epsilon 8.0" in text and "above the budget 8" in text
    assert "line 3: dp-accounting pld replays epsilon 8.0" in text
    assert "recorded epsilon 7.99, but" not in text  # within the tolerance: only the budget catches it


def test_seeded_rng_is_flagged_and_fails_with_strict_rng(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = make_node(tmp_path / "n")
    charge(node, 1, rng="seeded-insecure:42")
    code, text = run_audit(node, capsys)
    assert code == 0 and "line 2: noise from a seeded generator (seeded-insecure:42)" in text
    assert "not a production guarantee" in text
    code, text = run_audit(node, capsys, "--strict-rng")
    assert code == 1 and "line 2: noise from a seeded generator" in text


def test_usage_errors_exit_2(node_state: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pub = str(node_state.public_key)
    assert main([str(tmp_path / "missing.jsonl"), "-k", pub]) == 2
    assert main([str(node_state.state), "-k", str(node_state.ledger_path)]) == 2
    assert "is not a PEM public key" in capsys.readouterr().err
    assert main([str(node_state.ledger_path), "-k", pub, "--tolerance", "0.05"]) == 2
    assert "can only make the audit stricter" in capsys.readouterr().err
    assert main([str(node_state.ledger_path), "-k", pub, "--node", "hospital-a"]) == 2
    assert main([str(node_state.ledger_path), "-k", pub, "--policy", str(tmp_path / "none.toml")]) == 2
