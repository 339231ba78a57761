"""fedtune-audit with several --server-record: a receipt counts against a node only when the node signed it.

Node A's ledger: header; run 9 charges rounds 1 and 2 (lines 2-3); run 10 charges round 3 (line 4) and
refuses round 4 (line 5). Node B: header; run 10 charges round 1. Run 9's record is signed by server key 1,
run 10's by server key 2 (a server that changed its record key between runs).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.audit.cli import main
from fedtune.common.ledger.chain import canonical, sign
from fedtune.common.ledger.key import key_id, load_or_create_key, public_path
from fedtune.common.ledger.receipts import (
    RECORD_FILE,
    RECORD_FORMAT,
    RECORD_FORMAT_V1,
    Receipt,
    RunRecord,
    write_run_record,
)
from tests.unit.audit.ledgers import NODE_B, charge, make_node, receipt


@pytest.fixture
def fed(tmp_path: Path) -> dict:
    a, b = make_node(tmp_path / "a"), make_node(tmp_path / "b", NODE_B)
    rounds = [charge(a, r, run="9" if r < 3 else "10") for r in (1, 2, 3, 4)]
    b1 = charge(b, 1, run="10")
    keys = [load_or_create_key(tmp_path / "server" / f"record-{i}.key") for i in (1, 2)]
    f = {"a": a, "b": b, "rounds": rounds, "b1": b1, "keys": keys, "root": tmp_path,
         "run9": tmp_path / "run-9", "run10": tmp_path / "run-10"}
    record(f, "run9", 0, [receipt(a, e, run="9") for e in rounds[:2]])
    record(f, "run10", 1, [*(receipt(a, e, run="10") for e in rounds[2:]), receipt(b, b1, "18", run="10")])
    return f


def record(f: dict, run: str, key: int, receipts: list[Receipt]) -> None:
    write_run_record(f[run], RunRecord(run[3:], "rk", tuple(receipts)), f["keys"][key])


def raw_record(f: dict, run: str, fmt: str, receipts: list[dict]) -> None:
    """A record written byte by byte (what a writer of this version refuses to produce), signed by key 2."""
    key = f["keys"][1]
    data = sign({"format": fmt, "run": run[3:], "run_key": "rk", "receipts": receipts,
                 "key": key_id(key.public_key())}, key)
    (f[run] / RECORD_FILE).write_bytes(canonical(data) + b"\n")


def audit(f: dict, capsys: pytest.CaptureFixture[str], *runs: str) -> tuple[int, str]:
    args = [str(f["a"].ledger_path), str(f["b"].ledger_path), "-k", str(f["a"].public_key), "-k",
            str(f["b"].public_key)]
    for run in runs or ("run9", "run10"):
        args += ["--server-record", str(f[run])]
    for i in (1, 2):
        args += ["--server-key", str(public_path(f["root"] / "server" / f"record-{i}.key"))]
    code = main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def line_with(text: str, *parts: str) -> bool:
    return any(all(p in line for p in parts) for line in text.splitlines())


def test_several_runs_signed_by_their_nodes_and_servers_verify(fed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = audit(fed, capsys)
    assert code == 0, text
    assert "2 receipts of run 9 cross-checked" in text and "3 receipts of run 10 cross-checked" in text


@pytest.mark.parametrize(("forge", "why"), [
    # the server fabricates a receipt under its own key: the ledger has no line 9
    (lambda f: replace(receipt(f["a"], f["rounds"][2], run="10"), seq=9, node_sig=sign_other(f, seq=9)),
     "the node's signature does not verify"),
    # the node signed round 3; the server records round 4
    (lambda f: replace(receipt(f["a"], f["rounds"][2], run="10"), round=4), "the node's signature does not verify"),
    # the node signed run 10; the server files it under run 11
    (lambda f: replace(receipt(f["a"], f["rounds"][2], run="10"), run="11"), "the node's signature does not verify"),
])
def test_a_receipt_the_node_did_not_sign_fails_the_record_not_the_node(
        fed: dict, capsys: pytest.CaptureFixture[str], forge, why: str) -> None:
    record(fed, "run10", 1, [forge(fed), receipt(fed["b"], fed["b1"], "18", run="10")])
    code, text = audit(fed, capsys)
    assert code == 1
    assert line_with(text, str(fed["run10"]), "from node 17", "was not signed by the node", why), text
    assert "missing:" not in text and "differs from" not in text  # nothing held against node A's ledger


def sign_other(f: dict, **changes: object) -> str:
    from fedtune.common.ledger.receipts import sign_receipt

    values = {"run": "10", "round": 3, "seq": 4, "head": f["rounds"][2]["hash"], "status": "trained"} | changes
    return sign_receipt(ed25519.Ed25519PrivateKey.generate(), **values)


@pytest.mark.parametrize(("sig", "message"), [
    ("", "it carries no node signature"),
    ("abc", "field 'node_sig' must be the base64 of a 64-byte signature"),
])
def test_a_missing_or_malformed_node_signature_fails(fed: dict, capsys: pytest.CaptureFixture[str], sig: str,
                                                     message: str) -> None:
    good = receipt(fed["a"], fed["rounds"][2], run="10")
    raw_record(fed, "run10", RECORD_FORMAT, [good.fields() | {"node_sig": sig}])
    code, text = audit(fed, capsys)
    assert code == 1 and line_with(text, str(fed["run10"]), "round 3", "node '17'" if sig else "node 17", message), text


def test_a_coalesced_refusal_cites_an_earlier_refusal(fed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Round 5 of run 11 answered with the refusal the node wrote for round 4 of run 10 (line 5)."""
    record(fed, "run10", 1, [receipt(fed["a"], fed["rounds"][3], run="11", server_round=5),
                             receipt(fed["b"], fed["b1"], "18", run="10")])
    code, text = audit(fed, capsys)
    assert code == 0, text


def test_a_record_signed_by_no_server_key_given_fails(fed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    forger = load_or_create_key(fed["root"] / "forger.key")
    write_run_record(fed["run9"], RunRecord("9", "rk", (receipt(fed["a"], fed["rounds"][0], run="9"),)), forger)
    code, text = audit(fed, capsys)
    assert code == 1 and line_with(text, str(fed["run9"]), "not by the server key given"), text


def test_format_1_receipts_are_notices_not_held_against_the_node(fed: dict,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    e = fed["rounds"][2]
    old = {"round": 3, "node": "17", "ledger_key": e["key"], "seq": 7, "head": e["hash"], "status": "trained"}
    raw_record(fed, "run10", RECORD_FORMAT_V1, [old])  # names a line node A's ledger does not have
    code, text = audit(fed, capsys)
    assert code == 0, text
    assert line_with(text, str(fed["run10"]), "fedtune-run-record/1", "carry no node signature")
    assert line_with(text, "line 7: missing", "an unsigned receipt (format 1), not held against the node")
