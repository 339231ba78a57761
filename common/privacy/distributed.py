"""Client-level DP on the secure sum: the distributed Skellam mechanism and its accounting.

Mechanism (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning",
NeurIPS 2021). Each trained node clips its round update to L2 norm C, divides by the grid step g of the secure
sum (:mod:`fedtune.common.wire.secure_sum`), rounds every coordinate to an integer without bias, and adds
integer noise Sk(var / t) = Poisson(var / 2t) - Poisson(var / 2t) to each coordinate, where t is the SecAgg+
threshold. The noise is added *after* quantisation, in the integer domain, so nothing after it rounds again:
the sum of t or more honest nodes' shares is exactly Skellam with variance >= var (Skellam variables add up),
and the server's decoding (a multiplication by g) is post-processing.

Sensitivity of the sum to one node (add/remove a node's whole update, in integer units): the rounded vector z
of a clipped update has ||z||_2 <= C / g + sqrt(d) (rounding moves each of the d coordinates by < 1), and
||z||_1 <= sqrt(d) ||z||_2. With var = (sigma_c * D2)^2 the sum carries noise sigma_c times the sensitivity.

Accounting (Theorem 3.5 / Corollary 3.6 of the paper; integer orders alpha > 1, var the per-coordinate
variance of the total noise)::

    eps(alpha) <= alpha D2^2 / (2 var) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 var^2), 3 D1 / (2 var))

composed over the rounds a node may take part in (every round: the client sampling is not used to amplify,
which is an upper bound for any sampling), converted to (epsilon, delta) with Opacus' RDP conversion (Balle
et al. 2020). For large var the first term dominates and the guarantee is that of a Gaussian mechanism with
noise multiplier sigma_c; the tests check it against dp-accounting's RDP accountant for that Gaussian.

Trust assumption: at least t of the nodes in each round's sum are honest (they add their share) and the
coordinator follows the protocol (it does not drop nodes to shrink the sum below t: a sum with fewer than t
trained nodes is discarded). The node's own sample-level ledger is unaffected and stays its worst-case guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ORDERS: tuple[int, ...] = tuple(range(2, 257)) + tuple(range(264, 1025, 8))


@dataclass(frozen=True)
class SkellamShare:
    """One node's share of the distributed Skellam noise, in integer units of the secure sum."""

    l2: float  # D2: L2 sensitivity of the sum to one node
    l1: float  # D1: L1 sensitivity
    variance: float  # per-coordinate variance of the noise of the whole sum (>= t honest shares)
    threshold: int  # t: the shares the protocol guarantees in the sum

    @classmethod
    def plan(cls, *, clip_norm: float, step: float, dim: int, noise_multiplier: float, threshold: int) -> SkellamShare:
        """The share for an update of ``dim`` coordinates clipped to ``clip_norm``, on a grid of ``step``."""
        if threshold < 1 or dim < 1 or not (clip_norm > 0 and step > 0 and noise_multiplier > 0):
            raise ValueError(f"bad Skellam plan: clip {clip_norm}, step {step}, dim {dim}, "
                             f"noise {noise_multiplier}, threshold {threshold}")
        l2 = clip_norm / step + math.sqrt(dim)
        return cls(l2=l2, l1=math.sqrt(dim) * l2, variance=(noise_multiplier * l2) ** 2, threshold=threshold)

    @property
    def node_poisson_mean(self) -> float:
        """Each Poisson of one node's share: Sk(var / t) is the difference of two Poisson(var / 2t)."""
        return self.variance / (2.0 * self.threshold)

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """One node's noise share, shape (size,), int64."""
        lam = self.node_poisson_mean
        return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)


def skellam_rdp(orders: Sequence[int], *, l1: float, l2: float, variance: float) -> np.ndarray:
    """RDP of one release of the Skellam mechanism (Agarwal et al. 2021, Cor. 3.6) at integer ``orders``."""
    a = np.asarray(orders, dtype=np.float64)
    if np.any(a <= 1) or np.any(a != np.round(a)):
        raise ValueError("the Skellam RDP bound holds for integer orders > 1")
    lead = a * l2**2 / (2.0 * variance)
    return lead + np.minimum(((2.0 * a - 1.0) * l2**2 + 6.0 * l1) / (4.0 * variance**2), 3.0 * l1 / (2.0 * variance))


def client_epsilon(shares: Sequence[SkellamShare], delta: float) -> float:
    """Client-level epsilon after one secure sum per share (composed; no amplification by sampling)."""
    import opacus  # noqa: F401  # the package first: a submodule imported while another thread initialises it deadlocks
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not shares:
        return 0.0
    rdp = np.sum([skellam_rdp(ORDERS, l1=s.l1, l2=s.l2, variance=s.variance) for s in shares], axis=0)
    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=list(rdp), delta=delta)
    return float(eps)


TRUST = ("at least t (the SecAgg+ threshold) of the nodes in each round's sum are honest and add their noise "
         "share; the coordinator follows the protocol (runs SecAgg+ as specified and does not drop nodes to push "
         "the sum below t); a node's update has L2 norm <= client-clip-norm")
MECHANISM = ("distributed Skellam on the SecAgg+ sum (Agarwal, Kairouz, Liu 2021): integer noise added after "
             "unbiased rounding, RDP Cor. 3.6 composed over the aggregated rounds without sampling amplification, "
             "converted with Balle et al. 2020")


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The independent recomputation an auditor makes: dp-accounting's RDP accountant for ``rounds`` Gaussian
    mechanisms of ``noise_multiplier`` (a lower bound of the Skellam figure, within 1% of it at the secure
    sum's scale, where the Skellam terms and the rounding vanish)."""
    import dp_accounting

    if rounds <= 0:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant(orders=[float(a) for a in ORDERS])
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


def client_level_problem(level: dict[str, object], tolerance: float = 0.01) -> str | None:
    """What is wrong with a run record's client-level claim: an epsilon below the independent recomputation."""
    sigma, rounds, delta, eps = (level.get(k) for k in ("noise-multiplier", "rounds", "delta", "epsilon"))
    if not (isinstance(sigma, int | float) and sigma > 0 and isinstance(rounds, int) and isinstance(delta, float)
            and isinstance(eps, int | float)):
        return "the client-level claim lacks noise-multiplier, rounds, delta or epsilon"
    again = gaussian_epsilon(float(sigma), rounds, delta)
    if eps < again * (1 - tolerance):
        return (f"the client-level epsilon {eps:.4f} is below its recomputation {again:.4f} (noise multiplier "
                f"{sigma:g}, {rounds} rounds, delta {delta:g})")
    return None
