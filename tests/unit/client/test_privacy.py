"""The budget guard: noise planning, charge/refuse decisions, and the budget-never-exceeded property."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.client.budget import (
    BUDGET_SLACK,
    MIN_PLANNED_SIGMA,
    PLAN_MARGIN,
    PLAN_TOLERANCE,
    decide,
    epsilon_of,
    independent_epsilon_of,
    plan_noise,
)
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.common.privacy.accountant import DpEvent, steps_per_round

REQUEST = PlanRequest(model="", dp=True, epsilon=8.0, delta=1e-5, accountant="rdp", num_rounds=3, server_round=1,
                      sample_rate=0.125, steps=8, clip_norm=1.0)


def test_steps_per_round_matches_opacus_poisson_rate() -> None:
    assert steps_per_round(1000, 128, 1.0) == (1 / 8, 8)
    assert steps_per_round(100, 32, 2.0) == (1 / 4, 8)
    assert steps_per_round(10, 128, 0.1) == (1.0, 1)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("target", "q", "steps"), [(8.0, 0.125, 24), (1.0, 0.05, 300)])
def test_planned_noise_spends_the_target_from_below(accountant: str, target: float, q: float, steps: int) -> None:
    sigma = plan_noise([], target, 1e-5, DpEvent(q, 1.0, steps), accountant)
    eps = epsilon_of([DpEvent(q, sigma, steps)], 1e-5, accountant)
    assert target * (1 - 2 * PLAN_TOLERANCE) <= eps <= target


def test_planning_accounts_for_the_history() -> None:
    history = [DpEvent(0.125, 1.0, 24)]
    spent = epsilon_of(history, 1e-5, "rdp")
    sigma = plan_noise(history, 8.0, 1e-5, DpEvent(0.125, 1.0, 24), "rdp")
    total = epsilon_of([*history, DpEvent(0.125, sigma, 24)], 1e-5, "rdp")
    assert spent < total <= 8.0
    assert total > 8.0 * (1 - 2 * PLAN_TOLERANCE)


def test_generous_requests_are_floored_at_the_minimum_planned_noise() -> None:
    assert plan_noise([], 1000.0, 1e-5, DpEvent(0.125, 1.0, 8), "prv") == MIN_PLANNED_SIGMA


def test_charges_then_refuses_when_the_budget_runs_out() -> None:
    policy = NodePolicy(max_epsilon=6.0, accountant="rdp", noise_plan="as-requested")
    history: list[DpEvent | None] = []
    decisions = []
    sigma = None
    for r in (1, 2, 3):
        d = decide(policy, replace(REQUEST, server_round=r), history, sigma)
        decisions.append(d)
        if d.charged:
            history.append(d.event)
            sigma = d.event.noise_multiplier
    assert [d.charged for d in decisions] == [True, False, False]
    assert decisions[0].exhausted and decisions[1].exhausted
    assert decisions[1].reason.startswith("budget: epsilon would reach") and decisions[1].code == "BUDGET_EXHAUSTED"
    assert decisions[1].projected > 6.0 >= decisions[1].epsilon_before == decisions[0].epsilon_after


def test_spread_plan_fits_the_whole_run_into_the_remaining_budget() -> None:
    policy = NodePolicy(max_epsilon=2.0, accountant="rdp", noise_plan="spread")
    history: list[DpEvent | None] = []
    sigma = None
    for r in (1, 2, 3):
        d = decide(policy, replace(REQUEST, server_round=r), history, sigma)
        assert d.charged, d.reason
        history.append(d.event)
        sigma = d.event.noise_multiplier
    assert 2.0 * (1 - PLAN_MARGIN["rdp"]) * (1 - 2 * PLAN_TOLERANCE) <= epsilon_of(history, 1e-5, "rdp") <= 2.0
    assert independent_epsilon_of(history, 1e-5, "rdp") <= 2.0  # dp-accounting agrees the budget holds
    assert d.exhausted  # nothing left for a fourth round


def test_too_little_noise_or_too_many_steps_is_refused() -> None:
    strict = NodePolicy(max_epsilon=50.0, accountant="rdp", min_noise_multiplier=1.5)
    d = decide(strict, REQUEST, [])
    assert not d.charged and "needs noise multiplier" in d.reason and "minimum is 1.5" in d.reason
    assert d.code == "POLICY_MIN_NOISE"
    assert d.event is not None and d.event.noise_multiplier < 1.5  # what was asked is recorded
    d = decide(NodePolicy(accountant="rdp", max_steps_per_round=4), REQUEST, [])
    assert not d.charged and d.reason.startswith("policy: the plan needs 8 local steps")
    assert d.code == "POLICY_STEPS"


def test_a_budget_that_only_allows_useless_noise_is_kept() -> None:
    """Rather than train at a huge noise multiplier (an update with no utility), the node refuses and says why."""
    policy = NodePolicy(max_epsilon=4.0, accountant="rdp", max_noise_multiplier=2.0)
    spent = [DpEvent(0.125, 1.2, 24)]
    left = 4.0 - epsilon_of(spent, 1e-5, "rdp")
    assert 0 < left < 1.0
    d = decide(policy, REQUEST, spent)
    assert not d.charged and d.code == "POLICY_MAX_NOISE" and d.exhausted
    assert d.event is not None and d.event.noise_multiplier > 2.0 and "maximum is 2" in d.reason
    relaxed = decide(NodePolicy(max_epsilon=4.0, accountant="rdp", max_noise_multiplier=50.0), REQUEST, spent)
    assert relaxed.charged and relaxed.event.noise_multiplier == d.event.noise_multiplier


def test_budget_exhausted_before_the_run_is_refused_without_planning_below_zero() -> None:
    policy = NodePolicy(max_epsilon=1.0, accountant="rdp")
    spent = [DpEvent(0.125, 0.6, 200)]
    d = decide(policy, REQUEST, spent)
    assert not d.charged and d.exhausted and d.reason.startswith("budget") and d.code == "BUDGET_EXHAUSTED"


def test_non_private_training_makes_epsilon_unbounded() -> None:
    lax = NodePolicy(accountant="rdp", require_dp=False)
    d = decide(lax, replace(REQUEST, dp=False), [])
    assert d.charged and d.event is None and math.isinf(d.epsilon_after)
    later = decide(lax, REQUEST, [None])
    assert not later.charged and "unbounded" in later.reason and later.code == "BUDGET_UNBOUNDED"


schedules = st.lists(st.tuples(
    st.integers(1, 4),  # rounds in the run
    st.sampled_from([1.0, 0.25, 0.1, 0.02]),  # q
    st.integers(1, 20),  # steps per round
    st.floats(0.3, 30.0),  # requested run epsilon
), min_size=1, max_size=3)


def _never_exceeded(budget: float, plan: str, runs: list, min_noise: float) -> None:
    policy = NodePolicy(max_epsilon=budget, accountant="rdp", noise_plan=plan, min_noise_multiplier=min_noise)
    history: list[DpEvent | None] = []
    for rounds, q, steps, eps in runs:
        sigma = None
        for r in range(1, rounds + 1):
            request = replace(REQUEST, num_rounds=rounds, server_round=r, sample_rate=q, steps=steps, epsilon=eps)
            d = decide(policy, request, history, sigma)
            if d.charged:
                history.append(d.event)
                sigma = d.event.noise_multiplier
                assert min_noise <= d.event.noise_multiplier <= policy.max_noise_multiplier
            spent = epsilon_of(history, policy.delta, "rdp")
            assert spent <= budget + BUDGET_SLACK
            assert d.epsilon_after == pytest.approx(spent, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("examples", [8, pytest.param(60, marks=pytest.mark.slow)])
def test_budget_is_never_exceeded(examples: int) -> None:
    """Whatever the server asks, run after run, the charged history stays within the budget."""
    given(budget=st.floats(0.2, 12.0), plan=st.sampled_from(["spread", "as-requested"]), runs=schedules,
          min_noise=st.sampled_from([0.0, 0.7, 1.2]))(
        settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])(_never_exceeded))()
