"""The run's dp-mode on the node: the policy decides, the ledger charges non-private rounds as unbounded, and the
trainer gets noise 0 (clip-only) or the non-private optimiser (off)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from fedtune.client.budget import decide
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.client.round import NodePrivacy, RunRef, charge_round, training_mode
from fedtune.client.trainer import DpParams
from fedtune.common.settings import RunSettings
from fedtune.common.wire.contract import RoundRequest

REQUEST = PlanRequest(model="", dp=True, epsilon=8.0, delta=1e-5, accountant="rdp", num_rounds=3, server_round=1,
                      sample_rate=0.25, steps=4, clip_norm=1.0)


def _round_request(**config: object) -> RoundRequest:
    s = RunSettings.from_config(dict(config))
    return RoundRequest(1, "", 0, ("neg", "pos"), s.model, s.lora, s.plan, s.privacy)


@pytest.mark.parametrize("mode", ["clip-only", "off"])
def test_a_node_that_requires_dp_refuses_both_non_private_modes(mode):
    d = decide(NodePolicy(accountant="rdp"), replace(REQUEST, dp=False, dp_mode=mode), [])
    assert not d.charged and d.code == "POLICY_DP_REQUIRED" and f"dp-mode {mode}" in d.reason


def test_a_clip_only_round_is_charged_as_unbounded_epsilon_and_recorded_as_clip_only(tmp_path: Path):
    node = NodePrivacy.open(NodePolicy(dataset_id="ward-7", require_dp=False), tmp_path)
    decision, entry = charge_round(node, replace(REQUEST, dp=False, dp_mode="clip-only"), run=RunRef("1"),
                                   fingerprint="ab" * 32)
    assert decision.charged and decision.event is None and math.isinf(decision.epsilon_after)
    line = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[-1])
    assert line == entry.to_json() and line["request"]["dp_mode"] == "clip-only" and line["request"]["dp"] is False
    assert line["epsilon"] is None  # unbounded: JSON has no inf
    later, _ = charge_round(node, REQUEST, run=RunRef("2"), fingerprint="ab" * 32)
    assert not later.charged and later.code == "BUDGET_UNBOUNDED"  # a dataset trained without noise stays so


def test_training_mode_per_dp_mode():
    lax = NodePolicy(accountant="rdp", require_dp=False)
    private = decide(lax, REQUEST, [])
    dp, opt = training_mode(private, _round_request())
    assert dp == DpParams(private.event.noise_multiplier, 1.0) and (opt.kind, opt.learning_rate) == ("sgd", 2.0)

    unpaid = decide(lax, replace(REQUEST, dp=False), [])
    dp, opt = training_mode(unpaid, _round_request(**{"dp-mode": "clip-only", "clip-norm": 0.5}))
    assert dp == DpParams(0.0, 0.5) and (opt.kind, opt.learning_rate, opt.lora_lr_scale) == ("sgd", 2.0, 0.1)

    dp, opt = training_mode(unpaid, _round_request(**{"dp-mode": "off", "nonprivate-learning-rate": 1e-3}))
    assert dp is None and (opt.kind, opt.learning_rate, opt.lora_lr_scale) == ("adamw", 1e-3, 0.2)
