"""Secure aggregation on the server: a round's training step through Flower's own SecAgg+ workflow.

:class:`SecureAggregation` wraps :class:`~fedtune.server.strategy.AdapterFedAvg` (composition, like Flower's
DP wrappers): sampling, requests, exclusions, local evaluation and every record stay the inner strategy's;
only the training step changes. Flower's ``Strategy.start`` sends what ``configure_train`` returns and hands
the replies to ``aggregate_train``; here ``configure_train`` keeps the round's messages and sends nothing, and
``aggregate_train`` runs :class:`flwr.server.workflow.SecAggPlusWorkflow` on them.

That workflow is written for Flower's legacy API: it runs under a ``LegacyContext`` whose legacy strategy
samples (``configure_fit``) and receives the sum (``aggregate_fit``). :class:`_Bridge` is that strategy: it
offers exactly the nodes the inner strategy sampled and keeps the sum. :class:`_Workflow` adds the round's
request and global adapter to each node's stage-2 message (the wire contract's records), and :class:`_Tap`
(a pass-through :class:`~flwr.serverapp.Grid`) keeps the stage-2 replies, whose contract fields (status,
epsilon, receipt, node signature: never an adapter) become the round's typed outcomes.

The server process never holds a node's update: it holds the masked vectors (uniform noise modulo 2^32
without the other nodes' masks) and, after unmasking, their sum. See docs/secure-aggregation.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.privacy.distributed import MECHANISM, TRUST, SkellamShare, client_epsilon
from fedtune.common.settings import RunSettings
from fedtune.common.wire.arrays import Arrays, arrays_to_record, record_to_arrays, sent_arrays
from fedtune.common.wire.contract import ARRAYS, REQUEST
from fedtune.common.wire.secure_sum import MODULUS, step, summed_names, target_range, unflatten, value_range
from fedtune.server.outcome import NodeOutcome
from fedtune.server.replies import summed_outcome
from fedtune.server.strategy import AdapterFedAvg

log = logging.getLogger("fedtune.server")
COLLECT_STAGE = 2  # setup, share keys, collect masked vectors, unmask: the nodes train in the third


@dataclass
class SecureRound:
    """What one securely aggregated round did (a line of metrics.jsonl: ``secure-aggregation``)."""

    nodes: int  # sampled into the protocol
    threshold: int = 0  # SecAgg+ reconstruction threshold t
    in_sum: int = 0  # nodes whose masked vector is in the sum
    trained: int = 0  # of those, nodes that trained (the others sent zeros)
    clamped: int = 0  # coordinates the nodes clamped to the range
    value_range: float = 0.0  # c
    step: float = 0.0  # g: the value of one integer unit of the sum
    aggregated: bool = False  # the sum became the round's global adapter
    sent_bytes: int = 0  # payload the server sent over the protocol's four stages (keys, shares, request, adapter)
    received_bytes: int = 0  # payload it received (keys, encrypted shares, masked vectors, share lists)
    why: str = ""  # why not
    client_noise: SkellamShare | None = field(default=None, repr=False)  # the round's noise, under client-dp

    def to_row(self) -> dict[str, object]:
        return {"nodes": self.nodes, "threshold": self.threshold, "in-sum": self.in_sum, "trained": self.trained,
                "clamped": self.clamped, "value-range": self.value_range, "step": self.step,
                "aggregated": self.aggregated, "bytes-sent": self.sent_bytes, "bytes-received": self.received_bytes,
                **({"why": self.why} if self.why else {})}


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays and of the byte strings in its config records (keys, shares, vectors)."""
    total = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, bytes | str))
    return total


