"""Client-level DP of the secure sum: the Skellam bound against independent accountants and exact divergences."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from fedtune.common.privacy.distributed import (
    SkellamShare,
    client_epsilon,
    client_level_problem,
    gaussian_epsilon,
    skellam_rdp,
)


def _dp_accounting_gaussian_rdp(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The independent check: dp-accounting's RDP accountant for `rounds` Gaussian mechanisms."""
    return gaussian_epsilon(noise_multiplier, rounds, delta)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 3), (0.7, 5), (2.0, 10)])
def test_client_epsilon_matches_dp_accounting_within_one_percent(sigma, rounds):
    """At the grid's scale (C / g ~ 1e7) the Skellam correction vanishes: the sum is a Gaussian mechanism."""
    share = SkellamShare.plan(clip_norm=1.0, step=2 * 16 / 2**29, dim=75_000, noise_multiplier=sigma, threshold=3)
    ours = client_epsilon([share] * rounds, 1e-5)
    theirs = _dp_accounting_gaussian_rdp(sigma, rounds, 1e-5)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert ours >= theirs * (1 - 1e-9)  # the rounding inflation and the Skellam terms only add


def test_skellam_bound_holds_against_the_exact_renyi_divergence():
    """1-D, small integer scale: the bound (Agarwal et al. Cor. 3.6) is above the exact divergence of
    Sk(mu) and 1 + Sk(mu), and close to it (computed from scipy's Skellam pmf)."""
    variance, shift = 8.0, 1
    ks = np.arange(-60, 61)  # the mass beyond is below 1e-40
    log_p = np.log(stats.skellam.pmf(ks, variance / 2, variance / 2))
    log_q = np.log(stats.skellam.pmf(ks - shift, variance / 2, variance / 2))
    for alpha in (2, 4, 8):
        exact = float(special.logsumexp(alpha * log_p + (1 - alpha) * log_q)) / (alpha - 1)
        bound = float(skellam_rdp([alpha], l1=shift, l2=shift, variance=variance)[0])
        assert exact <= bound <= exact * 1.6 + 0.05


def test_node_shares_sum_to_the_planned_variance():
    share = SkellamShare.plan(clip_norm=1.0, step=1e-3, dim=100, noise_multiplier=1.0, threshold=4)
    rng = np.random.default_rng(0)
    total = sum(share.sample(20_000, rng) for _ in range(4))  # t honest shares
    assert total.dtype == np.int64
    assert np.var(total) == pytest.approx(share.variance, rel=0.05)
    assert share.l2 == pytest.approx(1000 + 10)  # C / g plus the rounding's sqrt(d)


def test_more_rounds_cost_more_and_no_rounds_cost_nothing():
    share = SkellamShare.plan(clip_norm=1.0, step=1e-6, dim=10, noise_multiplier=1.0, threshold=2)
    assert client_epsilon([], 1e-5) == 0.0
    assert 0 < client_epsilon([share], 1e-5) < client_epsilon([share] * 3, 1e-5)


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="bad Skellam plan"):
        SkellamShare.plan(clip_norm=1.0, step=1e-3, dim=10, noise_multiplier=0.0, threshold=2)
    with pytest.raises(ValueError, match="integer orders"):
        skellam_rdp([1.5], l1=1, l2=1, variance=1)


def test_the_audit_flags_a_client_level_claim_below_its_recomputation():
    honest = {"noise-multiplier": 1.0, "rounds": 3, "delta": 1e-5, "epsilon": gaussian_epsilon(1.0, 3, 1e-5) * 1.001}
    assert client_level_problem(honest) is None
    assert "below its recomputation" in str(client_level_problem(honest | {"epsilon": 1.0}))
    assert "lacks" in str(client_level_problem({"rounds": 3}))
