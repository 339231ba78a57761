"""Empirical privacy auditing with one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

Setup ("Privacy Auditing with One (1) Training Run", arXiv:2305.08846): m canary
examples are added to the training data, each independently with probability 1/2
(S_i = +1 in, -1 out). After one training run the auditor scores every canary and
guesses "in" for the k+ highest scores, "out" for the k- lowest, and abstains on
the rest: r = k+ + k- guesses, v of them correct.

Theorem (their Theorem 5.2, with the (epsilon, delta) extension of their Section 5):
if training is (epsilon, delta)-DP, then for every v,

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v],

where W is the number of correct guesses. With delta = 0 this is the tail of a
Binomial(r, e^eps / (1 + e^eps)): each guess is no better than randomised response.
The lower bound reported is the largest epsilon whose p-value is still at most
1 - confidence: "the training was not (epsilon, delta)-DP" at that confidence.

What one run can show is capped. With delta = 0 and all r guesses correct the
p-value is q^r, so the bound is logit(alpha^(1/r)) ~ ln(r / ln(1/alpha)): 3.49 for
r = 100 and 5.81 for r = 1,000 at 95% confidence (alpha = 0.05), i.e. about ln(m) at
best; delta > 0 lowers it further (the 2 m delta term). :func:`max_lower_bound`
computes the cap for a given m, delta and confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedtune.common.errors import PrivacyError

CONFIDENCE = 0.95
MAX_EPSILON = 100.0  # beyond this the binomial tails underflow; no one-run audit gets near it


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if not 0.0 <= delta < 1.0:
        raise PrivacyError(f"delta must be in [0, 1), got {delta}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP, bounded by the theorem above."""
    _check(m, r, v, delta)
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    between = np.cumsum(stats.binom.pmf(v - i, r, q))  # f(v - i) - f(v) = P[v - i <= Binomial < v]
    return float(min(tail + 2 * m * delta * np.max(between / i), 1.0))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest epsilon that v correct guesses out of r reject at ``confidence`` (0 when none is rejected)."""
    alpha = 1.0 - confidence
    if not 0 < alpha < 1:
        raise PrivacyError(f"confidence must be in (0, 1), got {confidence}")
    if p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= alpha:
        lo, hi = hi, 2 * hi
        if hi > MAX_EPSILON:
            return MAX_EPSILON
    for _ in range(60):  # bisection: the p-value grows with epsilon
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= alpha else (lo, mid)
    return lo


def max_lower_bound(m: int, delta: float, confidence: float = CONFIDENCE, guesses: int | None = None) -> float:
    """The largest bound m canaries can give: every one of ``guesses`` (default: the best r <= m) correct."""
    if guesses is not None:
        return epsilon_lower_bound(m, guesses, guesses, delta, confidence)
    candidates = sorted({max(1, round(m * f)) for f in np.linspace(0.02, 1.0, 50)} | {m})
    return max(epsilon_lower_bound(m, r, r, delta, confidence) for r in candidates)


@dataclass(frozen=True)
class Guesses:
    """The auditor's guesses from canary scores."""

    canaries: int  # m
    guesses: int  # r = k+ + k-
    correct: int  # v


def guess(scores: Sequence[float], included: Sequence[bool], k_in: int, k_out: int) -> Guesses:
    """Guess "in" for the ``k_in`` highest scores, "out" for the ``k_out`` lowest; count the correct ones."""
    m = len(scores)
    if len(included) != m or k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise PrivacyError(f"need k_in + k_out <= {m} canaries with a score and a membership each")
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")  # lowest first
    member = np.asarray(included, dtype=bool)
    correct = int(member[order[m - k_in:]].sum()) if k_in else 0
    correct += int((~member[order[:k_out]]).sum())
    return Guesses(m, k_in + k_out, correct)


@dataclass(frozen=True)
class EmpiricalBound:
    """One audited run: the lower bound beside what the node claimed."""

    guesses: Guesses
    delta: float
    confidence: float
    lower_bound: float  # epsilon the run proves, at ``confidence``
    attainable: float  # the most these r guesses could have proved (all correct)
    claimed: float  # the epsilon the node's ledger claims for this run

    @property
    def refutes_claim(self) -> bool:
        """The run shows, at ``confidence``, more privacy loss than the node claims: its DP is broken."""
        return self.lower_bound > self.claimed


def bound(g: Guesses, delta: float, claimed: float, confidence: float = CONFIDENCE) -> EmpiricalBound:
    """The lower bound these guesses prove, beside the node's ``claimed`` epsilon."""
    proved = epsilon_lower_bound(g.canaries, g.guesses, g.correct, delta, confidence)
    best = epsilon_lower_bound(g.canaries, g.guesses, g.guesses, delta, confidence)
    return EmpiricalBound(g, delta, confidence, proved, best, claimed)
