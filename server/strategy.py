"""FedAvg over LoRA adapters that speaks the wire contract and tolerates refusing and misbehaving nodes.

:class:`AdapterFedAvg` implements Flower's :class:`~flwr.serverapp.strategy.Strategy` interface (public API
only). Every round's request is a typed :class:`~fedtune.common.wire.contract.RoundRequest` (the same for
every node, with the round number set here). Replies become typed outcomes (:mod:`fedtune.server.replies`):
only trained updates are averaged, each with a bounded weight (``weighting``, ``max-node-examples``: a node's
num-examples is its own claim; see :func:`~fedtune.server.aggregation.node_weights`), and every reply is one
:class:`~fedtune.server.outcome.NodeOutcome` of the round (``outcomes``), holding the reply's fields (never free
text from a node) and, for a trained node, the weight it got.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.settings import RunSettings
from fedtune.common.wire.arrays import Arrays, arrays_to_record, record_to_arrays
from fedtune.common.wire.contract import ARRAYS, REQUEST, RoundRequest
from fedtune.server.aggregation import WEIGHTINGS, fedavg, node_weights
from fedtune.server.outcome import EvalOutcome, NodeOutcome, eval_means
from fedtune.server.replies import eval_outcome, train_outcome
from fedtune.server.server_optimizer import ServerOptimizer

log = logging.getLogger("fedtune.server")
POLL_S = 1.0


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float) -> list[int] | None:
    """Connected node ids once at least ``needed`` are connected; None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() >= deadline:
            return None
        log.info("waiting for nodes to connect: %d connected, %d needed", len(nodes), needed)
        time.sleep(POLL_S)
    return nodes


@dataclass(frozen=True)
class Sampling:
    """Which nodes a round asks: Flower FedAvg's sampling parameters, with their meaning and defaults."""

    fraction_train: float = 1.0  # share of the eligible nodes asked to train (at least min_train_nodes)
    fraction_evaluate: float = 1.0  # share of the nodes asked to evaluate locally (0: no local evaluation)
    min_train_nodes: int = 2  # fewer eligible nodes than this: the run stops (stop code "budget")
    min_evaluate_nodes: int = 2  # kept for Flower's meaning; local evaluation asks at least one node
    min_available_nodes: int = 2  # nodes that must be connected before a round starts
    node_wait_timeout: float = 600.0  # seconds to wait for min_available_nodes (then stop code "nodes")

    def train_size(self, eligible: int) -> int:
        return min(eligible, max(int(eligible * self.fraction_train), self.min_train_nodes))

    def evaluate_size(self, nodes: int) -> int:
        return min(nodes, max(1, int(nodes * self.fraction_evaluate)))


def _messages(record: RecordDict, node_ids: Sequence[int], kind: str) -> list[Message]:
    """One message per node, all carrying the same content."""
    return [Message(content=record, message_type=kind, dst_node_id=node_id) for node_id in node_ids]


