"""What each node's reply came to in a round: typed from the strategy's reply parsing to every record.

A :class:`NodeOutcome` is one training reply as the server read it: trained, refused (by the node's policy or
budget), rejected (malformed, or an update that failed the checks) or error (a code from the node, or Flower
failed). It carries the parsed :class:`~fedtune.common.wire.contract.TrainReply` when the reply had one, and
what the server added: the bytes it received, the FedAvg weight it gave, the Flower run id of the attempt.
The same object feeds aggregation, the metrics line, the run record's receipts and the checkpoints.

:meth:`NodeOutcome.to_row` is the node's row of a ``metrics.jsonl`` line and of a checkpoint (never free text
from a node: only the contract's fields); :meth:`NodeOutcome.from_row` reads a checkpoint's row back, including
rows written before nodes signed their replies (no ``node-sig``, no ``run``). :class:`EvalOutcome` is the same
for a node's local evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fedtune.common.ledger.receipts import NODE_STATUS, STATUSES, Status
from fedtune.common.wire.contract import TrainReply


@dataclass(frozen=True)
class NodeOutcome:
    """One node's answer to one round's training request, as the server read it."""

    node_id: int  # Flower node id of the sender
    status: Status  # trained | refused | rejected | error: the server's reading of the reply
    code: str  # "" when trained; a refusal, error or rejection code otherwise
    reply: TrainReply | None = None  # the parsed reply (kept when its update was rejected: the node signed it)
    received_bytes: int | None = None  # size of the update received (an aggregated update only)
    weight: float | None = None  # the FedAvg weight the update got (aggregation.node_weights)
    run: str | None = None  # Flower run id of the attempt that got the reply (None: no run, e.g. central)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def trained(self) -> bool:
        return self.status == "trained"

    def weighted(self, weight: float) -> NodeOutcome:
        return dataclasses.replace(self, weight=weight)

    def to_row(self) -> dict[str, Any]:
        """The node's row of a round line (metrics.jsonl) and of a checkpoint; key order is part of the format."""
        row: dict[str, Any] = {"node-id": self.node_id, "status": self.status, "code": self.code}
        if self.reply is not None:
            row |= _reply_fields(self.reply)
        if self.run is not None:
            row["run"] = self.run
        if self.received_bytes is not None:
            row["bytes"] = self.received_bytes
        if self.weight is not None:
            row["weight"] = self.weight
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> NodeOutcome:
        """A row of a checkpoint back as an outcome (KeyError, TypeError or ValueError when it is not one)."""
        reply = _reply_from_row(row) if "ledger-key" in row else None
        return cls(node_id=int(row["node-id"]), status=row["status"], code=str(row["code"]), reply=reply,
                   received_bytes=row.get("bytes"), weight=row.get("weight"), run=row.get("run"))


def _reply_fields(reply: TrainReply) -> dict[str, Any]:
    """A training reply's fields as they appear in a row (status and code are the outcome's, placed first)."""
    row: dict[str, Any] = {
        "num-examples": reply.num_examples, "epsilon": reply.epsilon, "epsilon-round": reply.epsilon_round,
        "epsilon-budget": reply.epsilon_budget, "epsilon-remaining": reply.epsilon_budget - reply.epsilon,
        "noise-multiplier": reply.noise_multiplier, "exhausted": reply.exhausted, "ledger-key": reply.ledger_key,
        "ledger-seq": reply.ledger_seq, "ledger-head": reply.ledger_head,
    }
    if reply.node_sig:  # always on the wire; absent in rows from checkpoints written before nodes signed
        row["node-sig"] = reply.node_sig
    row["node"] = reply.node
    if reply.train_loss is not None:
        row["train-loss"] = reply.train_loss
    return row


def _reply_from_row(row: Mapping[str, Any]) -> TrainReply:
    status: Literal["trained", "refused"] = "trained" if NODE_STATUS[row["status"]] == "trained" else "refused"
    # (a reply rejected for its update was a trained one)
    return TrainReply(
        status=status, code="" if status == "trained" else str(row["code"]),
        num_examples=int(row["num-examples"]), epsilon=float(row["epsilon"]),
        epsilon_round=float(row["epsilon-round"]), epsilon_budget=float(row["epsilon-budget"]),
        noise_multiplier=float(row["noise-multiplier"]), exhausted=bool(row["exhausted"]),
        ledger_key=str(row["ledger-key"]), ledger_seq=int(row["ledger-seq"]), ledger_head=str(row["ledger-head"]),
        node_sig=str(row.get("node-sig", "")), node=str(row.get("node", "")), train_loss=row.get("train-loss"),
    )


@dataclass(frozen=True)
class EvalOutcome:
    """One node's local evaluation of the global adapter (only nodes whose policy releases it answer)."""

    node_id: int
    num_examples: int
    loss: float
    accuracy: float

    def to_row(self) -> dict[str, Any]:
        return {"node-id": self.node_id, "num-examples": self.num_examples, "eval-loss": self.loss,
                "eval-accuracy": self.accuracy}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EvalOutcome:
        return cls(int(row["node-id"]), int(row["num-examples"]), float(row["eval-loss"]),
                   float(row["eval-accuracy"]))


def weighted_mean(pairs: Iterable[tuple[float, float]]) -> float:
    """Mean of (value, weight) pairs by weight; NaN when the weights add up to nothing."""
    listed = list(pairs)
    total = sum(w for _, w in listed)
    return sum(v * w for v, w in listed) / total if total else math.nan


def train_loss(outcomes: Sequence[NodeOutcome]) -> float:
    """The trained nodes' reported train loss, by the weight each update got (by num-examples without one)."""
    return weighted_mean((o.reply.train_loss, o.weight if o.weight is not None else o.reply.num_examples)
                         for o in outcomes if o.trained and o.reply is not None and o.reply.train_loss is not None
                         and o.reply.num_examples > 0)


def eval_means(evaluations: Sequence[EvalOutcome]) -> tuple[float, float]:
    """The nodes' local (loss, accuracy), each by the node's number of evaluation examples."""
    counted = [e for e in evaluations if e.num_examples > 0]
    return (weighted_mean((e.loss, e.num_examples) for e in counted),
            weighted_mean((e.accuracy, e.num_examples) for e in counted))


def rows_by_round(by_round: Mapping[int, Sequence[NodeOutcome | EvalOutcome]]) -> dict[int, list[dict[str, Any]]]:
    """Outcomes per round as checkpoint rows."""
    return {r: [o.to_row() for o in outcomes] for r, outcomes in by_round.items()}
