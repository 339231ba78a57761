"""DP events and their epsilon under two independent accountant libraries.

Mechanism (Abadi et al. 2016, "Deep Learning with Differential Privacy"): one
DP-SGD step samples every example independently with probability q (Poisson
sampling), clips each per-example gradient to norm C and adds N(0, sigma^2 C^2 I)
to their sum. Epsilon depends on (q, sigma, steps) and delta only; C sets the
scale of the noise, not the privacy loss.

A :class:`DpEvent` is an immutable record of ``steps`` such steps (the analogue of
``dp_accounting.PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` composed
``steps`` times). A history of events is replayed by

- Opacus (the node's own accountant): ``prv`` (Gopi et al. 2021, numerical
  composition of privacy random variables) or ``rdp`` (Mironov 2017; Mironov,
  Talwar, Zhang 2019 for the subsampled Gaussian);
- Google ``dp-accounting`` (the independent check): ``pld`` (privacy loss
  distributions, Koskela et al. 2020 / Doroshenko et al. 2022) or ``rdp``.

Like is compared with like: Opacus PRV with dp-accounting PLD (both numerically
tight), Opacus RDP with dp-accounting RDP (both upper bounds, ~10-15% looser).
No privacy math is written here: every number comes from those libraries.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Literal

from fedtune.common.errors import PrivacyError

OpacusName = Literal["prv", "rdp"]
IndependentName = Literal["pld", "rdp"]
OPACUS_ACCOUNTANTS: tuple[OpacusName, ...] = ("prv", "rdp")

# The independent accountant that computes the same quantity as each Opacus one.
COUNTERPART: dict[str, IndependentName] = {"prv": "pld", "rdp": "rdp"}

# dp-accounting PLD discretisation. 1e-3 is 10x faster than the library's 1e-4 and,
# being a pessimistic (upper-bound) discretisation, moved epsilon by < 1e-4 in our checks.
PLD_DISCRETIZATION = 1e-3

SAMPLING = "poisson"
RELATION = "add/remove-one"  # neighbouring datasets differ by adding or removing one example


@dataclass(frozen=True)
class DpEvent:
    """``steps`` DP-SGD steps: Poisson sampling at rate q, Gaussian noise multiplier sigma, clip norm C."""

    sample_rate: float  # q in (0, 1]
    noise_multiplier: float  # sigma > 0
    steps: int  # T >= 1
    clip_norm: float = 1.0  # C > 0 (recorded for replay; does not change epsilon)

    def __post_init__(self) -> None:
        problems = []
        if not (0.0 < self.sample_rate <= 1.0):
            problems.append(f"sample rate must be in (0, 1], got {self.sample_rate!r}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            problems.append(f"noise multiplier must be > 0 and finite, got {self.noise_multiplier!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            problems.append(f"clip norm must be > 0 and finite, got {self.clip_norm!r}")
        if problems:
            raise PrivacyError(problems)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: float) -> tuple[float, int]:
    """Sample rate and local steps for ``local_epochs`` expected passes over ``num_examples``.

    q = 1 / ceil(N / B), exactly the rate Opacus' Poisson ``DPDataLoader`` uses for a
    loader of batch size B over N examples, so accounting and sampling agree. Anyone who
    knows N and the plan (the server does: N is a disclosed field of the reply) can derive both.
    """
    if num_examples <= 0:
        raise PrivacyError("a client with no training examples cannot train")
    batches = math.ceil(num_examples / batch_size)
    return 1.0 / batches, max(1, round(local_epochs * batches))


def merged(events: Iterable[DpEvent]) -> list[tuple[float, float, int]]:
    """(sigma, q, steps) with equal (sigma, q) summed: composition commutes, and one
    entry per mechanism keeps PRV/PLD fast and numerically stable over long ledgers."""
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        key = (float(e.noise_multiplier), float(e.sample_rate))
        steps[key] = steps.get(key, 0) + e.steps
    return [(s, q, t) for (s, q), t in steps.items()]


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")


Composition = tuple[tuple[float, float, int], ...]  # merged (sigma, q, steps): what an accountant sees


def opacus_epsilon(events: Sequence[DpEvent], delta: float, accountant: str) -> float:
    """Epsilon of the composed events under Opacus' ``prv`` or ``rdp`` accountant (0 when empty)."""
    if accountant not in OPACUS_ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {', '.join(OPACUS_ACCOUNTANTS)}, got {accountant!r}")
    _check_delta(delta)
    return _opacus_epsilon(tuple(merged(events)), delta, accountant) if events else 0.0


@functools.lru_cache(maxsize=1024)
def _opacus_epsilon(composition: Composition, delta: float, accountant: str) -> float:
    """Cached: a node asks for the same composition again (the plan's last trial is the round it charges;
    this round's epsilon-after is the next round's epsilon-before), and PRV at small sigma takes seconds."""
    import opacus  # noqa: F401  # the package first: a submodule imported while another thread initialises it deadlocks
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(composition)
    return float(acc.get_epsilon(delta=delta))


# Integer Renyi orders: Opacus evaluates them in closed form, ~20x faster than its default fractional orders.
# Fewer orders make the RDP bound looser, never wrong: it is still an upper bound on PRV's epsilon.
BOUND_ORDERS = tuple(range(2, 64))


def rdp_upper_bound(events: Sequence[DpEvent], delta: float) -> float:
    """A cheap upper bound on the events' epsilon (Opacus RDP at integer orders); brackets PRV searches."""
    _check_delta(delta)
    return _rdp_upper_bound(tuple(merged(events)), delta) if events else 0.0


@functools.lru_cache(maxsize=1024)
def _rdp_upper_bound(composition: Composition, delta: float) -> float:
    import opacus  # noqa: F401  # the package first: a submodule imported while another thread initialises it deadlocks
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(composition)
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": the bound is looser there, still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta, alphas=list(BOUND_ORDERS)))


def dp_accounting_epsilon(events: Sequence[DpEvent], delta: float, accountant: str) -> float:
    """Epsilon of the composed events under Google dp-accounting's ``pld`` or ``rdp`` accountant."""
    _check_delta(delta)
    if accountant not in ("pld", "rdp"):
        raise PrivacyError(f"independent accountant must be pld or rdp, got {accountant!r}")
    return _dp_accounting_epsilon(tuple(merged(events)), delta, accountant) if events else 0.0


@functools.lru_cache(maxsize=1024)
def _dp_accounting_epsilon(composition: Composition, delta: float, accountant: str) -> float:
    import dp_accounting
    from dp_accounting import pld, rdp

    if accountant == "pld":
        acc: dp_accounting.PrivacyAccountant = pld.PLDAccountant(
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETIZATION)
    else:
        acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    quiet = logging.getLogger()  # dp-accounting RDP logs every order whose series does not converge
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for sigma, q, steps in composition:
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        return float(acc.get_epsilon(delta))
    finally:
        quiet.setLevel(level)


def accountant_record(accountant: str) -> dict[str, str]:
    """Name, library and version of the node's accountant (written into every ledger entry)."""
    return {"name": accountant, "library": "opacus", "version": _installed("opacus")}


@functools.cache
def _installed(package: str) -> str:
    """The installed version (read once per process: the lookup scans the environment's metadata)."""
    return version(package)
