"""fedtune-audit --server-record: a ledger shorter than, or diverging from, the server's receipts fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedtune.audit.cli import main
from fedtune.common.ledger.key import load_or_create_key, public_path
from fedtune.common.ledger.receipts import RECORD_KEY_FILE, RunRecord, write_run_record
from tests.unit.audit.ledgers import NODE_A, NODE_B, Node, charge, lines, make_node, receipt


def record_rounds(run_dir: Path, server_key: Path, *nodes: tuple[Node, str]) -> None:
    """The server's run record: a receipt, signed by the node, for every round entry each node reported."""
    key = load_or_create_key(server_key)
    record = RunRecord("run-9", "rk")
    for node, flower_id in nodes:
        for e in lines(node.ledger_path):
            if e["kind"] == "round":
                record = record.with_receipt(receipt(node, e, flower_id))
    write_run_record(run_dir, record, key)


@pytest.fixture
def federation(tmp_path: Path) -> dict:
    a = make_node(tmp_path / "a")
    for r in (1, 2, 3, 4):
        charge(a, r)
        if r == 1:
            shutil.copy(a.ledger_path, tmp_path / "a-backup.jsonl")  # an older copy of node A's ledger
    key = tmp_path / "server" / RECORD_KEY_FILE
    record_rounds(tmp_path / "results", key, (a, "17"))
    return {"a": a, "results": tmp_path / "results", "server_key": public_path(key), "root": tmp_path}


def audit(f: dict, capsys: pytest.CaptureFixture[str], *extra: str, nodes: tuple[Node, ...] = ()) -> tuple[int, str]:
    args = [str(f["a"].ledger_path), "-k", str(f["a"].public_key), "--server-record", str(f["results"]),
            "--server-key", str(f["server_key"])]
    for n in nodes:
        args += [str(n.ledger_path), "-k", str(n.public_key)]
    code = main([*args, *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_ledgers_matching_the_receipts_verify(federation: dict, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = audit(federation, capsys)
    assert code == 0, text
    assert "4 receipts of run run-9 cross-checked" in text


def test_last_line_deleted_is_caught(federation: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = federation["a"].ledger_path
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    code, text = audit(federation, capsys, "--node", NODE_A)
    assert code == 1
    assert ("line 5: missing: the ledger ends at line 4, but the server's receipt for round 4 from node 17 names "
            "line 5") in text


def test_rollback_to_an_older_backup_is_caught(federation: dict, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(federation["root"] / "a-backup.jsonl", federation["a"].ledger_path)
    code, text = audit(federation, capsys)
    assert code == 1
    for line, rnd in ((3, 2), (4, 3), (5, 4)):
        assert f"line {line}: missing: the ledger ends at line 2, but the server's receipt for round {rnd}" in text


def test_a_ledger_missing_from_the_audit_fails(federation: dict, capsys: pytest.CaptureFixture[str]) -> None:
    b = make_node(federation["root"] / "b", NODE_B)
    charge(b, 1)
    record_rounds(federation["results"], federation["root"] / "server" / RECORD_KEY_FILE, (federation["a"], "17"),
                  (b, "18"))
    code, text = audit(federation, capsys)
    assert code == 1 and "receipts from node 18" in text and "no ledger signed by that key was audited" in text
    code, text = audit(federation, capsys, nodes=(b,))
    assert code == 0, text


def test_record_signed_by_another_key_fails(federation: dict, capsys: pytest.CaptureFixture[str]) -> None:
    record_rounds(federation["results"], federation["root"] / "forger.key", (federation["a"], "17"))
    code, text = audit(federation, capsys)
    assert code == 1 and "not by the server key given" in text
