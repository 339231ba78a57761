"""A ledger written by the previous release (before entries carried a nonce and replies a node signature) still
verifies, audits clean, and today's node continues it with the budget it had left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedtune.audit.cli import main as audit_main
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.client.round import NodePrivacy, RunRef, charge_round

# Written by fedtune at commit a2eba35 (the release before): a header and 4 rounds (3 charged, then refused at
# epsilon 7.9945 of 8). The test key signs nothing else.
HERE = Path(__file__).parent / "previous_release"
NODE = "simulation:client-0"
REQUEST = PlanRequest(model="", dp=True, epsilon=8.0, delta=1e-5, accountant="prv", num_rounds=3, server_round=1,
                      sample_rate=0.125, steps=8, clip_norm=1.0)


def _audit(ledger: Path, capsys) -> tuple[int, str]:  # noqa: ANN001
    code = audit_main([str(ledger), "--public-key", str(HERE / "ledger-signing.pub"), "--node", NODE])
    return code, capsys.readouterr().out


def test_a_ledger_of_the_previous_release_audits_clean(capsys) -> None:
    assert b'"nonce"' not in (HERE / "ledger.jsonl").read_bytes()  # it really predates the nonce
    code, out = _audit(HERE / "ledger.jsonl", capsys)
    assert code == 0, out
    assert "all ledgers verified" in out and "7.9945" in out  # its own epsilon, replayed


def test_todays_node_continues_it_and_the_budget_carries_over(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    shutil.copytree(HERE, state)
    (state / "ledger-signing.key").chmod(0o600)  # git checks files out 0644; the node insists on a private key
    policy = NodePolicy(max_epsilon=8.0, dataset_id="old-ward", accountant="prv")
    node = NodePrivacy.open(policy, state, node=NODE)
    decision, entry = charge_round(node, REQUEST, run=RunRef("new-run"), fingerprint="cd" * 32)
    assert not decision.charged and decision.exhausted and decision.epsilon_before > 7.99  # the old rounds count
    assert entry.sealed.seq == 6 and len(str(entry.sealed.nonce)) == 64  # appended in today's form
    lines = [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]
    assert [e.get("nonce") is not None for e in lines] == [False] * 5 + [True]
    code, out = _audit(state / "ledger.jsonl", capsys)
    assert code == 0, out