class _Tap(Grid):
    """The run's grid, passing everything through; keeps the setup threshold and the stage-2 replies, and gives
    each stage its deadline (``secagg-timeout`` for the key stages, ``round-timeout`` for training)."""

    def __init__(self, grid: Grid, *, key_timeout: float, train_timeout: float) -> None:
        self.grid = grid
        self.timeouts = (key_timeout, train_timeout)  # the key stages; the stage in which the nodes train
        self.calls = 0
        self.threshold = 0
        self.collected: list[Message] = []
        self.addressed: dict[str, int] = {}  # stage 2: message id -> the node it was sent to
        self.targets: set[int] = set()  # stage 2: the nodes asked
        self.sent_bytes = 0
        self.received_bytes = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.calls == 0 and messages:
            threshold = messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.THRESHOLD]
            self.threshold = threshold if isinstance(threshold, int) else 0
        self.sent_bytes += sum(payload_bytes(m.content) for m in messages)
        stage_timeout = self.timeouts[1] if self.calls == COLLECT_STAGE else self.timeouts[0]
        replies = list(self.grid.send_and_receive(messages, timeout=stage_timeout))
        self.received_bytes += sum(payload_bytes(m.content) for m in replies if not m.has_error())
        if self.calls == COLLECT_STAGE:
            self.collected = replies
            self.addressed = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
            self.targets = {m.metadata.dst_node_id for m in messages}
        self.calls += 1
        return replies

    def node_of(self, reply: Message) -> int:
        """The node a stage-2 reply answers for: Flower's own error reply for a node that died may not name it as
        its source, but it names the message it answers."""
        source = reply.metadata.src_node_id
        if source in self.targets:
            return source
        return self.addressed.get(reply.metadata.reply_to_message_id, source)

    def set_run(self, run):  # type: ignore[no-untyped-def]  # Flower's signature
        self.grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.grid.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


