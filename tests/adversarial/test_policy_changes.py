"""Policy changes fedtune-audit fails with or without --policy: a raised budget, a new dataset-id, rows charged
under two dataset ids. Each ledger is written and signed by the node itself (no forgery), so that the change
tested is its only problem.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fedtune.audit.cli import main
from tests.unit.audit.ledgers import DATASET, NODE_A, Node, charge, make_node

A, B = "a" * 64, "b" * 64  # data fingerprints


def audit_json(node: Node, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[str], list[str]]:
    code = main([str(node.ledger_path), "--public-key", str(node.public_key), "--json", *extra])
    ledger = json.loads(capsys.readouterr().out)["ledgers"][0]
    return (code, [f"line {p['line']}: {p['message']}" for p in ledger["problems"]],
            [f"line {p['line']}: {p['message']}" for p in ledger["notices"]])


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return make_node(tmp_path / "node")


def test_a_lowered_budget_passes(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    charge(node, 1, fingerprint=A)
    charge(node, 2, fingerprint=A, header=replace(node.header, budget=7.0))  # line 3: policy entry, budget 7
    assert audit_json(node, capsys, "--node", NODE_A)[:2] == (0, [])


@pytest.mark.parametrize("with_policy", [False, True])
def test_a_policy_entry_that_raises_the_budget_fails(node: Node, capsys: pytest.CaptureFixture[str],
                                                     with_policy: bool) -> None:
    charge(node, 1, fingerprint=A)
    charge(node, 2, fingerprint=A, header=replace(node.header, budget=7.0))  # line 3: lowered to 7
    charge(node, 3, fingerprint=A, header=replace(node.header, budget=12.0))  # line 5: raised to 12
    extra = ["--policy", str(node.policy_file(**{"max-epsilon": 12.0}))] if with_policy else ["--node", NODE_A]
    code, problems, _ = audit_json(node, capsys, *extra)
    raised = ("line 5: the policy entry raises the budget from 7 (the policy entry (line 3)) to 12: a dataset's "
              "budget never grows (what was spent still counts against the old one)")
    assert code == 1
    if with_policy:  # every entry is also held to the file's budget: lines 2 and 4 record 8 and 7, not 12
        assert raised in problems and [p.split(":")[0] for p in problems] == ["line 2", "line 4", "line 5"]
    else:
        assert problems == [raised]


@pytest.mark.parametrize("with_policy", [False, True])
def test_a_policy_entry_that_changes_the_dataset_id_fails(node: Node, capsys: pytest.CaptureFixture[str],
                                                          with_policy: bool) -> None:
    charge(node, 1, fingerprint=A)
    charge(node, 2, fingerprint=B, header=replace(node.header, dataset="ward-7-notes-v2"))  # line 3: policy entry
    extra = ["--policy", str(node.policy_file(**{"dataset-id": ""}))] if with_policy else ["--node", NODE_A]
    code, problems, _ = audit_json(node, capsys, *extra)
    assert code == 1
    assert problems == [f"line 3: the policy entry changes the dataset-id from {DATASET!r} (the header (line 1)) "
                        "to 'ward-7-notes-v2': a new dataset-id opens a fresh budget, possibly for the same rows "
                        "(keep the dataset-id; train other data under a ledger of its own)"]


def test_the_same_rows_under_two_dataset_ids_fail(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """A ledger without a header (audited against --policy without a dataset-id): rows charged to two budgets."""
    other = replace(node.header, dataset="ward-8")
    for r, header, fingerprint in ((1, node.header, A), (2, other, B), (3, other, A), (4, other, A)):
        charge(node, r, fingerprint=fingerprint, header=header, bound=False)
    code, problems, notices = audit_json(node, capsys, "--policy", str(node.policy_file(**{"dataset-id": ""})))
    assert code == 1
    assert problems == [f"line 3: the data of line 1 (fingerprint {A[:16]}...), charged there to dataset {DATASET!r}, "
                        "is charged here to dataset 'ward-8': the same rows under two budgets"]
    assert notices[0].startswith("line 1: no signed header")


def test_the_same_rows_under_a_new_dataset_id_after_a_policy_change_fail_twice(
        node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    charge(node, 1, fingerprint=A)
    charge(node, 2, fingerprint=A, header=replace(node.header, dataset="ward-8"))
    code, problems, _ = audit_json(node, capsys, "--node", NODE_A)
    assert code == 1 and [p.split(":")[0] for p in problems] == ["line 3", "line 4"]
    assert "changes the dataset-id" in problems[0] and "the same rows under two budgets" in problems[1]
