"""Node-signed receipts: what a node's reply signature covers, format-1 records, and the refusal cross-check."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.chain import canonical, sign
from fedtune.common.ledger.key import key_id
from fedtune.common.ledger.reader import read
from fedtune.common.ledger.receipts import (
    RECORD_FILE,
    RECORD_FORMAT,
    RECORD_FORMAT_V1,
    RunRecord,
    cross_check,
    read_run_record,
    receipt_signature_problem,
    sign_receipt,
    write_run_record,
)
from tests.unit.audit.ledgers import Node, four_rounds, make_node, receipt

VALUES = {"run": "12", "round": 3, "seq": 4, "head": "ab" * 32, "status": "trained"}


def test_a_signature_covers_exactly_run_round_seq_head_and_status() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    sig = sign_receipt(key, **VALUES)
    assert len(sig) == 88 and receipt_signature_problem(key.public_key(), sig, **VALUES) is None
    for name, other in (("run", "13"), ("round", 4), ("seq", 5), ("head", "cd" * 32), ("status", "refused")):
        problem = receipt_signature_problem(key.public_key(), sig, **(VALUES | {name: other}))
        assert problem is not None and "does not verify" in problem
    stranger = ed25519.Ed25519PrivateKey.generate().public_key()
    assert "does not verify" in str(receipt_signature_problem(stranger, sig, **VALUES))
    assert receipt_signature_problem(key.public_key(), "", **VALUES) == "it carries no node signature"
    assert "base64 of a 64-byte signature" in str(receipt_signature_problem(key.public_key(), "abc", **VALUES))
    with pytest.raises(PrivacyError, match="a node signs only trained or refused replies, got status 'rejected'"):
        sign_receipt(key, **(VALUES | {"status": "rejected"}))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    node = make_node(tmp_path / "node")
    four_rounds(node)  # header; rounds 1-3 charged (lines 2-4); round 4 refused (line 5)
    return node


def test_a_rejected_reply_is_checked_against_the_trained_signature(node: Node) -> None:
    entry = read(node.ledger_path).entries[1][1]
    rejected = receipt(node, entry, status="rejected")  # the server rejected the update; the node said trained
    assert rejected.node_signature_problem(node.key.public_key()) is None
    assert cross_check(entry["key"], read(node.ledger_path).entries, [rejected]) == []


def test_refusals_may_cite_an_earlier_refusal_but_charges_must_match_their_round(node: Node) -> None:
    entries = read(node.ledger_path).entries
    key = entries[0][1]["key"]
    refusal, charge = entries[4][1], entries[1][1]
    coalesced = receipt(node, refusal, run="10", server_round=7)  # a later run's round 7 answered with line 5
    assert coalesced.node_signature_problem(node.key.public_key()) is None
    assert cross_check(key, entries, [coalesced]) == []
    problems = [str(p) for p in cross_check(key, entries, [
        receipt(node, charge, status="refused"),  # a refusal citing a charge
        receipt(node, charge, server_round=2),  # a charge cited for another round
        receipt(node, entries[0][1], status="refused", server_round=5),  # a refusal citing the header
    ], "RUN")]
    assert problems == [
        "line 2: says round 1 charged, but the server's receipt for round 1 from node 17 says refused "
        "(receipt in RUN)",
        "line 2: says round 1 charged, but the server's receipt for round 2 from node 17 says trained "
        "(receipt in RUN)",
        "line 1: is a header entry, but the server's receipt for round 5 from node 17 says refused (receipt in RUN)"]


def test_a_format_2_record_holds_only_receipts_with_run_and_node_signature(node: Node, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    entry = read(node.ledger_path).entries[1][1]
    unsigned = replace(receipt(node, entry), node_sig="")
    with pytest.raises(PrivacyError, match="needs the run and the node's signature on every receipt; round 1"):
        write_run_record(tmp_path / "r", RunRecord("9", "rk", (unsigned,)), key)
    write_run_record(tmp_path / "r", RunRecord("9", "rk", (receipt(node, entry),)), key)
    check = read_run_record(tmp_path / "r", [ed25519.Ed25519PrivateKey.generate().public_key(), key.public_key()])
    assert check.problems == [] and check.record is not None and check.record.format == RECORD_FORMAT


def test_a_format_1_record_still_reads(node: Node, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    entry = read(node.ledger_path).entries[1][1]
    old = {"round": 1, "node": "17", "ledger_key": entry["key"], "seq": 2, "head": entry["hash"], "status": "trained"}
    data = sign({"format": RECORD_FORMAT_V1, "run": "9", "run_key": "rk", "receipts": [old],
                 "key": key_id(key.public_key())}, key)
    (tmp_path / RECORD_FILE).write_bytes(canonical(data) + b"\n")
    check = read_run_record(tmp_path, key.public_key())
    assert check.problems == [] and check.record is not None and check.record.format == RECORD_FORMAT_V1
    (got,) = check.record.receipts
    assert (got.run, got.node_sig, got.signed) == ("", "", False)
    data = sign({**data, "receipts": [old | {"run": "9"}]}, key)  # format 1 with a field of format 2
    (tmp_path / RECORD_FILE).write_bytes(canonical(data) + b"\n")
    assert "receipt 1 (round 1, node '17'): must have exactly the fields round, node, ledger_key, seq, head, " \
           "status (fedtune-run-record/1)" in read_run_record(tmp_path, key.public_key()).problems