class _Bridge(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow needs: offers the sampled nodes, keeps the unmasked sum."""

    def __init__(self, node_ids: list[int], grid: Grid, run_id: int) -> None:
        self.proxies = [GridClientProxy(n, grid, run_id) for n in node_ids]
        self.mean: np.ndarray | None = None  # the workflow's output: the sum divided by the nodes in it

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return [(p, FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {})) for p in self.proxies]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:  # type: ignore[type-arg]
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ whose stage-2 message to every node also carries the round's request and global adapter."""

    def __init__(self, content: RecordDict, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.content = content

    def setup_stage(self, grid, context, state):  # type: ignore[no-untyped-def]  # Flower's signature
        ok = super().setup_stage(grid, context, state)
        for record in state.nid_to_fitins.values():
            record[REQUEST] = self.content.config_records[REQUEST]
            record[ARRAYS] = self.content.array_records[ARRAYS]
        return ok


class SecureAggregation(Strategy):
    """The inner strategy's rounds, with each training step summed by SecAgg+ (see the module's docstring)."""

    def __init__(self, inner: AdapterFedAvg, settings: RunSettings) -> None:
        self.inner = inner
        self.settings = settings
        self.rounds: dict[int, SecureRound] = {}
        self._pending: tuple[ArrayRecord, list[Message], Grid] | None = None

    def summary(self) -> None:
        a = self.settings.aggregation
        log.info("secure aggregation (SecAgg+): shares %.2f, threshold %.2f, client-dp %s", a.secagg_shares,
                 a.secagg_threshold, f"sigma {a.client_noise_multiplier:g}, C {a.client_clip_norm:g}"
                 if a.client_dp else "off")
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._pending = (arrays, list(self.inner.configure_train(server_round, arrays, config, grid)), grid)
        return []  # sent by aggregate_train, through the protocol

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._pending is None:
            return None, None
        arrays, messages, grid = self._pending
        self._pending = None
        if not messages:
            return None, None
        summed = self._run_protocol(server_round, messages, grid)
        return self._aggregate(server_round, record_to_arrays(arrays), messages, summed)

    def _run_protocol(self, server_round: int, messages: list[Message], grid: Grid) -> tuple[_Tap, _Bridge]:
        nodes = [m.metadata.dst_node_id for m in messages]
        s = self.settings
        c = value_range(s.aggregation, s.plan, s.privacy)
        target = target_range(len(nodes))
        self.rounds[server_round] = SecureRound(len(nodes), value_range=c, step=step(c, target))
        tap = _Tap(grid, key_timeout=s.aggregation.secagg_timeout, train_timeout=s.federation.round_timeout)
        bridge = _Bridge(nodes, grid, grid.run.run_id)
        context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                        run_config={}), strategy=bridge)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = _Workflow(messages[0].content, num_shares=s.aggregation.secagg_shares,
                             reconstruction_threshold=s.aggregation.secagg_threshold, max_weight=1.0,
                             clipping_range=c, quantization_range=target, modulus_range=MODULUS,
                             timeout=s.federation.round_timeout)  # per stage: _Tap applies secagg-timeout
        if len(nodes) < 2:
            log.error("round %s: secure aggregation needs at least 2 nodes, %d sampled", server_round, len(nodes))
        else:
            workflow(tap, context)
        return tap, bridge

    def _aggregate(self, server_round: int, reference: Arrays, messages: list[Message],
                   summed: tuple[_Tap, _Bridge]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        tap, bridge = summed
        info = self.rounds[server_round]
        info.threshold = tap.threshold
        info.sent_bytes, info.received_bytes = tap.sent_bytes, tap.received_bytes
        parsed = [(dataclasses.replace(o, node_id=tap.node_of(m)), c)
                  for m in tap.collected for o, c in [summed_outcome(m, self.inner.run_id)]]
        answered = {o.node_id for o, _ in parsed}
        outcomes = [o for o, _ in parsed] + [NodeOutcome(m.metadata.dst_node_id, "error", "SECAGG_DROPPED")
                                             for m in messages if m.metadata.dst_node_id not in answered]
        info.in_sum = sum(not m.has_error() for m in tap.collected)
        info.trained = sum(o.trained for o in outcomes)
        info.clamped = sum(c for _, c in parsed)
        update = self._update(server_round, reference, bridge.mean, info)
        summary = self.inner.finish_round(server_round, outcomes, weight=1.0 if update is not None else None)
        if update is None:
            log.warning("round %s: no secure aggregate (%s); the global adapter is unchanged", server_round,
                        info.why)
            return None, summary
        return arrays_to_record(update), summary

    def _update(self, server_round: int, reference: Arrays, mean: np.ndarray | None,
                info: SecureRound) -> Arrays | None:
        """The new global adapter from the sum: reference + (sum / trained nodes), or None (``info.why``)."""
        agg = self.settings.aggregation
        if mean is None:
            info.why = "the protocol did not complete (fewer nodes than its threshold)"
        elif info.trained == 0:
            info.why = "no node trained"
        elif agg.client_dp and info.trained < info.threshold:
            info.why = (f"{info.trained} trained node(s) in the sum, fewer than the threshold {info.threshold} "
                        "that client-dp's noise assumes")
        if info.why or mean is None:
            return None
        names = summed_names(sent_arrays(reference, self.settings.lora.lora_variant))
        delta = unflatten(mean * (info.in_sum / info.trained), reference, names)
        if agg.client_dp:
            info.client_noise = SkellamShare.plan(clip_norm=agg.client_clip_norm, step=info.step,
                                                  dim=sum(reference[n].size for n in names),
                                                  noise_multiplier=agg.client_noise_multiplier,
                                                  threshold=info.threshold)
        info.aggregated = True
        if info.clamped:
            log.warning("round %s: nodes clamped %d coordinate(s) of their updates to the secure sum's range "
                        "+-%g (secagg-range)", server_round, info.clamped, info.value_range)
        mean_adapter = {k: (v + delta[k]).astype(v.dtype) if k in delta else v for k, v in reference.items()}
        return self.inner.server_optimizer.step(reference, mean_adapter)

    def client_level(self, delta: float) -> dict[str, object] | None:
        """The aggregate's client-level DP so far (None without client-dp), with what it assumes."""
        agg = self.settings.aggregation
        if not agg.client_dp:
            return None
        shares = [r.client_noise for _, r in sorted(self.rounds.items()) if r.client_noise is not None]
        return {"epsilon": client_epsilon(shares, delta), "delta": delta, "rounds": len(shares),
                "noise-multiplier": agg.client_noise_multiplier, "clip-norm": agg.client_clip_norm,
                "thresholds": [s.threshold for s in shares], "mechanism": MECHANISM, "trust": TRUST}

    def round_fields(self, server_round: int, delta: float) -> dict[str, object]:
        """The round's secure-aggregation fields of metrics.jsonl (and the client-level epsilon so far)."""
        info = self.rounds.get(server_round)
        if info is None:
            return {}
        level = self.client_level(delta)
        return {"secure-aggregation": info.to_row(),
                **({"client-epsilon": level["epsilon"]} if level is not None else {})}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
