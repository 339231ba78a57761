"""The guard wired to the ledger: refusals recorded, charges before training, restarts continue the budget."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedtune.audit.fleet import audit
from fedtune.audit.ledger_audit import LedgerSpec
from fedtune.audit.policy import AuditPolicy
from fedtune.client.budget import Decision, epsilon_of
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.client.round import NodePrivacy, RunRef, _round_entry, charge_round
from fedtune.common.errors import ConfigError, PrivacyError
from fedtune.common.ledger.key import key_id
from fedtune.common.ledger.schema import event_from_json
from fedtune.common.privacy.accountant import DpEvent, accountant_record

REQUEST = PlanRequest(model="", dp=True, epsilon=8.0, delta=1e-5, accountant="prv", num_rounds=3, server_round=1,
                      sample_rate=0.25, steps=4, clip_norm=1.0)
FINGERPRINT = "ab" * 32


def entries(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "ledger.jsonl").read_text().splitlines()]


def test_plan_outside_the_policy_is_refused_and_recorded(tmp_path: Path) -> None:
    node = NodePrivacy.open(NodePolicy(dataset_id="ward-7", max_epsilon=50.0, min_noise_multiplier=1.5,
                                       max_steps_per_round=3, accountant="rdp"), tmp_path)
    too_many_steps, _ = charge_round(node, REQUEST, run=RunRef("1"), fingerprint=FINGERPRINT)
    too_little_noise, _ = charge_round(node, replace(REQUEST, steps=3), run=RunRef("1"), fingerprint=FINGERPRINT)
    assert not too_many_steps.charged and not too_little_noise.charged
    lines = entries(tmp_path)
    assert [e["decision"] for e in lines] == ["refused", "refused"]
    assert "needs 4 local steps per round; the policy allows at most 3" in lines[0]["reason"]
    assert "needs noise multiplier" in lines[1]["reason"] and "minimum is 1.5" in lines[1]["reason"]
    assert lines[1]["event"]["noise_multiplier"] < 1.5 and lines[1]["request"]["epsilon"] == 8.0
    assert all(e["epsilon"] == 0.0 and e["epsilon_round"] == 0.0 for e in lines)


def test_charges_are_durable_before_training_and_refusals_follow(tmp_path: Path) -> None:
    node = NodePrivacy.open(NodePolicy(dataset_id="ward-7", max_epsilon=6.0, noise_plan="as-requested"), tmp_path)
    first, entry = charge_round(node, REQUEST, run=RunRef("7"), fingerprint=FINGERPRINT)
    assert first.charged and entries(tmp_path)[-1] == entry.to_json()  # on disk when charge_round returns
    second, _ = charge_round(node, replace(REQUEST, server_round=2), run=RunRef("7"), fingerprint=FINGERPRINT)
    assert not second.charged and second.reason.startswith("budget")
    lines = entries(tmp_path)
    assert [e["decision"] for e in lines] == ["charged", "refused"]
    assert lines[0]["epsilon"] <= 6.0 and lines[1]["epsilon"] == lines[0]["epsilon"] < lines[1]["projected"]
    public = node.ledger.key.public_key()
    policy = AuditPolicy(6.0, 1e-5, "prv", "", "the node's policy")
    assert audit([LedgerSpec(tmp_path / "ledger.jsonl", policy=policy)], {key_id(public): public}).ok


def test_budgets_are_per_dataset_id_not_per_fingerprint(tmp_path: Path) -> None:
    """The policy's dataset-id keys the budget: changed rows (another fingerprint) do not open a new one."""
    policy = NodePolicy(dataset_id="ward-7", max_epsilon=6.0, noise_plan="as-requested", accountant="rdp")
    node = NodePrivacy.open(policy, tmp_path)
    a, _ = charge_round(node, REQUEST, run=RunRef("1"), fingerprint=FINGERPRINT)
    same, _ = charge_round(node, replace(REQUEST, server_round=2), run=RunRef("1"), fingerprint="cd" * 32)
    assert a.charged and not same.charged and same.epsilon_before == a.epsilon_after
    other = NodePrivacy.open(replace(policy, dataset_id="ward-8"), tmp_path)
    b, _ = charge_round(other, REQUEST, run=RunRef("1"), fingerprint=FINGERPRINT)
    assert b.charged and b.epsilon_before == 0.0
    assert [e["dataset"] for e in entries(tmp_path)] == ["ward-7", "ward-7", "ward-8"]


