"""One round's line of ``metrics.jsonl``, built from the round's typed outcomes and the held-out evaluation.

The ServerApp (federated) and ``fedtune-sim --central`` write the same line: the held-out result, the nodes'
aggregates (train loss, bytes, epsilon, local accuracy), every node's row (:meth:`NodeOutcome.to_row`), then
the evaluation's per-label and task fields. :class:`~fedtune.server.results.RunRecorder` adds ``elapsed-s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtune.server.outcome import EvalOutcome, NodeOutcome, eval_means, train_loss
from fedtune.server.results import eval_fields

if TYPE_CHECKING:
    from fedtune.common.tasks.result import EvalResult


@dataclass(frozen=True)
class RoundLine:
    """What one round came to: every node's reply, their local evaluations and the server's held-out result."""

    server_round: int
    outcomes: Sequence[NodeOutcome]  # the round's training replies (none for round 0)
    evaluations: Sequence[EvalOutcome]  # the nodes' local evaluations
    result: EvalResult  # the server's held-out evaluation of the round's adapter
    labels: list[str]  # the held-out set's label names (per-label fields)

    def to_row(self) -> dict[str, Any]:
        """The metrics.jsonl line (before the recorder adds elapsed-s); key order is part of the format."""
        eps = [o.reply.epsilon for o in self.outcomes if o.reply is not None]
        line = {
            "round": self.server_round, "accuracy": self.result.accuracy, "loss": self.result.loss,
            "train-loss": train_loss(self.outcomes),
            "bytes-received": sum(o.received_bytes or 0 for o in self.outcomes),
            "epsilon-max": max(eps) if eps else None,
            "epsilon-mean": sum(eps) / len(eps) if eps else None,
            "client-accuracy": eval_means(self.evaluations)[1],
            "clients": [o.to_row() for o in self.outcomes],
        }
        return line | eval_fields(self.result, self.labels) | self.result.extra
