"""The one-run audit bound (Steinke, Nasr, Jagielski 2023) against independent computations."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from fedtune.audit.empirical import (
    Guesses,
    bound,
    epsilon_lower_bound,
    guess,
    max_lower_bound,
    p_value,
)
from fedtune.common.errors import PrivacyError


def binomial_tail(r: int, q: float, v: int) -> float:
    """P[Binomial(r, q) >= v], exactly, with integers and fractions (no scipy)."""
    qf = Fraction(q)
    return float(sum(math.comb(r, k) * qf**k * (1 - qf) ** (r - k) for k in range(v, r + 1)))


def theorem(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's right-hand side, term by term in plain Python."""
    q = 1 / (1 + math.exp(-eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    f_v = sum(pmf[v:])
    worst = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    return min(f_v + 2 * m * delta * worst, 1.0)


@pytest.mark.parametrize(("r", "v", "eps"), [(10, 10, 1.0), (50, 40, 0.7), (100, 71, 0.2), (30, 15, 0.0)])
def test_delta_zero_is_the_randomised_response_binomial_tail(r: int, v: int, eps: float) -> None:
    q = math.exp(eps) / (1 + math.exp(eps))
    assert p_value(1000, r, v, eps, 0.0) == pytest.approx(binomial_tail(r, q, v), rel=1e-9)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_with_delta_zero_has_a_closed_form(r: int) -> None:
    """p = q^r: the bound is logit(0.05 ** (1 / r))."""
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(p / (1 - p)), rel=1e-9)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [
    (200, 50, 50, 2.5, 1e-5), (1000, 200, 180, 2.0, 1e-5), (1000, 100, 95, 1.0, 1e-3), (20, 20, 19, 3.0, 0.01)])
def test_delta_term_matches_the_theorem_written_out(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(theorem(m, r, v, eps, delta), rel=1e-9)


def test_bound_is_where_the_p_value_crosses_five_percent() -> None:
    eps = epsilon_lower_bound(1000, 200, 190, 1e-5)
    assert p_value(1000, 200, 190, eps, 1e-5) == pytest.approx(0.05, abs=1e-6)
    assert p_value(1000, 200, 190, eps * 1.01, 1e-5) > 0.05


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta() -> None:
    by_v = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in (50, 70, 90, 100)]
    assert by_v[0] == 0.0 and by_v == sorted(by_v) and by_v[-1] > 3
    assert epsilon_lower_bound(1000, 100, 100, 1e-3) < epsilon_lower_bound(1000, 100, 100, 1e-5) < \
        epsilon_lower_bound(1000, 100, 100, 0.0)


def test_what_one_run_can_show() -> None:
    """m = 1,000 canaries at delta 1e-5 can never prove epsilon 8; they can prove 2 with 50 correct guesses."""
    assert 5.5 < max_lower_bound(1000, 1e-5) < 5.9
    assert max_lower_bound(1000, 1e-5) < 8.0
    assert epsilon_lower_bound(1000, 50, 50, 1e-5) > 2.0
    assert max_lower_bound(200, 1e-5, guesses=50) == pytest.approx(epsilon_lower_bound(200, 50, 50, 1e-5))
    assert epsilon_lower_bound(12000, 12000, 12000, 1e-5) < 8.0 < epsilon_lower_bound(15000, 15000, 15000, 1e-5)


def test_guesses_count_top_and_bottom() -> None:
    scores = [0.9, 0.1, 0.8, 0.2, 0.5, 0.7]
    included = [True, False, True, True, False, False]
    assert guess(scores, included, 2, 2) == Guesses(6, 4, 3)  # top 2 both in; bottom 2: 0.1 out, 0.2 in
    result = bound(Guesses(200, 50, 50), 1e-5, claimed=1.0)
    assert result.refutes_claim and result.attainable == result.lower_bound
    with pytest.raises(PrivacyError):
        guess(scores, included, 4, 4)
    with pytest.raises(PrivacyError):
        p_value(10, 5, 6, 1.0, 0.0)
