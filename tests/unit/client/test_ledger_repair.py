"""Torn-line repair: the bytes are kept verbatim, the round is charged, nothing is ever under-counted."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from fedtune.audit.cli import main as audit_main
from fedtune.client.ledger_repair import repair_torn_ledger
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.schema import event_from_json
from fedtune.common.ledger.witness import Witness
from fedtune.common.privacy.accountant import opacus_epsilon
from tests.unit.audit.ledgers import EVENT, NODE_A, Node, charge, lines, make_node


def crash_during(node: Node, server_round: int, keep: int) -> bytes:
    """Round ``server_round`` is appended, but the process dies after ``keep`` bytes (before its witness update)."""
    witness = node.witness.read_bytes()
    charge(node, server_round)
    data = node.ledger_path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    node.ledger_path.write_bytes(data[:start + keep])
    node.witness.write_bytes(witness)
    return data[start:start + keep]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    node = make_node(tmp_path / "n")
    charge(node, 1)
    charge(node, 2)
    return node


def test_a_torn_charge_is_charged_from_its_own_bytes(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    torn = crash_during(node, 3, keep=700)
    assert b'"event":{' in torn
    with pytest.raises(PrivacyError, match="line 4: torn last line: 700 bytes"), node.ledger().session():
        pass
    repair = repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)
    assert repair.recovered == "torn-line" and repair.evidence.read_bytes() == torn  # kept verbatim
    entry = repair.entry.to_json()
    assert entry == lines(node.ledger_path)[-1]  # the line as written
    # The round number comes late in a canonical line: not in these 700 bytes, so recorded as 0 (unknown).
    assert (entry["kind"], entry["seq"], entry["decision"], entry["round"]) == ("repair", 4, "charged", 0)
    assert event_from_json(entry["event"]) == EVENT == repair.entry.event
    assert entry["epsilon"] == pytest.approx(opacus_epsilon([EVENT] * 3, 1e-5, "prv"))
    assert entry["repair"]["sha256"] == hashlib.sha256(torn).hexdigest() and entry["repair"]["bytes"] == 700
    assert len(entry["nonce"]) == 64 and entry["nonce"] not in torn.decode()  # a fresh nonce, like every entry
    assert "projected" not in entry and "request" not in entry and "rng" not in entry  # a repair records none
    assert Witness(node.witness).read().seq == 4
    assert charge(node, 4)["decision"] == "refused"  # the repaired charge counts: round 4 no longer fits
    code = audit_main([str(node.ledger_path), "-k", str(node.public_key), "--node", NODE_A])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "line 4: repair of a torn line (700 bytes kept as ledger.jsonl.torn-" in out


def test_a_fragment_without_its_event_is_not_repaired_and_nothing_changes(node: Node) -> None:
    crash_during(node, 3, keep=60)
    before = node.ledger_path.read_bytes()
    with pytest.raises(PrivacyError, match="holds neither its DP event nor a run that charged before"):
        repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)
    assert node.ledger_path.read_bytes() == before
    assert not list(node.ledger_path.parent.glob("ledger.jsonl.torn-*"))


def test_a_torn_refusal_charges_nothing(node: Node) -> None:
    charge(node, 3)
    crash_during(node, 4, keep=500)  # round 4 does not fit: a refusal
    repair = repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)
    assert repair.recovered == "refusal" and repair.entry.decision == "refused"
    assert repair.entry.epsilon == pytest.approx(lines(node.ledger_path)[-2]["epsilon"])


def test_run_maximum_when_the_event_is_unreadable(node: Node) -> None:
    node.ledger_path.write_bytes(node.ledger_path.read_bytes() + b'{"dataset":"ward-7-notes","event":{"mech')
    bad_event = b',"run":"9","run_key":"rk"'  # as if the event bytes were damaged but the run survived
    node.ledger_path.write_bytes(node.ledger_path.read_bytes() + bad_event)
    repair = repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)
    assert repair.recovered == "run-maximum" and repair.entry.event == EVENT


def test_an_interrupted_repair_is_finished(node: Node) -> None:
    torn = crash_during(node, 3, keep=800)
    backup = node.ledger_path.read_bytes()
    repair = repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)
    # Undo only the last step, as a crash after the truncation would leave it:
    node.ledger_path.write_bytes(backup[:-len(torn)])
    Witness(node.witness).path.write_text(node.witness.read_text().replace('"seq": 4', '"seq": 3').replace(
        repair.entry.sealed.hash, lines(node.ledger_path)[-1]["hash"]))
    again = repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)
    assert again.evidence == repair.evidence and again.entry.repair == repair.entry.repair
    with pytest.raises(PrivacyError, match="no torn last line: nothing to repair"):
        repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)


def test_only_a_torn_line_is_repaired(node: Node, tmp_path: Path) -> None:
    crash_during(node, 3, keep=700)
    data = node.ledger_path.read_bytes().replace(b'"round":1', b'"round":7', 1)
    node.ledger_path.write_bytes(data)
    with pytest.raises(PrivacyError, match="only a torn last line can be repaired"):
        repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)
    assert node.ledger_path.read_bytes() == data
    shutil.rmtree(node.state)
    node.state.mkdir()
    with pytest.raises(PrivacyError, match="cannot be opened"):
        repair_torn_ledger(node.ledger_path, node.key)
