"""FedAvg over LoRA adapters that tolerates refusing and misbehaving clients.

Replies are sorted into trained / refused (budget or policy; no weights) /
rejected (error, malformed, wrong shapes, NaN/inf). Only trained updates are
averaged; everything is kept per client for the round's metrics line.

A node that refuses (its policy or budget says no) is excluded from sampling
for the rest of the run: its answer would not change, since its policy and the
run's plan are fixed. (A node that reports ``exhausted`` after training is
still asked once more, so that the refusal is its own and sits in its ledger.) When fewer than
``min_train_nodes`` eligible nodes remain, the strategy stops sending work: the
remaining rounds are skipped (no messages, global adapter unchanged) and
``stop_reason`` says why, so the run still ends cleanly.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedtune.common.adapter import Arrays, arrays_to_record, check_arrays, record_to_arrays
from fedtune.server.aggregation import fedavg

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
        status = msg.content.config_records.get("status")
        reason = status.get("reason", "") if status is not None else ""
        return row | {"status": "refused", "reason": str(reason)}, None
    arrays = record_to_arrays(msg.content.array_records["arrays"])
    problems = check_arrays(arrays, reference)
    examples = row.get("num-examples", 0)
    if not (isinstance(examples, int | float) and math.isfinite(examples) and examples > 0):
        problems.append(f"num-examples must be > 0, got {examples!r}")
    if problems:
        return row | {"status": "rejected", "reason": "; ".join(problems)}, None
    return row | {"status": "trained"}, arrays


def weighted_mean(rows: list[ClientRow], key: str) -> float:
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
        self.excluded: dict[int, str] = {}  # node id -> why it gets no more work this run
        self.stop_reason: str | None = None  # set when too few nodes can still train

    def _eligible(self, server_round: int, grid: Grid) -> list[int] | None:
        """Connected nodes that may still train; None (and ``stop_reason`` set) when too few remain."""
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)  # waits for min_available_nodes
        eligible = [n for n in connected if n not in self.excluded]
        if len(eligible) >= max(1, self.min_train_nodes):
            return eligible
        why = "; ".join(f"node {n}: {r}" for n, r in sorted(self.excluded.items()))
        self.stop_reason = (
            f"stopped before round {server_round}: {len(eligible)} of {len(connected)} clients can still train, "
            f"the run needs {max(1, self.min_train_nodes)} (excluded: {why or 'none'})")
        log.warning("%s; the remaining rounds are skipped", self.stop_reason)
        return None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample only from nodes that still have budget (FedAvg's sampling otherwise)."""
        self._reference = record_to_arrays(arrays)
        if self.stop_reason is not None or self.fraction_train == 0.0:
            return []
        eligible = self._eligible(server_round, grid)
        if eligible is None:
            return []
        size = min(len(eligible), max(int(len(eligible) * self.fraction_train), self.min_train_nodes))
        node_ids = random.sample(eligible, size)
        log.info("configure_train: sampled %s of %s eligible nodes (%s excluded)", size, len(eligible),
                 len(self.excluded))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stop_reason is not None:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _note_exclusions(self, server_round: int, rows: list[ClientRow]) -> None:
        """Exclude nodes that refused. A node reporting ``exhausted`` is asked once more: its refusal
        is its own decision, and its ledger records it (the server never decides for a node)."""
        for row in rows:
            if row["status"] == "refused":
                self.excluded[row["node-id"]] = f"refused in round {server_round}: {row.get('reason') or 'no reason'}"

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
        self._note_exclusions(server_round, rows)
        trained = [r for r in rows if r["status"] == "trained"]
        eps = [float(r["epsilon"]) for r in rows if "epsilon" in r]
        summary = MetricRecord({
            "clients-trained": len(trained),
            "clients-refused": sum(r["status"] == "refused" for r in rows),
            "clients-failed": sum(r["status"] in ("error", "rejected") for r in rows),
            "clients-excluded": len(self.excluded),
            "train-loss": weighted_mean(trained, "train-loss"),
            "epsilon-max": max(eps) if eps else math.nan,
            "epsilon-mean": sum(eps) / len(eps) if eps else math.nan,
        })
        if not updates:
            log.warning("round %s: no usable update; the global adapter is unchanged", server_round)
            return None, summary
        return arrays_to_record(fedavg(updates)), summary

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows: list[ClientRow] = []
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                continue
            rows.append({"node-id": msg.metadata.src_node_id, **dict(msg.content.metric_records["metrics"])})
        self.eval_rows[server_round] = rows
        if not any(r.get("num-examples", 0) > 0 for r in rows):
            return None
        return MetricRecord({
            "eval-loss": weighted_mean(rows, "eval-loss"), "eval-accuracy": weighted_mean(rows, "eval-accuracy"),
        })
