"""A client's DP-SGD accountant, persisted on its own disk across rounds.

Mechanism (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each
step samples every example independently with probability q (Poisson sampling),
clips per-example gradients to norm C and adds N(0, sigma^2 C^2 I) to their sum.
Composition over steps and rounds is accounted with Opacus' PRV accountant
(Gopi et al. 2021) or RDP (Mironov 2017); the same (sigma, q, steps) history
replayed by an independent accountant must give the same epsilon.

The state is written *before* a round trains (atomically, fsync'd), so an update
that may leave the node is always paid for, even if the process dies mid-round.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedtune.common.errors import PrivacyError
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

Event = tuple[float, float, int]  # (noise multiplier sigma, sample rate q, steps)


def epsilon_of(history: list[Event], delta: float, accountant: str) -> float:
    """Cumulative epsilon of a history of Poisson-subsampled Gaussian steps."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
    return float(acc.get_epsilon(delta=delta))


def plan_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier (within Opacus' tolerance) with epsilon(steps) <= ``epsilon``."""
    if epsilon <= 0:
        raise PrivacyError(f"no privacy budget left to plan noise (remaining epsilon {epsilon:.4g})")
    return float(get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
        accountant=accountant, epsilon_tolerance=0.005,
    ))


@dataclass
class PrivacyState:
    """What the node must remember between rounds: the planned noise and every charged step."""

    accountant: str
    delta: float
    budget: float
    noise_multiplier: float | None = None
    history: list[Event] = field(default_factory=list)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def projected(self, event: Event) -> float:
        return epsilon_of([*self.history, event], self.delta, self.accountant)


class PrivacyStore:
    """Loads and atomically saves a client's :class:`PrivacyState` as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, accountant: str, delta: float, budget: float) -> PrivacyState:
        if not self.path.exists():
            return PrivacyState(accountant=accountant, delta=delta, budget=budget)
        try:
            raw = json.loads(self.path.read_text())
            state = PrivacyState(
                accountant=raw["accountant"], delta=float(raw["delta"]), budget=float(raw["budget"]),
                noise_multiplier=raw.get("noise_multiplier"),
                history=[(float(s), float(q), int(t)) for s, q, t in raw["history"]],
            )
        except (ValueError, KeyError, TypeError) as err:
            raise PrivacyError(f"privacy state {self.path} is unreadable ({err}); restore it from backup") from err
        if (state.accountant, state.delta) != (accountant, delta):
            raise PrivacyError(
                f"privacy state {self.path} was kept with accountant={state.accountant}, delta={state.delta}; "
                f"this run asks for accountant={accountant}, delta={delta}: use a new state directory"
            )
        return state

    def save(self, state: PrivacyState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(asdict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: float) -> tuple[float, int]:
    """Sample rate and local steps for ``local_epochs`` expected passes over the data.

    q = 1 / ceil(N / B), exactly the rate Opacus' Poisson ``DPDataLoader`` uses for a
    loader of batch size B over N examples, so accounting and sampling agree.
    """
    if num_examples <= 0:
        raise PrivacyError("a client with no training examples cannot train")
    batches = math.ceil(num_examples / batch_size)
    return 1.0 / batches, max(1, round(local_epochs * batches))