@pytest.mark.parametrize(("before", "after", "projected", "recorded"), [
    (1.5, 2.75, 2.75, {"epsilon": 2.75, "epsilon_round": 1.25, "projected": 2.75}),
    (1.5, math.inf, None, {"epsilon": None, "epsilon_round": None, "projected": None}),  # trained without DP
    (math.inf, math.inf, math.inf, {"epsilon": None, "epsilon_round": None, "projected": None}),
])
def test_the_round_entry_is_the_json_the_node_wrote_before_entries_were_typed(
        before: float, after: float, projected: float | None, recorded: dict) -> None:
    policy = NodePolicy(dataset_id="ward-7", max_epsilon=8.0, release_train_loss=True)
    event = DpEvent(0.25, 0.9, 4, 1.0)
    decision = Decision(True, "", "", event, before, after, projected, 8.0, False)
    entry = _round_entry(decision, REQUEST, policy, run=RunRef("7", "rk"), fingerprint=FINGERPRINT, rng="secrets")
    assert entry.to_json() == {  # the dict client/round.py assembled itself before, plus format and kind
        "format": "fedtune-ledger/2", "kind": "round", "run": "7", "run_key": "rk", "round": 1, "dataset": "ward-7",
        "fingerprint": FINGERPRINT, "rng": "secrets", "released": ["train-loss"], "decision": "charged", "reason": "",
        "event": {"mechanism": "subsampled-gaussian", "sampling": "poisson", "relation": "add/remove-one",
                  "sample_rate": 0.25, "noise_multiplier": 0.9, "steps": 4, "clip_norm": 1.0},
        "delta": policy.delta, "accountant": accountant_record(policy.accountant), "budget": 8.0, **recorded,
        "request": {"epsilon": 8.0, "delta": 1e-5, "num_rounds": 3, "local_steps": 4, "sample_rate": 0.25,
                    "dp": True, "dp_mode": "dp", "clip_norm": 1.0, "accountant": "prv", "model": "",
                    "max_seq_len": 0},
    }


