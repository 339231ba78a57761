"""Receipts and the server's signed run record: written, read back, verified, and cross-checked with ledgers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.key import load_or_create_key
from fedtune.common.ledger.reader import read
from fedtune.common.ledger.receipts import (
    RECORD_FILE,
    RECORD_KEY_FILE,
    Receipt,
    RunRecord,
    cross_check,
    read_run_record,
    write_run_record,
)
from tests.unit.audit.ledgers import Node, flip_signature_bits, four_rounds, lines, make_node, receipt


def receipts_for(node: Node, entries: list[dict], flower_id: str = "17") -> list[Receipt]:
    """What the server records from the node's replies: one receipt per round entry, signed by the node."""
    return [receipt(node, e, flower_id) for e in entries]


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[Path, list[Receipt]]:
    node = make_node(tmp_path / "node")
    return node.ledger_path, receipts_for(node, four_rounds(node))


def test_record_round_trip_and_signature(tmp_path: Path, ledger: tuple[Path, list[Receipt]]) -> None:
    key = load_or_create_key(tmp_path / "server" / RECORD_KEY_FILE)
    record = RunRecord("run-1", "rk")
    for r in ledger[1]:
        record = record.with_receipt(r)
    path = write_run_record(tmp_path / "results", record, key)
    assert path.name == RECORD_FILE
    check = read_run_record(tmp_path / "results", key.public_key())
    assert check.problems == [] and check.record is not None and check.record.receipts == record.receipts
    unsigned = read_run_record(tmp_path / "results", None)
    assert unsigned.problems == [] and "signature not checked" in unsigned.notices[0]
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    assert "not by the server key given" in read_run_record(tmp_path / "results", other).problems[0]


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_changed_record_fails(tmp_path: Path, ledger: tuple[Path, list[Receipt]]) -> None:
    key = load_or_create_key(tmp_path / RECORD_KEY_FILE)
    path = write_run_record(tmp_path / "r", RunRecord("run-1", "rk", tuple(ledger[1])), key)
    original = path.read_text()
    _edit(path, lambda d: d["receipts"][3].update(seq=4))
    assert "hash does not match" in read_run_record(path, key.public_key()).problems[0]
    path.write_text(original)
    _edit(path, lambda d: d.update(sig=flip_signature_bits(d["sig"])))
    assert "not in canonical base64" in read_run_record(path, key.public_key()).problems[0]
    for text, message in (("{", "not valid JSON"), ('{"receipts": NaN}', "field 'receipts': NaN"),
                          ("[]", "not a JSON object")):
        path.write_text(text)
        assert message in read_run_record(path, key.public_key()).problems[0]
    path.write_text(original)
    _edit(path, lambda d: d["receipts"][0].update(seq=True))
    assert "receipt 1 (round 1, node '17'): field 'seq' must be an integer" in "\n".join(
        read_run_record(path, key.public_key()).problems)


def test_cross_check_names_round_node_and_line(ledger: tuple[Path, list[Receipt]]) -> None:
    path, receipts = ledger
    key = receipts[0].ledger_key
    assert cross_check(key, read(path).entries, receipts) == []
    short = read(path).entries[:3]  # rolled back: header + rounds 1-2
    problems = [str(p) for p in cross_check(key, short, receipts)]
    assert problems == [
        "line 4: missing: the ledger ends at line 3, but the server's receipt for round 3 from node 17 names line 4 "
        "(the ledger was truncated or rolled back to an older copy)",
        "line 5: missing: the ledger ends at line 3, but the server's receipt for round 4 from node 17 names line 5 "
        "(the ledger was truncated or rolled back to an older copy)"]
    diverged = [(n, e | {"hash": "0" * 64}) if n == 3 else (n, e) for n, e in read(path).entries]
    assert "line 3: differs from the server's receipt for round 2 from node 17" in str(
        cross_check(key, diverged, receipts)[0])
    relabelled = [replace(r, status="refused") for r in receipts[:1]]
    problem = str(cross_check(key, read(path).entries, relabelled)[0])
    assert problem == "line 2: says round 1 charged, but the server's receipt for round 1 from node 17 says refused"
    assert cross_check("ed25519:" + "0" * 32, short, receipts) == []  # another node's receipts


def test_receipts_are_validated() -> None:
    with pytest.raises(PrivacyError, match="field 'head' must be 64 hex digits"):
        Receipt(1, "17", "ed25519:" + "a" * 32, 2, "xyz", "trained")
    with pytest.raises(PrivacyError, match="field 'status' must be one of"):
        Receipt(1, "17", "ed25519:" + "a" * 32, 2, "a" * 64, "maybe")
    with pytest.raises(PrivacyError, match="field 'seq' must be an integer >= 1"):
        Receipt(1, "17", "ed25519:" + "a" * 32, 0, "a" * 64, "trained")


def test_lines_helper_reads_what_was_written(ledger: tuple[Path, list[Receipt]]) -> None:
    assert [e["seq"] for e in lines(ledger[0])] == [1, 2, 3, 4, 5]
