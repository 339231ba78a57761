"""Signs that a run has gone wrong: training that diverged, and a model no better than the majority class.

A run that diverges (a learning rate too large for its optimiser, an unclipped gradient explosion) must not
end as "completed" with a useless adapter. :class:`DivergenceGuard` looks at every round's server-side
evaluation: a non-finite held-out loss, a held-out loss above ``divergence-factor`` times its round-0 value,
or a round in which every answering node reported that its own training went non-finite (error code
``TRAIN``: a node never sends an update holding NaN/inf) stops the run. The ServerApp (federated) and
``fedtune-sim --central`` (central) then skip the remaining rounds, keep the adapter of the last round
before the divergence, and write ``"status": "stopped-early", "stop-code": "diverged"`` (exit code 5).

:func:`majority_baseline` is the accuracy of always predicting the held-out set's most frequent class;
:func:`quality_warnings` says so plainly when a run's final model does no better.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.server.outcome import NodeOutcome

Row = Mapping[str, Any]  # one round line of metrics.jsonl
STOP_CODE = "diverged"










class DivergenceGuard:
    """Decides, round by round, whether training has diverged (see the module docstring)."""

    def __init__(self, factor: float, reference_loss: float | None = None) -> None:
        self.factor = factor  # 0: only non-finite losses and failing nodes count
        self.reference = reference_loss  # the round-0 held-out loss

    @classmethod
    def resumed(cls, factor: float, lines: Iterable[Row]) -> DivergenceGuard:
        """A guard for a resumed run: the round-0 loss comes from the checkpoint's metrics lines."""
        first = next((line for line in lines if line.get("round") == 0), None)
        loss = first.get("loss") if first else None
        return cls(factor, float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None)

    def check(self, server_round: int, loss: float, outcomes: Sequence[NodeOutcome] = ()) -> str | None:
        """Why training diverged by ``server_round`` (held-out ``loss``, the round's node outcomes), or None."""
        if not math.isfinite(loss):
            return f"the held-out loss after round {server_round} is {loss}"
        failed = [o for o in outcomes if o.status == "error" and o.code == "TRAIN"]
        if outcomes and len(failed) == len(outcomes):
            return (f"every node that answered in round {server_round} ({len(outcomes)}) reported that its local "
                    "training went non-finite (code TRAIN) and sent no update")
        if self.reference is None:
            self.reference = loss
            return None
        if self.factor and loss > self.factor * self.reference:
            return (f"the held-out loss after round {server_round} is {loss:.4g}, above {self.factor:g} x its "
                    f"round-0 value {self.reference:.4g} (divergence-factor)")
        return None


def spent_epsilon(lines: Iterable[Mapping[str, Any]]) -> float | None:
    """The largest cumulative epsilon any node reported so far (inf once a node trained without DP)."""
    eps = [float(row["epsilon"]) for line in lines for row in line.get("clients", [])
           if isinstance(row.get("epsilon"), int | float)]
    return max(eps) if eps else None


def diverged_reason(why: str, *, kept_round: int, private: bool, epsilon: float | None) -> str:
    """The stop message: what diverged, which adapter was kept, and what the nodes' ledgers still hold."""
    out = (f"training diverged: {why}. The remaining rounds were skipped and the adapter of round {kept_round} "
           "(the last round before the divergence) was kept. Lower the learning rate (learning-rate under DP and "
           "clip-only, nonprivate-learning-rate with --no-dp) or raise divergence-factor.")
    if private:
        spent = f" (largest cumulative epsilon {epsilon:.4g})" if epsilon is not None and math.isfinite(epsilon) \
            else ""
        return out + (f" The epsilon the nodes spent on the rounds trained so far{spent} stays charged in their "
                      "ledgers: stopping does not refund it.")
    return out + " The nodes' ledgers record the rounds trained so far as non-private (unbounded epsilon)."