class AdapterFedAvg(Strategy):
    """FedAvg whose rounds carry a typed request and whose aggregation validates every reply."""

    def __init__(self, request: RoundRequest, *, run_id: str, node_wait_timeout: float = 600.0,
                 weighting: str = "examples", max_node_examples: int = 0, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, min_train_nodes: int = 2, min_evaluate_nodes: int = 2,
                 min_available_nodes: int = 2, server_optimizer: ServerOptimizer | None = None) -> None:
        if weighting not in WEIGHTINGS or max_node_examples < 0:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)} and max-node-examples >= 0, got "
                             f"weighting={weighting!r}, max-node-examples={max_node_examples}")
        self.sampling = Sampling(fraction_train, fraction_evaluate,
                                 0 if fraction_train == 0.0 else min_train_nodes,
                                 0 if fraction_evaluate == 0.0 else min_evaluate_nodes, min_available_nodes,
                                 node_wait_timeout)
        self.request = request
        self.run_id = run_id  # Flower run id of this attempt (a resumed run has a new one): each receipt's run
        self.weighting = weighting  # examples | equal (see aggregation.node_weights)
        self.max_node_examples = max_node_examples  # 0: 4 x the round's median num-examples
        self.outcomes: dict[int, tuple[NodeOutcome, ...]] = {}  # per round: every training reply
        self.evaluations: dict[int, tuple[EvalOutcome, ...]] = {}  # per round: every local evaluation
        self.excluded: dict[int, str] = {}  # node id -> why it gets no more work this run
        self.stop_code: str | None = None  # "budget" (nodes refused), "nodes" (too few connected) or "diverged"
        self.stop_reason: str | None = None
        self._reference: Arrays = {}
        self.server_optimizer = server_optimizer or ServerOptimizer()  # FedAvg: the new global adapter is the mean

    @classmethod
    def from_settings(cls, settings: RunSettings, request: RoundRequest, run_id: str) -> AdapterFedAvg:
        """The strategy a run's settings ask for."""
        f = settings.federation
        return cls(request, run_id=run_id, node_wait_timeout=f.node_wait_timeout, weighting=f.weighting,
                   max_node_examples=f.max_node_examples, fraction_train=f.fraction_train,
                   fraction_evaluate=f.fraction_evaluate, min_train_nodes=f.min_clients, min_evaluate_nodes=1,
                   min_available_nodes=f.min_clients, server_optimizer=ServerOptimizer.from_settings(f))

    def restore(self, outcomes: Mapping[int, Sequence[NodeOutcome]],
                evaluations: Mapping[int, Sequence[EvalOutcome]]) -> None:
        """The rounds recorded before an interruption (from a checkpoint)."""
        self.outcomes.update({r: tuple(o) for r, o in outcomes.items()})
        self.evaluations.update({r: tuple(e) for r, e in evaluations.items()})

    def stop(self, code: str, reason: str) -> None:
        """Send no more work this run; ``code`` and ``reason`` end up in summary.json."""
        self.stop_code, self.stop_reason = code, reason
        log.warning("%s; the remaining rounds are skipped", reason)

    def summary(self) -> None:
        s = self.sampling
        log.info("AdapterFedAvg: fraction train %.2f, evaluate %.2f; at least %d nodes train, %d connected; "
                 "weighting %s (max-node-examples %d)", s.fraction_train, s.fraction_evaluate, s.min_train_nodes,
                 s.min_available_nodes, self.weighting, self.max_node_examples)

    def _eligible(self, server_round: int, grid: Grid) -> list[int] | None:
        """Connected nodes that may still train; None (and the stop set) when too few remain."""
        s = self.sampling
        needed = max(1, s.min_available_nodes)
        connected = wait_for_nodes(grid, needed, s.node_wait_timeout)
        if connected is None:
            self.stop("nodes", f"stopped before round {server_round}: fewer than {needed} nodes connected within "
                                f"{s.node_wait_timeout:g}s")
            return None
        eligible = [n for n in connected if n not in self.excluded]
        if len(eligible) >= max(1, s.min_train_nodes):
            return eligible
        why = "; ".join(f"node {n}: {r}" for n, r in sorted(self.excluded.items()))
        self.stop("budget", f"stopped before round {server_round}: {len(eligible)} of {len(connected)} nodes can "
                             f"still train, the run needs {max(1, s.min_train_nodes)} (excluded: {why or 'none'})")
        return None

    def _content(self, server_round: int, arrays: ArrayRecord) -> RecordDict:
        return RecordDict({ARRAYS: arrays, REQUEST: self.request.for_round(server_round).to_record()})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample only from nodes that may still train (FedAvg's sampling otherwise)."""
        self._reference = record_to_arrays(arrays)
        if self.stop_code is not None or self.sampling.fraction_train == 0.0:
            return []
        eligible = self._eligible(server_round, grid)
        if eligible is None:
            return []
        size = self.sampling.train_size(len(eligible))
        node_ids = random.sample(eligible, size)
        log.info("round %s: sampled %s of %s eligible nodes (%s excluded)", server_round, size, len(eligible),
                 len(self.excluded))
        return _messages(self._content(server_round, arrays), node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stop_code is not None or self.sampling.fraction_evaluate == 0.0:
            return []
        nodes = [n for n in grid.get_node_ids() if n not in self.excluded]
        node_ids = random.sample(nodes, self.sampling.evaluate_size(len(nodes)))
        return _messages(self._content(server_round, arrays), node_ids, MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        parsed = [train_outcome(msg, self._reference, self.request.lora.lora_variant, self.run_id)
                  for msg in replies]
        for outcome, _ in parsed:
            self._note(server_round, outcome)
        updates = [(outcome, arrays) for outcome, arrays in parsed if arrays is not None]
        weights = self._weights([outcome for outcome, _ in updates])
        in_order = iter(weights)
        outcomes = tuple(o.weighted(next(in_order)) if arrays is not None else o for o, arrays in parsed)
        self.outcomes[server_round] = outcomes
        summary = self._train_summary(outcomes)
        if not updates:
            log.warning("round %s: no usable update; the global adapter is unchanged", server_round)
            return None, summary
        averaged = fedavg([(arrays, w) for (_, arrays), w in zip(updates, weights, strict=True)])
        return arrays_to_record(self.server_optimizer.step(self._reference, averaged)), summary

    def finish_round(self, server_round: int, outcomes: Sequence[NodeOutcome], *,
                     weight: float | None) -> MetricRecord:
        """Record a round whose updates were aggregated elsewhere (the secure sum): every trained node got
        ``weight`` (None: nothing was aggregated); returns the round's summary."""
        for outcome in outcomes:
            self._note(server_round, outcome)
        self.outcomes[server_round] = tuple(o.weighted(weight) if o.trained and weight is not None else o
                                            for o in outcomes)
        return self._train_summary(self.outcomes[server_round])

    def _note(self, server_round: int, outcome: NodeOutcome) -> None:
        """A refusing node leaves the sample; any other unusable reply is logged."""
        if outcome.status == "refused":
            self.excluded[outcome.node_id] = f"refused in round {server_round} ({outcome.code})"
        elif not outcome.trained:
            log.warning("round %s: %s reply from node %s (code %s)", server_round, outcome.status, outcome.node_id,
                        outcome.code)

    def _weights(self, trained: Sequence[NodeOutcome]) -> list[float]:
        """Each trained update's bounded FedAvg weight (aggregation.node_weights), in the order given."""
        if not trained:
            return []
        claims = [float(o.reply.num_examples) for o in trained if o.reply is not None]
        return [float(w) for w in node_weights(claims, weighting=self.weighting, cap=self.max_node_examples)]

    def _train_summary(self, outcomes: Sequence[NodeOutcome]) -> MetricRecord:
        eps = [o.reply.epsilon for o in outcomes if o.reply is not None]
        return MetricRecord({
            "clients-trained": sum(o.trained for o in outcomes),
            "clients-refused": sum(o.status == "refused" for o in outcomes),
            "clients-failed": sum(o.status in ("error", "rejected") for o in outcomes),
            "clients-excluded": len(self.excluded),
            "epsilon-max": max(eps) if eps else math.nan,
        })

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        evaluations = tuple(e for e in map(eval_outcome, replies) if e is not None)
        self.evaluations[server_round] = evaluations
        if not evaluations:
            return None
        loss, accuracy = eval_means(evaluations)
        return MetricRecord({"eval-loss": loss, "eval-accuracy": accuracy})