def test_a_policy_without_dataset_id_cannot_open_a_ledger(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset-id is required"):
        NodePrivacy.open(NodePolicy(max_epsilon=1.0), tmp_path)


def test_damaged_ledger_stops_the_node(tmp_path: Path) -> None:
    node = NodePrivacy.open(NodePolicy(dataset_id="ward-7", accountant="rdp"), tmp_path)
    charge_round(node, REQUEST, run=RunRef("1"), fingerprint=FINGERPRINT)
    path = tmp_path / "ledger.jsonl"
    path.write_text(path.read_text().replace('"round":1', '"round":2'))
    with pytest.raises(PrivacyError, match="line 1: entry hash does not match"):
        charge_round(node, replace(REQUEST, server_round=2), run=RunRef("1"), fingerprint=FINGERPRINT)


CHILD = """
import sys, time
from pathlib import Path
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.client.round import NodePrivacy, RunRef, charge_round
request = PlanRequest(model="", dp=True, epsilon=8.0, delta=1e-5, accountant="prv", num_rounds=3,
                      server_round=int(sys.argv[2]), sample_rate=0.25, steps=4, clip_norm=1.0)
node = NodePrivacy.open(NodePolicy(dataset_id="ward-7", max_epsilon=8.0), Path(sys.argv[1]))
decision, _ = charge_round(node, request, run=RunRef(sys.argv[3]), fingerprint="ab" * 32)
print("charged" if decision.charged else "refused", flush=True)
time.sleep(600)  # "training": the test kills the process here
"""


def _charge_then_die(state: Path, server_round: int, run_id: str) -> None:
    """A client process charges a round, starts 'training', and is killed (SIGKILL) mid-round."""
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(state), str(server_round), run_id],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "charged"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def test_killed_client_resumes_from_its_ledger(tmp_path: Path) -> None:
    """Restart: round 2 after a kill continues the run's noise and the dataset's epsilon, not from zero."""
    start = time.monotonic()
    _charge_then_die(tmp_path, 1, run_id="42")
    _charge_then_die(tmp_path, 2, run_id="42")
    node = NodePrivacy.open(NodePolicy(dataset_id="ward-7", max_epsilon=8.0), tmp_path)  # the restarted process
    third, _ = charge_round(node, replace(REQUEST, server_round=3), run=RunRef("42"), fingerprint=FINGERPRINT)
    lines = entries(tmp_path)
    assert [e["decision"] for e in lines] == ["charged"] * 3 and third.charged
    assert {e["rng"] for e in lines} == {"secrets"} and {e["dataset"] for e in lines} == {"ward-7"}
    assert len({e["event"]["noise_multiplier"] for e in lines}) == 1  # planned once, at round 1
    assert lines[0]["epsilon"] < lines[1]["epsilon"] < lines[2]["epsilon"] <= 8.0
    assert third.epsilon_before == pytest.approx(lines[1]["epsilon"])
    replay = epsilon_of([event_from_json(e["event"]) for e in lines], 1e-5, "prv")
    assert replay == pytest.approx(lines[2]["epsilon"], rel=1e-9)
    # a new run plans from what is left (~0.015 here): noise beyond the policy's maximum, so it is refused
    nxt, _ = charge_round(node, replace(REQUEST, server_round=1), run=RunRef("43"), fingerprint=FINGERPRINT)
    assert not nxt.charged and nxt.code == "POLICY_MAX_NOISE" and nxt.epsilon_after == nxt.epsilon_before
    lax = NodePrivacy(replace(node.policy, max_noise_multiplier=50.0), node.ledger)
    nxt, _ = charge_round(lax, replace(REQUEST, server_round=1), run=RunRef("43"), fingerprint=FINGERPRINT)
    assert nxt.epsilon_before == pytest.approx(lines[2]["epsilon"]) and nxt.epsilon_after <= 8.0
    assert nxt.event is not None and nxt.event.noise_multiplier > 10
    assert time.monotonic() - start < 120


def test_resumed_server_run_keeps_its_noise_plan(tmp_path: Path) -> None:
    node = NodePrivacy.open(NodePolicy(dataset_id="ward-7", max_epsilon=8.0, accountant="rdp"), tmp_path)
    charge_round(node, REQUEST, run=RunRef("1", run_key="k"), fingerprint=FINGERPRINT)
    resumed, _ = charge_round(node, replace(REQUEST, server_round=2), run=RunRef("2", run_key="k", resumed=True),
                              fingerprint=FINGERPRINT)
    fresh, _ = charge_round(node, replace(REQUEST, server_round=1), run=RunRef("3", run_key="k"),
                            fingerprint=FINGERPRINT)
    lines = entries(tmp_path)
    assert [e["decision"] for e in lines] == ["charged"] * 3
    assert resumed.charged and lines[1]["event"]["noise_multiplier"] == lines[0]["event"]["noise_multiplier"]
    assert resumed.epsilon_before == pytest.approx(lines[0]["epsilon"])
    # a new run with the same settings is not a resumed one: it plans again, from the budget that is left
    # (8 - ~6.75 here, so more noise), and is charged
    assert fresh.charged and fresh.epsilon_before == pytest.approx(lines[1]["epsilon"])
    assert lines[2]["event"]["noise_multiplier"] > lines[0]["event"]["noise_multiplier"]
    assert lines[2]["epsilon"] <= 8.0
