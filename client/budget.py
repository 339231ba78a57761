"""The node's budget guard: plan noise, project epsilon, decide charge or refuse (pure logic).

Mechanism (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each
DP-SGD step samples every example independently with probability q (Poisson
sampling), clips per-example gradients to norm C and adds N(0, sigma^2 C^2 I) to
their sum. The dataset's privacy loss is the composition of every step it ever
took, across rounds, runs and restarts: the charged events of its ledger,
replayed by Opacus' PRV (Gopi et al. 2021) or RDP (Mironov 2017) accountant.

Noise is planned once per run, at the node's first round of it, from the
remaining budget and the run's remaining rounds x local steps; :func:`decide`
then charges each round only if the projected cumulative epsilon stays within
the budget. Nothing here touches disk or Flower: ``client/round.py`` wires it to
the ledger (charge written and fsync'd before training).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.common.errors import PrivacyError
from fedtune.common.privacy.accountant import (
    COUNTERPART,
    DpEvent,
    dp_accounting_epsilon,
    opacus_epsilon,
    rdp_upper_bound,
)

History = Sequence[DpEvent | None]  # the dataset's charged rounds; None = a round trained without DP

# The planner never picks sigma below this: epsilon there is in the tens to hundreds, and the PRV
# accountant needs GBs of memory (sigma 0.2: 1.7 GB, 27 s; 0.1: killed for memory).
MIN_PLANNED_SIGMA = 0.5
MAX_PLANNED_SIGMA = 50.0  # more noise than this drowns any update: treat the budget as exhausted
PLAN_TOLERANCE = 0.005  # planned epsilon is within 0.5% of its target, from below
# The budget must hold under the independent accountant too (fedtune-audit replays both). dp-accounting's RDP
# sits up to ~0.2% above Opacus' RDP; PLD sits below Opacus' PRV (which reports the top of its estimate).
PLAN_MARGIN = {"prv": 0.0, "rdp": 0.01}
INDEPENDENT_CHECK_ZONE = 0.03  # near the budget, the projection is checked with dp-accounting as well
BRACKET_TOLERANCE = 0.02  # RDP only brackets the search: 2% is enough
BUDGET_SLACK = 1e-9  # accountant round-off allowed when comparing a projection with the budget


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """Cumulative epsilon of the history (inf once any round trained without DP)."""
    if any(e is None for e in history):
        return math.inf
    return opacus_epsilon([e for e in history if e is not None], delta, accountant)


def independent_epsilon_of(history: History, delta: float, accountant: str) -> float:
    """The same history under Google dp-accounting's counterpart accountant (the auditor's second opinion)."""
    if any(e is None for e in history):
        return math.inf
    return dp_accounting_epsilon([e for e in history if e is not None], delta, COUNTERPART[accountant])


def _bisect(epsilon_at: Callable[[float], float], target: float, lo: float, hi: float, tolerance: float) -> float:
    """Smallest sigma in (lo, hi] (to ``tolerance``, relative) with epsilon_at(sigma) <= target.

    Needs epsilon_at(lo) > target >= epsilon_at(hi); epsilon falls as sigma grows. Each step tries the
    point where the bracket's ends, joined in log-log space (epsilon ~ 1/sigma there), cross the target,
    kept at least 10% inside the bracket: a safeguarded false position that needs ~5 accountant calls
    where plain bisection needs ~15.
    """
    eps_lo, eps_hi = epsilon_at(lo), epsilon_at(hi)
    while hi - lo > 1e-3 * hi and target - eps_hi > tolerance * target:
        if math.isfinite(eps_lo) and eps_lo > 0 and eps_hi > 0:
            slope = (math.log(eps_hi) - math.log(eps_lo)) / (math.log(hi) - math.log(lo))
            guess = math.exp(math.log(lo) + (math.log(target) - math.log(eps_lo)) / slope) if slope < 0 else hi
        else:
            guess = (lo + hi) / 2
        mid = min(max(guess, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo))
        eps_mid = epsilon_at(mid)
        if eps_mid > target:
            lo, eps_lo = mid, eps_mid
        else:
            hi, eps_hi = mid, eps_mid
    return hi


def plan_noise(history: History, target: float, delta: float, event: DpEvent, accountant: str) -> float:
    """Smallest sigma (>= MIN_PLANNED_SIGMA) with epsilon(history + event at sigma) <= ``target``.

    ``event`` gives q, steps and C (its sigma is ignored). RDP brackets the search first (cheap, and an
    upper bound on PRV's epsilon), so the PRV accountant is only ever evaluated near the answer.
    """
    def at(name: str) -> Callable[[float], float]:
        @functools.cache
        def epsilon(sigma: float) -> float:
            trial = [*history, DpEvent(event.sample_rate, sigma, event.steps, event.clip_norm)]
            if name == "bound":
                return math.inf if any(e is None for e in trial) else \
                    rdp_upper_bound([e for e in trial if e is not None], delta)
            return epsilon_of(trial, delta, name)
        return epsilon

    # The bracket: the node's own RDP when it accounts with RDP; for PRV, RDP at integer orders (an upper
    # bound on PRV's epsilon as good for bracketing, at a twentieth of the cost of Opacus' default orders).
    rdp = at("rdp" if accountant == "rdp" else "bound")
    if rdp(MIN_PLANNED_SIGMA) <= target:
        return MIN_PLANNED_SIGMA
    # Grow the bracket from below: RDP at a huge sigma is slow (its fractional orders converge slowly).
    lo, hi = MIN_PLANNED_SIGMA, min(MAX_PLANNED_SIGMA, 2 * MIN_PLANNED_SIGMA)
    while rdp(hi) > target and hi < MAX_PLANNED_SIGMA:
        lo, hi = hi, min(MAX_PLANNED_SIGMA, 4 * hi)
    if rdp(hi) > target and at(accountant)(MAX_PLANNED_SIGMA) > target:
        raise PrivacyError(f"no noise multiplier up to {MAX_PLANNED_SIGMA:g} keeps epsilon within {target:.4g}")
    sigma_rdp = _bisect(rdp, target, lo, hi, PLAN_TOLERANCE if accountant == "rdp" else BRACKET_TOLERANCE) \
        if rdp(hi) <= target else MAX_PLANNED_SIGMA
    if accountant == "rdp":
        return sigma_rdp
    return _refine_prv(history, target, delta, event, sigma_rdp)


def _refine_prv(history: History, target: float, delta: float, event: DpEvent, sigma_rdp: float) -> float:
    """PRV's sigma from RDP's bracket: PLD (dp-accounting; ~10x cheaper than PRV at small sigma and within
    ~0.2% of it) finds the point, then secant steps on PRV itself (epsilon ~ 1/sigma locally) move it until
    PRV is within the target: typically two PRV evaluations instead of a bisection of six."""
    def trial(sigma: float) -> list[DpEvent | None]:
        return [*history, DpEvent(event.sample_rate, sigma, event.steps, event.clip_norm)]

    pld = functools.cache(lambda sigma: independent_epsilon_of(trial(sigma), delta, "prv"))
    lo = max(MIN_PLANNED_SIGMA, 0.8 * sigma_rdp)
    sigma = lo if pld(lo) <= target else _bisect(pld, target, lo, sigma_rdp, PLAN_TOLERANCE / 2)
    for _ in range(20):
        eps = epsilon_of(trial(sigma), delta, "prv")
        if eps <= target:
            return sigma
        sigma = min(MAX_PLANNED_SIGMA, max(sigma * eps / target * (1 + PLAN_TOLERANCE / 4), sigma * 1.001))
    raise PrivacyError(f"the PRV accountant does not settle under epsilon {target:.4g} near sigma {sigma:.4g}")


class BudgetExhausted(PrivacyError):
    """No noise level lets the rest of the run fit the remaining budget."""


@dataclass(frozen=True)
class Decision:
    """The guard's verdict for one round: charge ``event`` or refuse with ``reason``."""

    charged: bool
    reason: str  # why it was refused ("" when charged); stays on the node (ledger, log)
    code: str  # refusal code sent to the server (fedtune.common.wire.contract.REFUSAL_CODES; "" when charged)
    event: DpEvent | None  # charged (or, for a budget refusal, the one that would have been); None without DP
    epsilon_before: float  # cumulative epsilon of the dataset before this round
    epsilon_after: float  # cumulative after this round (== before when refused; inf without DP)
    projected: float | None  # cumulative had the round been charged (None when not computed)
    budget: float
    exhausted: bool  # no further round like this one fits the budget (after a charge: an estimate)


def _refuse(code: str, reason: str, before: float, budget: float, *, event: DpEvent | None = None,
            projected: float | None = None, exhausted: bool = False) -> Decision:
    return Decision(False, reason, code, event, before, before, projected, budget, exhausted)


class PlanInfeasible(PrivacyError):
    """The server's requested epsilon cannot be met by any noise level."""


def _sampling(request: PlanRequest) -> tuple[float, int]:
    """The request's sampling rate and steps, known once the node's rows are read."""
    if request.sample_rate is None or request.steps is None:
        raise PrivacyError("a round is decided once the node's rows are read (its sampling rate and steps known)")
    return request.sample_rate, request.steps


def _plan_run(policy: NodePolicy, request: PlanRequest, history: History) -> float:
    """Noise for the rest of the run: at least what the server's requested run epsilon implies,
    and (noise-plan "spread") enough that all remaining rounds fit the remaining budget."""
    q, steps = _sampling(request)
    run = DpEvent(q, 1.0, steps * request.rounds_left, request.clip_norm)
    try:
        sigma = plan_noise([], request.epsilon, request.delta, run, policy.accountant)
    except PrivacyError as err:
        raise PlanInfeasible(f"the requested run epsilon {request.epsilon:g} cannot be met: {err}") from err
    if policy.noise_plan == "spread":
        try:
            target = policy.max_epsilon * (1 - PLAN_MARGIN.get(policy.accountant, 0.0))
            sigma = max(sigma, plan_noise(history, target, policy.delta, run, policy.accountant))
        except PrivacyError as err:
            raise BudgetExhausted(f"budget exhausted: {err} over the run's remaining {request.rounds_left} "
                               f"round(s) of {request.steps} steps") from err
    return sigma


def decide(policy: NodePolicy, request: PlanRequest, history: History, run_sigma: float | None = None) -> Decision:
    """Charge or refuse one round. ``history``: the dataset's charged events so far (all runs);
    ``run_sigma``: the noise this run already charged with (planned at its first round), if any."""
    if request.sample_rate is None or request.steps is None:
        raise PrivacyError("a round is decided once the node's rows are read (its sampling rate and steps known)")
    budget = policy.max_epsilon
    before = epsilon_of(history, policy.delta, policy.accountant)
    if problems := policy.check(request):
        return _refuse(problems[0][0], "policy: " + "; ".join(p for _, p in problems), before, budget)
    if not request.dp:  # the policy allows non-private training (require-dp = false)
        return Decision(True, "", "", None, before, math.inf, math.inf, budget, exhausted=False)
    if math.isinf(before):
        return _refuse("BUDGET_UNBOUNDED", "budget: this dataset was trained without DP before; its epsilon is "
                       "unbounded", before, budget, exhausted=True)
    try:
        sigma = run_sigma if run_sigma is not None else _plan_run(policy, request, history)
    except BudgetExhausted as err:
        return _refuse("BUDGET_EXHAUSTED", str(err), before, budget, exhausted=True)
    except PlanInfeasible as err:
        return _refuse("PLAN_INFEASIBLE", str(err), before, budget)
    event = DpEvent(request.sample_rate, sigma, request.steps, request.clip_norm)
    plan = (f"the plan (epsilon {request.epsilon:g} over {request.rounds_left} round(s) x {request.steps} steps at "
            f"q={request.sample_rate:.4g}) needs noise multiplier {sigma:.4g}")
    if sigma < policy.min_noise_multiplier:
        return _refuse("POLICY_MIN_NOISE", f"policy: {plan}; the policy's minimum is {policy.min_noise_multiplier:g}",
                       before, budget, event=event)
    if sigma > policy.max_noise_multiplier:
        return _refuse("POLICY_MAX_NOISE", f"policy: {plan} to fit the remaining budget "
                       f"{budget - before:.4g}; the policy's maximum is {policy.max_noise_multiplier:g} (an update "
                       "that noisy has no utility; the budget is kept)", before, budget, event=event, exhausted=True)
    after = epsilon_of([*history, event], policy.delta, policy.accountant)
    worst = after if after <= budget * (1 - INDEPENDENT_CHECK_ZONE) else max(
        after, independent_epsilon_of([*history, event], policy.delta, policy.accountant))
    if worst > budget + BUDGET_SLACK:
        return _refuse("BUDGET_EXHAUSTED", f"budget: epsilon would reach {worst:.4f} > budget {budget:.4f} "
                       f"(spent {before:.4f}; the larger of Opacus and dp-accounting)", before, budget, event=event,
                       projected=after, exhausted=True)
    # Composition is sublinear, so a next round costs at most about this one: an estimate (metrics only).
    return Decision(True, "", "", event, before, after, after, budget, exhausted=budget - after < after - before)
