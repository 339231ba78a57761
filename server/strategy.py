"""FedAvg over LoRA adapters that speaks the wire contract and tolerates refusing and misbehaving nodes.

Every round's request is a typed :class:`~fedtune.common.wire.contract.RoundRequest` (the same for every node,
with the round number set here). Replies are parsed with :func:`~fedtune.common.wire.contract.parse_reply`
and sorted into trained / refused (policy or budget; no weights) / error (a code from the node) /
rejected (malformed, wrong shapes, NaN/inf). Only trained updates are averaged, each with a bounded weight
(``weighting``, ``max-node-examples``: a node's num-examples is its own claim; see
:func:`~fedtune.server.aggregation.node_weights`); every reply becomes one row of the round's metrics line,
holding the reply's fields (never free text from a node) and, for a trained node, the weight it got.

A node that refuses is excluded from sampling for the rest of the run: its answer would not change,
since its policy and the run's plan are fixed. (A node that reports ``exhausted`` after training is
still asked once more, so that the refusal is its own and sits in its ledger.) When fewer than
``min_train_nodes`` eligible nodes remain, or not enough nodes connect before ``node_wait_timeout``,
the strategy stops sending work: the remaining rounds are skipped and ``stop_code`` / ``stop_reason``
say why, so the run still ends cleanly.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.common.wire.arrays import (
    Arrays,
    arrays_to_record,
    check_arrays,
    record_to_arrays,
    sent_arrays,
    with_frozen,
)
from fedtune.common.wire.contract import (
    ARRAYS,
    REQUEST,
    ErrorReply,
    EvalReply,
    RoundRequest,
    TrainReply,
    WireError,
    parse_reply,
)
from fedtune.server.aggregation import WEIGHTINGS, fedavg, node_weights

log = logging.getLogger("fedtune.server")
ClientRow = dict[str, Any]
POLL_S = 1.0
_FLOWER_CODES = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int) and not k.startswith("_")}


def flower_code(code: int) -> str:
    """A Flower error as a code (e.g. FLOWER_INVALID_FAB: the node's app gate refused the app)."""
    return f"FLOWER_{_FLOWER_CODES.get(code, code)}"


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float) -> list[int] | None:
    """Connected node ids once at least ``needed`` are connected; None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() >= deadline:
            return None
        log.info("waiting for nodes to connect: %d connected, %d needed", len(nodes), needed)
        time.sleep(POLL_S)
    return nodes


def reply_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def reply_row(reply: TrainReply) -> ClientRow:
    """A training reply's fields as they appear in a round line's client row."""
    row: ClientRow = {
        "status": reply.status, "code": reply.code, "num-examples": reply.num_examples, "epsilon": reply.epsilon,
        "epsilon-round": reply.epsilon_round, "epsilon-budget": reply.epsilon_budget,
        "epsilon-remaining": reply.epsilon_budget - reply.epsilon, "noise-multiplier": reply.noise_multiplier,
        "exhausted": reply.exhausted, "ledger-key": reply.ledger_key, "ledger-seq": reply.ledger_seq,
        "ledger-head": reply.ledger_head, "node-sig": reply.node_sig, "node": reply.node,
    }
    if reply.train_loss is not None:
        row["train-loss"] = reply.train_loss
    return row


def _train_row(msg: Message, reference: Arrays, lora_variant: str = "lora", run_id: str = "",
               ) -> tuple[ClientRow, Arrays | None]:
    """One training reply -> (row for the metrics log, arrays to aggregate or None).

    Under FFA-LoRA a node sends only what trains (B and the head); A is restored from ``reference``.
    A reply that names a ledger entry records ``run_id`` (this attempt's Flower run id) for its receipt.
    """
    row: ClientRow = {"node-id": msg.metadata.src_node_id}
    if msg.has_error():  # Flower itself failed (app refused by the node's gate, process died, timeout)
        return row | {"status": "error", "code": flower_code(msg.error.code)}, None
    try:
        reply = parse_reply(msg.content)
    except WireError as err:
        return row | {"status": "rejected", "code": err.code}, None
    if isinstance(reply, ErrorReply):
        return row | {"status": "error", "code": reply.code}, None
    if not isinstance(reply, TrainReply):
        return row | {"status": "rejected", "code": "MALFORMED"}, None
    row |= reply_row(reply) | {"run": run_id}
    if reply.status != "trained":
        return row, None
    record = msg.content.array_records[ARRAYS]
    arrays = record_to_arrays(record)
    if check_arrays(arrays, sent_arrays(reference, lora_variant)):
        return row | {"status": "rejected", "code": "BAD_UPDATE"}, None
    return row | {"bytes": reply_bytes(record)}, with_frozen(arrays, reference)


def weighted_mean(rows: list[ClientRow], key: str) -> float:
    """Mean of ``key`` over the rows, by each row's aggregation weight (``weight``) where it has one, else by its
    num-examples."""
    pairs = [(r[key], r.get("weight", r["num-examples"])) for r in rows if key in r and r.get("num-examples", 0) > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


class AdapterFedAvg(FedAvg):
    """Flower FedAvg whose rounds carry a typed request and whose aggregation validates every reply."""

    def __init__(self, request: RoundRequest, *, run_id: str, node_wait_timeout: float = 600.0,
                 weighting: str = "examples", max_node_examples: int = 0, **kwargs: Any) -> None:
        if weighting not in WEIGHTINGS or max_node_examples < 0:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)} and max-node-examples >= 0, got "
                             f"weighting={weighting!r}, max-node-examples={max_node_examples}")
        super().__init__(weighted_by_key="num-examples", **kwargs)
        self.request = request
        self.run_id = run_id  # Flower run id of this attempt (a resumed run has a new one): each receipt's run
        self.node_wait_timeout = node_wait_timeout
        self.weighting = weighting  # examples | equal (see aggregation.node_weights)
        self.max_node_examples = max_node_examples  # 0: 4 x the round's median num-examples
        self.train_rows: dict[int, list[ClientRow]] = {}
        self.eval_rows: dict[int, list[ClientRow]] = {}
        self._reference: Arrays = {}
        self.excluded: dict[int, str] = {}  # node id -> why it gets no more work this run
        self.stop_code: str | None = None  # "budget" (nodes refused), "nodes" (too few connected) or "diverged"
        self.stop_reason: str | None = None

    def stop(self, code: str, reason: str) -> None:
        """Send no more work this run; ``code`` and ``reason`` end up in summary.json."""
        self.stop_code, self.stop_reason = code, reason
        log.warning("%s; the remaining rounds are skipped", reason)

    def _eligible(self, server_round: int, grid: Grid) -> list[int] | None:
        """Connected nodes that may still train; None (and the stop set) when too few remain."""
        needed = max(1, self.min_available_nodes)
        connected = wait_for_nodes(grid, needed, self.node_wait_timeout)
        if connected is None:
            self.stop("nodes", f"stopped before round {server_round}: fewer than {needed} nodes connected within "
                                f"{self.node_wait_timeout:g}s")
            return None
        eligible = [n for n in connected if n not in self.excluded]
        if len(eligible) >= max(1, self.min_train_nodes):
            return eligible
        why = "; ".join(f"node {n}: {r}" for n, r in sorted(self.excluded.items()))
        self.stop("budget", f"stopped before round {server_round}: {len(eligible)} of {len(connected)} nodes can "
                             f"still train, the run needs {max(1, self.min_train_nodes)} (excluded: {why or 'none'})")
        return None

    def _messages(self, server_round: int, arrays: ArrayRecord, node_ids: list[int], kind: str) -> list[Message]:
        record = RecordDict({ARRAYS: arrays, REQUEST: self.request.for_round(server_round).to_record()})
        return list(self._construct_messages(record, node_ids, kind))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample only from nodes that may still train (FedAvg's sampling otherwise)."""
        self._reference = record_to_arrays(arrays)
        if self.stop_code is not None or self.fraction_train == 0.0:
            return []
        eligible = self._eligible(server_round, grid)
        if eligible is None:
            return []
        size = min(len(eligible), max(int(len(eligible) * self.fraction_train), self.min_train_nodes))
        node_ids = random.sample(eligible, size)
        log.info("round %s: sampled %s of %s eligible nodes (%s excluded)", server_round, size, len(eligible),
                 len(self.excluded))
        return self._messages(server_round, arrays, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stop_code is not None or self.fraction_evaluate == 0.0:
            return []
        nodes = [n for n in grid.get_node_ids() if n not in self.excluded]
        size = min(len(nodes), max(1, int(len(nodes) * self.fraction_evaluate)))
        return self._messages(server_round, arrays, random.sample(nodes, size), MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rows, updates = [], []
        for msg in replies:
            row, arrays = _train_row(msg, self._reference, self.request.lora.lora_variant, self.run_id)
            rows.append(row)
            if arrays is not None:
                updates.append((row, arrays))
            elif row["status"] == "refused":
                self.excluded[row["node-id"]] = f"refused in round {server_round} ({row['code']})"
            else:
                log.warning("round %s: %s reply from node %s (code %s)", server_round, row["status"],
                            row["node-id"], row["code"])
        self.train_rows[server_round] = rows
        trained = [r for r in rows if r["status"] == "trained"]
        eps = [float(r["epsilon"]) for r in rows if "epsilon" in r]
        summary = MetricRecord({
            "clients-trained": len(trained),
            "clients-refused": sum(r["status"] == "refused" for r in rows),
            "clients-failed": sum(r["status"] in ("error", "rejected") for r in rows),
            "clients-excluded": len(self.excluded),
            "epsilon-max": max(eps) if eps else math.nan,
        })
        if not updates:
            log.warning("round %s: no usable update; the global adapter is unchanged", server_round)
            return None, summary
        return arrays_to_record(self._aggregate(updates)), summary

    def _aggregate(self, updates: list[tuple[ClientRow, Arrays]]) -> Arrays:
        """FedAvg under bounded weights; each trained node's weight goes into its row (metrics.jsonl)."""
        weights = node_weights([float(row["num-examples"]) for row, _ in updates], weighting=self.weighting,
                               cap=self.max_node_examples)
        for (row, _), weight in zip(updates, weights, strict=True):
            row["weight"] = float(weight)
        return fedavg([(arrays, float(w)) for (_, arrays), w in zip(updates, weights, strict=True)])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows: list[ClientRow] = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                reply = parse_reply(msg.content, evaluation=True)
            except WireError:
                continue
            if isinstance(reply, EvalReply) and reply.status == "evaluated":
                rows.append({"node-id": msg.metadata.src_node_id, "num-examples": reply.num_examples,
                             "eval-loss": reply.loss, "eval-accuracy": reply.accuracy})
        self.eval_rows[server_round] = rows
        if not rows:
            return None
        return MetricRecord({
            "eval-loss": weighted_mean(rows, "eval-loss"), "eval-accuracy": weighted_mean(rows, "eval-accuracy"),
        })
