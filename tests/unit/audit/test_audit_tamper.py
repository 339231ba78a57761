"""fedtune-audit on a real node ledger: it verifies, and every kind of tampering is caught at its line."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.client.round import NodePrivacy, RunRef, charge_round
from fedtune.common.audit_cli import main
from fedtune.common.ledger import canonical, entry_hash
from fedtune.common.ledger_key import key_id, load_or_create_key

REQUEST = PlanRequest(model="", dp=True, epsilon=8.0, delta=1e-5, accountant="prv", num_rounds=3, server_round=1,
                      sample_rate=0.25, steps=4, clip_norm=1.0)


@pytest.fixture(scope="module")
def node_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node that charged rounds 1-3 of a run (PRV, epsilon 8) and refused a 4th: four signed lines."""
    state = tmp_path_factory.mktemp("node")
    node = NodePrivacy.open(NodePolicy(max_epsilon=8.0, noise_plan="as-requested"), state)
    for r in (1, 2, 3, 4):
        charge_round(node, replace(REQUEST, server_round=r), run=RunRef("9"), fingerprint="ab" * 32)
    return state


@pytest.fixture
def copy(node_state: Path, tmp_path: Path) -> Path:
    shutil.copytree(node_state, tmp_path / "node")
    return tmp_path / "node"


def lines(path: Path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def write(path: Path, entries: list[dict]) -> None:
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in entries))


def resign(entry: dict, key: ed25519.Ed25519PrivateKey, *, own_id: bool = False) -> dict:
    entry = dict(entry)
    if own_id:
        entry["key"] = key_id(key.public_key())
    entry["hash"] = entry_hash(entry)
    entry["sig"] = base64.b64encode(key.sign(bytes.fromhex(entry["hash"]))).decode()
    return entry


def run_audit(state: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main([str(state / "ledger.jsonl"), "--public-key", str(state / "ledger-signing.pub"), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_untouched_ledger_verifies(node_state: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text = run_audit(node_state, capsys, "--html", str(tmp_path / "audit.html"))
    assert code == 0, text
    assert "all ledgers verified" in text
    html = (tmp_path / "audit.html").read_text()
    assert "All ledgers verified" in html and "data:image/png;base64," in html


def test_json_report_recomputes_every_entry(node_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run_audit(node_state, capsys, "--json")
    report = json.loads(text)
    assert code == 0 and report["ok"]
    entries = report["ledgers"][0]["entries"]
    assert [e["decision"] for e in entries] == ["charged", "charged", "charged", "refused"]
    for e in entries:
        assert e["epsilon_recorded"] <= e["budget"]
        assert e["epsilon_opacus"] == pytest.approx(e["epsilon_recorded"], rel=1e-6)
        assert e["epsilon_dp_accounting"] == pytest.approx(e["epsilon_recorded"], rel=0.01)


def _change_digit(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    raw = path.read_text().splitlines(keepends=True)
    entry = json.loads(raw[1])
    old = json.dumps(entry["epsilon"])
    new = old[:3] + ("1" if old[3] != "1" else "2") + old[4:]
    raw[1] = raw[1].replace(f'"epsilon":{old}', f'"epsilon":{new}')
    path.write_text("".join(raw))


def _delete_line(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    raw = path.read_text().splitlines(keepends=True)
    path.write_text("".join(raw[:1] + raw[2:]))


def _swap_lines(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    raw = path.read_text().splitlines(keepends=True)
    path.write_text("".join([raw[0], raw[2], raw[1], raw[3]]))


def _truncate_last(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    path.write_bytes(path.read_bytes()[:-25])


def _replace_signature(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    entries = lines(path)
    entries[1]["sig"] = entries[0]["sig"]
    write(path, entries)


def _resign_other_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    entries = lines(path)
    entries[1] = resign(entries[1] | {"epsilon": 1.0}, ed25519.Ed25519PrivateKey.generate())
    write(path, entries)


def _resign_other_key_and_id(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    entries = lines(path)
    entries[1] = resign(entries[1], ed25519.Ed25519PrivateKey.generate(), own_id=True)
    write(path, entries)


def _rewrite_history_with_other_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    other, prev, out = ed25519.Ed25519PrivateKey.generate(), "0" * 64, []
    for entry in lines(path)[:2]:  # a forger rebuilds a consistent chain with a key of their own
        entry = resign(entry | {"prev": prev}, other, own_id=True)
        prev = entry["hash"]
        out.append(entry)
    write(path, out)


def _understate_epsilon(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    """The node itself (its own key) records less epsilon than its events spend."""
    entries = lines(path)
    entries[1] = resign(entries[1] | {"epsilon": entries[1]["epsilon"] * 0.8}, key)
    entries[2] = resign(entries[2] | {"prev": entries[1]["hash"]}, key)
    entries[3] = resign(entries[3] | {"prev": entries[2]["hash"]}, key)
    write(path, entries)


def _overspend(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    """The node charged past its budget (as a buggy or dishonest node would), signed with its own key."""
    entries = lines(path)
    entries[3] = resign(entries[3] | {"decision": "charged", "epsilon": entries[3]["projected"]}, key)
    write(path, entries)


TAMPERING: list[tuple[str, Callable[[Path, ed25519.Ed25519PrivateKey], None], int, str]] = [
    ("change one digit", _change_digit, 2, "entry hash does not match"),
    ("delete a line", _delete_line, 2, "sequence number 3, expected 2"),
    ("swap two lines", _swap_lines, 2, "sequence number 3, expected 2"),
    ("truncate the last line", _truncate_last, 4, "torn last line"),
    ("replace a signature", _replace_signature, 2, "signature does not verify"),
    ("re-sign with another key", _resign_other_key, 2, "signature does not verify"),
    ("re-sign with another key and its id", _resign_other_key_and_id, 2, "for which no public key was given"),
    ("rewrite the history with another key", _rewrite_history_with_other_key, 1, "for which no public key was given"),
    ("understate epsilon (node key)", _understate_epsilon, 2, "but Opacus prv gives"),
    ("charge past the budget (node key)", _overspend, 4, "above the budget"),
]


@pytest.mark.parametrize(("what", "tamper", "line", "message"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_is_detected_at_its_line(
    copy: Path, capsys: pytest.CaptureFixture[str], what: str, tamper: Callable, line: int, message: str
) -> None:
    tamper(copy / "ledger.jsonl", load_or_create_key(copy / "ledger-signing.key"))
    code, text = run_audit(copy, capsys)
    assert code == 1, f"{what}: not detected\n{text}"
    assert any(f"line {line}: " in row and message in row for row in text.splitlines()), text
    code, text = run_audit(copy, capsys, "--json")
    assert code == 1 and f"line {line}:" in text


def test_usage_errors_exit_2(node_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.jsonl"), "-k", str(node_state / "ledger-signing.pub")]) == 2
    assert main([str(node_state), "-k", str(node_state / "ledger.jsonl")]) == 2
    assert "is not a PEM public key" in capsys.readouterr().err
