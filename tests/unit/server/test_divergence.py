"""The divergence guard and the majority-class baseline (pure logic)."""

from __future__ import annotations

import math

import pytest

from fedtune.common.tasks.classify.baseline import MajorityBaseline, majority_baseline, quality_warnings
from fedtune.server.divergence import DivergenceGuard, diverged_reason, spent_epsilon
from fedtune.server.outcome import NodeOutcome

TRAINED = NodeOutcome(1, "trained", "")
FAILED = NodeOutcome(2, "error", "TRAIN")


def test_a_loss_below_the_factor_passes_and_one_above_stops_naming_both_values():
    guard = DivergenceGuard(3.0)
    assert guard.check(0, 0.6931) is None  # round 0 sets the reference
    assert guard.check(1, 2.0, [TRAINED]) is None  # 2.89 x: still within 3 x
    why = guard.check(2, 2.51, [TRAINED])
    assert why is not None and "2.51" in why and "3 x its round-0 value 0.6931" in why and "round 2" in why


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_non_finite_loss_always_stops(loss):
    guard = DivergenceGuard(0.0)  # ratio check off
    assert guard.check(0, 0.69) is None
    assert guard.check(1, 1e9, [TRAINED]) is None  # factor 0: only non-finite losses count
    assert "held-out loss after round 2 is" in (guard.check(2, loss, [TRAINED]) or "")


def test_every_node_failing_its_training_stops_but_one_good_node_does_not():
    guard = DivergenceGuard(3.0, reference_loss=0.69)
    assert guard.check(1, 0.69, [FAILED, TRAINED]) is None
    assert guard.check(1, 0.69, [NodeOutcome(3, "error", "DATA_MISSING")]) is None
    why = guard.check(2, 0.69, [FAILED, FAILED])
    assert why is not None and "(2) reported that its local training went non-finite (code TRAIN)" in why


def test_a_resumed_guard_takes_round_0_from_the_checkpointed_lines():
    guard = DivergenceGuard.resumed(3.0, [{"round": 0, "loss": 0.5}, {"round": 1, "loss": 0.6}])
    assert guard.reference == 0.5 and guard.check(2, 1.6) is not None
    assert DivergenceGuard.resumed(3.0, []).reference is None


def test_the_message_says_what_the_ledgers_still_hold():
    lines = [{"clients": [{"epsilon": 5.5}, {"epsilon": 5.4}]}, {"clients": [{"epsilon": 6.9}]}]
    private = diverged_reason("the loss rose", kept_round=1, private=True, epsilon=spent_epsilon(lines))
    assert "adapter of round 1" in private and "stays charged in their ledgers" in private and "6.9" in private
    public = diverged_reason("the loss rose", kept_round=0, private=False, epsilon=math.inf)
    assert "non-private (unbounded epsilon)" in public and "nonprivate-learning-rate" in public


def test_majority_baseline_and_the_warning_when_a_model_is_no_better():
    baseline = majority_baseline([1, 1, 0, 1, 2, 1, 1, 0], ["ham", "spam", "other"])
    assert baseline == MajorityBaseline("spam", 5 / 8)
    assert baseline.fields() == {"majority-label": "spam", "majority-accuracy": 0.625}
    assert quality_warnings(0.70, baseline) == []
    warning = quality_warnings(0.588, baseline)
    assert len(warning) == 1 and "0.5880 is not above the majority-class accuracy 0.6250" in warning[0]
    assert "'spam'" in warning[0]
    assert quality_warnings(None, baseline) == []
