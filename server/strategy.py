"""FedAvg over LoRA adapters that tolerates refusing and misbehaving clients.

Replies are sorted into trained / refused (budget or policy; no weights) /
rejected (error, malformed, wrong shapes, NaN/inf). Only trained updates are
averaged; everything is kept per client for the round's metrics line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from fedtune.common.adapter import Arrays, arrays_to_record, check_arrays, record_to_arrays
from fedtune.server.aggregation import fedavg
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

log = logging.getLogger("fedtune.server")
ClientRow = dict[str, Any]


def _classify(msg: Message, reference: Arrays) -> tuple[ClientRow, Arrays | None]:
    """One reply -> (row for the metrics log, arrays to aggregate or None)."""
    row: ClientRow = {"node-id": msg.metadata.src_node_id}
    if msg.has_error():
        return row | {"status": "error", "reason": msg.error.reason}, None
    metrics = msg.content.metric_records.get("metrics")
    if metrics is None:
        return row | {"status": "rejected", "reason": "reply has no metrics"}, None
    row |= dict(metrics)
    if "arrays" not in msg.content.array_records:
        return row | {"status": "refused"}, None
    arrays = record_to_arrays(msg.content.array_records["arrays"])
    problems = check_arrays(arrays, reference)
    examples = row.get("num-examples", 0)
    if not (isinstance(examples, int | float) and math.isfinite(examples) and examples > 0):
        problems.append(f"num-examples must be > 0, got {examples!r}")
    if problems:
        return row | {"status": "rejected", "reason": "; ".join(problems)}, None
    return row | {"status": "trained"}, arrays


def _weighted(rows: list[ClientRow], key: str) -> float:
    pairs = [(r[key], r["num-examples"]) for r in rows if key in r and r.get("num-examples", 0) > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


class AdapterFedAvg(FedAvg):
    """Flower FedAvg whose aggregation validates each update and logs every client."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(weighted_by_key="num-examples", **kwargs)
        self.train_rows: dict[int, list[ClientRow]] = {}
        self.eval_rows: dict[int, list[ClientRow]] = {}
        self._reference: Arrays = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = record_to_arrays(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rows, updates = [], []
        for msg in replies:
            row, arrays = _classify(msg, self._reference)
            rows.append(row)
            if arrays is not None:
                updates.append((arrays, float(row["num-examples"])))
            elif row["status"] != "refused":
                log.warning("round %s: %s reply from node %s: %s", server_round, row["status"],
                            row["node-id"], row.get("reason", ""))
        self.train_rows[server_round] = rows
        trained = [r for r in rows if r["status"] == "trained"]
        eps = [float(r["epsilon"]) for r in rows if "epsilon" in r]
        summary = MetricRecord({
            "clients-trained": len(trained),
            "clients-refused": sum(r["status"] == "refused" for r in rows),
            "clients-failed": sum(r["status"] in ("error", "rejected") for r in rows),
            "train-loss": _weighted(trained, "train-loss"),
            "epsilon-max": max(eps) if eps else math.nan,
            "epsilon-mean": sum(eps) / len(eps) if eps else math.nan,
        })
        if not updates:
            log.warning("round %s: no usable update; the global adapter is unchanged", server_round)
            return None, summary
        return arrays_to_record(fedavg(updates)), summary

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = []
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                continue
            rows.append({"node-id": msg.metadata.src_node_id, **dict(msg.content.metric_records["metrics"])})
        self.eval_rows[server_round] = rows
        if not any(r.get("num-examples", 0) > 0 for r in rows):
            return None
        return MetricRecord({
            "eval-loss": _weighted(rows, "eval-loss"), "eval-accuracy": _weighted(rows, "eval-accuracy"),
        })
